"""Conversation templates per LLM family, and the one recipe training, evaluation and serving read.

Each family's prompt is rendered by a real EmoLlama (random tiny parts) holding a tokenizer in that
family's layout, built here offline: BOS once at the start (or not at all), the exact text
around the media, the end token that closes answers and stops generation.
"""
from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest

from core.errors import ModelLoadError
from core.model.prompt import MEDIA_MARKER, split_prompt, user_message
from core.model.recipe import (DEFAULT_CONVERSATION_PHRASINGS, category_question, conversation_question,
                               training_conversation_question)
from core.model.templates import TEMPLATES, TemplateError, detect_template, get_template
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (a fixture)

QUESTION = "What is the facial expression of the person in the image?"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                "gives helpful, detailed, and polite answers to the human's questions.")
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Meta-Llama-3-8B-Instruct's and SmolLM2-135M-Instruct's own chat templates.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")
CORPUS = [QUESTION, VICUNA_SYSTEM, LLAVA_SYSTEM, SMOLLM_SYSTEM, "USER: ASSISTANT: user assistant system\n",
          "happiness sadness anger surprise neutral fear disgust"] * 3


def _bpe(specials: list[str], metaspace: bool = False) -> tuple[dict, list]:
    """Vocabulary and merges of a small BPE trained on CORPUS (LLaMA's "▁" pre-tokenizer or GPT-2's bytes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=specials[0] if metaspace else None))
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer, json.loads(tokenizer.to_str())["model"]


def llama_tokenizer():
    """LLaMA / Vicuna's layout: SentencePiece-style "▁" BPE, <unk> <s> </s>, no chat template."""
    from transformers import LlamaTokenizerFast

    _, model = _bpe(["<unk>", "<s>", "</s>"], metaspace=True)
    return LlamaTokenizerFast(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def _byte_level(specials: list[str], **tokens):
    from transformers import PreTrainedTokenizerFast

    tokenizer, _ = _bpe(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **tokens)


def llama3_tokenizer():
    tokenizer = _byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"],
                            bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def chatml_tokenizer():
    """SmolLM2-Instruct's layout: bos <|im_start|>, eos <|im_end|>."""
    tokenizer = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tokenizer


def tiny_tokenizer():
    from core.model.build import build_tiny_tokenizer

    return build_tiny_tokenizer()


def tiny_model(template: str, tokenizer):
    """A random tiny EmoLlama around `tokenizer`, prompting with `template`."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig

    from core.model.build import build_tiny_bert_tokenizer, tiny_config
    from core.model.modeling import EmoLlama

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bert = build_tiny_bert_tokenizer()
    llm = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = tiny_config(template=template, qformer_vocab=len(bert))
    return EmoLlama.from_configs(config, llm, vision, tokenizer, processor, bert).eval()


# family: (template, tokenizer, exact text before the media, exact text after it, end token)
FAMILIES = {
    "vicuna_v1": (llama_tokenizer, VICUNA_SYSTEM + " USER: ", f"\n{QUESTION} ASSISTANT:", "</s>"),
    "llava_v1": (llama_tokenizer, LLAVA_SYSTEM + " USER: ", f"\n{QUESTION} ASSISTANT:", "</s>"),
    "llama3": (llama3_tokenizer, "<|start_header_id|>user<|end_header_id|>\n\n",
               f"\n{QUESTION}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "chatml": (chatml_tokenizer, f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n<|im_start|>user\n",
               f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    "tiny": (tiny_tokenizer, "<|user|>\n", f"\n{QUESTION}\n<|assistant|>\n", "</s>"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_renders_its_own_layout_around_the_media(family):
    make_tokenizer, before_text, after_text, end = FAMILIES[family]
    tokenizer = make_tokenizer()
    template = get_template(family)
    assert split_prompt(template, QUESTION) == (before_text, after_text)

    model = tiny_model(family, tokenizer)
    x = model.prepare([np.zeros((32, 32, 3), np.uint8)], [[]], QUESTION)
    ids = x.before_ids + x.after_ids
    bos = tokenizer.bos_token_id
    text_ids = tokenizer(before_text, add_special_tokens=False)["input_ids"]
    if template.add_bos:  # BOS exactly once, at the very start, then the text
        assert x.before_ids == [bos] + text_ids and ids.count(bos) == 1
    else:  # no BOS of its own: only where the text names that token (ChatML's <|im_start|>)
        assert x.before_ids == text_ids
        assert ids.count(bos) == (before_text + after_text).count(tokenizer.bos_token)
    assert x.after_ids == tokenizer(after_text, add_special_tokens=False)["input_ids"]
    # The family's own chat template (where it has one) renders the same prompt.
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(QUESTION)}], tokenize=False, add_generation_prompt=True)
        bos_text = tokenizer.bos_token if template.add_bos else ""
        assert rendered == bos_text + before_text + MEDIA_MARKER + after_text
    # Answers are trained and scored closed by the family's end token; generation stops at it.
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert model.answer_ids("happiness") == tokenizer("happiness", add_special_tokens=False)["input_ids"] + [end_id]
    assert end_id in model.stop_token_ids()
    assert model.token_budget("image", 1, QUESTION)["text"] == len(ids)


def test_vicuna_prompt_is_llamavids_conversation():
    """LLaMA-VID's conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>") with "<image>\\n" + the
    question as the user message: system + " " + "USER: " + message + " " + "ASSISTANT:"."""
    message = "<image>\n" + QUESTION
    theirs = VICUNA_SYSTEM + " " + "USER: " + message + " " + "ASSISTANT:"
    assert get_template("vicuna_v1").render(message) == theirs
    assert get_template("vicuna_v1").add_bos and get_template("vicuna_v1").end == "</s>"


def test_the_template_is_detected_from_the_llm():
    from transformers import LlamaConfig, Qwen2Config

    llama = LlamaConfig()
    assert detect_template(llama, llama3_tokenizer()) == "llama3"
    assert detect_template(llama, chatml_tokenizer()) == "chatml"          # SmolLM2 is a llama
    qwen = chatml_tokenizer()   # Qwen2-Instruct's template is SmolLM2's with its own system prompt
    qwen.chat_template = SMOLLM2_CHAT_TEMPLATE.replace(SMOLLM_SYSTEM, "You are a helpful assistant.")
    assert detect_template(Qwen2Config(), qwen) == detect_template(llama, qwen) == "qwen2"
    qwen.chat_template = SMOLLM2_CHAT_TEMPLATE.replace(SMOLLM_SYSTEM, "Be terse.")   # by the markers
    assert detect_template(Qwen2Config(), qwen) == "qwen2" and detect_template(llama, qwen) == "chatml"
    assert detect_template(llama, llama_tokenizer(), "lmsys/vicuna-7b-v1.5") == "vicuna_v1"
    assert detect_template(llama, tiny_tokenizer(), is_tiny=True) == "tiny"


def test_an_llm_of_unknown_template_is_a_clear_error_not_a_fallback():
    from transformers import LlamaConfig

    with pytest.raises(TemplateError) as caught:
        detect_template(LlamaConfig(), llama_tokenizer(), "acme/mystery-7b")
    message = str(caught.value)
    assert message.startswith("cannot tell the conversation template of LLM acme/mystery-7b; set `template` "
                              "in config.json to one of ")
    assert all(name in message for name in TEMPLATES) and "\n" not in message


def test_an_unknown_template_name_is_refused_with_the_names(tiny_checkpoint, tmp_path):  # noqa: F811
    from core.model.modeling import EmoLlama

    with pytest.raises(TemplateError, match="unknown conversation template 'vicuna'; use one of vicuna_v1, "):
        get_template("vicuna")
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "template": "vicuna"}))
    with pytest.raises(ModelLoadError, match="unknown conversation template 'vicuna'; use one of .*llama3"):
        EmoLlama.from_pretrained(broken)


def test_a_checkpoint_without_a_template_gets_it_detected_and_prompts_the_same(tiny_checkpoint, tmp_path):  # noqa: F811
    """Tiny checkpoints written before templates existed: "tiny" is detected, the prompt unchanged."""
    from core.model.modeling import EmoLlama

    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "template"}))
    frame = np.zeros((32, 32, 3), np.uint8)
    before = EmoLlama.from_pretrained(old)
    now = EmoLlama.from_pretrained(tiny_checkpoint)
    assert before.config.template == now.config.template == "tiny"
    a, b = before.prepare([frame], [[]], QUESTION), now.prepare([frame], [[]], QUESTION)
    assert (a.before_ids, a.after_ids) == (b.before_ids, b.after_ids)
    assert before.answer_ids("happiness")[-1] == before.tokenizer.eos_token_id


# ---------------------------------------------------------------- one recipe everywhere

def test_serving_asks_the_first_training_phrasing_and_export_trains_on_those_phrasings(tiny_checkpoint):  # noqa: F811
    from annotation import export
    from core.model import recipe
    from core.model.config import EmoLlamaConfig

    config = EmoLlamaConfig.load(tiny_checkpoint)
    assert config.conversation_phrasings == list(DEFAULT_CONVERSATION_PHRASINGS)
    trained = {training_conversation_question("video", f"{h:064x}", config) for h in range(12)}
    assert conversation_question("video", config) in trained
    assert conversation_question("video", config) == config.conversation_phrasings[0].replace("{medium}", "video")
    # Export (no model at hand) phrases its records with the same recipe functions and defaults.
    assert export.training_conversation_question is recipe.training_conversation_question
    assert export.category_question is recipe.category_question
    # A checkpoint with its own phrasings is asked and trained with those.
    config.conversation_phrasings = ["Tell me about the face in the {medium}."]
    assert conversation_question("image", config) == "Tell me about the face in the image."
    assert training_conversation_question("image", "ff", config) == "Tell me about the face in the image."


def test_training_asks_records_with_the_models_recipe():
    from annotation.train import question_and_answer
    from core.model.config import EmoLlamaConfig

    config = EmoLlamaConfig(conversation_phrasings=["Why this {medium}?"],
                            category_phrasing="Which one ({options}) in the {medium}?")
    conversation = {"video": "clip.mp4", "task": "conversation", "content_hash": "0a",
                    "conversations": [{"from": "human", "value": "<image>\nOld phrasing?"},
                                      {"from": "gpt", "value": "Because."}]}
    category = {"image": "a.png", "task": "category", "content_hash": "0a", "label_set": ["happiness", "anger"],
                "conversations": [{"from": "human", "value": "<image>\nOld?"}, {"from": "gpt", "value": "anger"}]}
    assert question_and_answer(conversation, config) == ("Why this video?", "Because.")
    assert question_and_answer(category, config) == ("Which one (happiness, anger) in the image?", "anger")
    assert question_and_answer(conversation) == ("Old phrasing?", "Because.")   # no model: the record's text
    assert category_question(["happiness", "anger"], "image", EmoLlamaConfig()) == (
        "What is the facial expression of the person in the image? Choose one from the following options: "
        "happiness, anger.")


def test_training_evaluation_and_serving_sample_the_checkpoints_frames(tiny_checkpoint, tmp_path):  # noqa: F811
    from annotation.evaluate import evaluate_version
    from annotation.finetune import TrainOptions
    from core.engine import Engine, EngineConfig
    from core.model.config import EmoLlamaConfig
    from tests.media_files import face_frames, write_video

    config = EmoLlamaConfig.load(tiny_checkpoint)
    assert TrainOptions().num_frames is None                                   # -> config.num_frames
    assert inspect.signature(evaluate_version).parameters["num_frames"].default is None
    clip = write_video(tmp_path / "clip.mp4", face_frames(12), fps=6)
    engine = Engine(str(tiny_checkpoint), EngineConfig(max_new_tokens=2))
    try:
        assert engine.config.num_frames == config.num_frames == 8
        asked = []
        prepare = engine._model.prepare
        engine._model.prepare = lambda frames, faces, question: (asked.append((len(frames), question))
                                                                 or prepare(frames, faces, question))
        engine.predict(clip)
        assert asked == [(8, category_question(config.label_set, "video", config)),
                         (8, conversation_question("video", config))]
    finally:
        engine.close()
    override = Engine(str(tiny_checkpoint), EngineConfig(num_frames=3, max_new_tokens=2))
    try:
        assert override.config.num_frames == 3
    finally:
        override.close()
