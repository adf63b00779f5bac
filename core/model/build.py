"""Assemble new, untrained EMO-LLaMA checkpoints from base parts.

    python app.py build-model --tiny --out /tmp/tiny            # a test fixture, built offline
    python app.py build-model --llm lmsys/vicuna-7b-v1.5 \\
        --vision openai/clip-vit-large-patch14-336 --out checkpoints/base

The tiny checkpoint has random 2-layer parts (hidden sizes 32-64) and a byte-level BPE tokenizer
trained here on a short corpus; its config says `is_tiny: true`, and every answer it gives is
labelled a test fixture. It exists for tests and development only.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from core.labels import CANONICAL, SYNONYMS
from core.model.config import EmoLlamaConfig
from core.model.modeling import EmoLlama
from core.model.prompt import CATEGORY_QUESTION, CONVERSATION_QUESTION

TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

_EVIDENCE = ["raised cheeks", "pulled lip corners", "lowered brows", "wide open eyes",
             "raised inner brows", "wrinkled nose", "tightened lips", "dropped jaw",
             "action unit AU6 and AU12", "AU4 brow lowerer", "AU1 and AU2", "AU9 nose wrinkler"]


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from: labels, questions, facial evidence."""
    lines = [CATEGORY_QUESTION.format(medium=m, options=", ".join(CANONICAL)) for m in ("image", "video")]
    lines += [CONVERSATION_QUESTION.format(medium=m) for m in ("image", "video")]
    lines += [f"The person shows {label}: {e}." for label in CANONICAL for e in _EVIDENCE]
    lines += list(SYNONYMS) + ["The person appears to be a 30-39 year old East Asian woman."]
    return lines * 4


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(tiny_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_config(**overrides) -> EmoLlamaConfig:
    values = dict(llm="llm", vision="vision", num_frames=8, content_tokens=1, qformer_hidden=32,
                  qformer_layers=2, qformer_heads=2, num_text_queries=4, face_tokens=4,
                  global_face_tokens=2, aggregator_layers=2, aggregator_heads=2,
                  aggregator_hidden=32, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                  lora_targets=["q_proj", "v_proj"], max_new_tokens=24, version="tiny-base",
                  is_tiny=True)
    values.update(overrides)
    return EmoLlamaConfig(**values)


def build_tiny(out: str | Path, seed: int = 0, **overrides) -> Path:
    """A tiny random checkpoint with its base parts inside `out` (loads offline)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars are noise for three tiny files
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        # Larger than the usual 0.02 so the frozen tied LM head can express confident answers
        # (logit scale ~ |embedding| x |normed hidden|); a real pretrained LLM has this built in.
        initializer_range=0.2))
    llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)
                    ).save_pretrained(out / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(out / "vision")
    config = tiny_config(**overrides)
    config.base_id = config.base_id or base_fingerprint(out / "llm", out / "vision")
    model = EmoLlama.from_parts(config, out)
    model.source_dir = out
    model.save_pretrained(out)
    return out


def base_fingerprint(*folders: Path) -> str:
    """Content hash of base parts stored inside a checkpoint: versions fine-tuned from the same
    tiny base share it (and so can share one loaded base), two random builds do not."""
    digest = hashlib.sha256()
    for folder in folders:
        for file in sorted(Path(folder).rglob("*")):
            if file.is_file():
                digest.update(file.relative_to(folder).as_posix().encode())
                digest.update(file.read_bytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def prior_embedding_dim(prior: str) -> int:
    """Size of the global face embedding core/faces.py takes from the prior network `prior`."""
    if prior in ("fer2013-mini-xception", "mini-xception", "default"):
        return 128
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(prior)
    # TransformersPrior pools the last hidden state: CNNs name their widths hidden_sizes.
    sizes = getattr(config, "hidden_sizes", None)
    return int(sizes[-1]) if sizes else int(config.hidden_size)


def build_from_parts(llm: str, vision: str, out: str | Path, prior: str | None = None,
                     version: str = "base") -> Path:
    """An untrained checkpoint that refers to real base parts by hub id or folder."""
    config = EmoLlamaConfig(llm=llm, vision=vision, version=version)
    if prior:
        config.prior, config.prior_dim = prior, prior_embedding_dim(prior)
    # The tokenizer is saved with the checkpoint, chat template included (Vicuna's layout when the
    # base LLM ships none), so every later load formats prompts the same way.
    return EmoLlama.from_parts(config).save_pretrained(out)
