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
from core.priors import embedding_dim

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


def build_tiny_bert_tokenizer(with_dec: bool = True):
    """A tiny lower-casing WordPiece tokenizer in bert-base-uncased's layout ([CLS] ... [SEP], and
    LLaMA-VID's added [DEC]), for the tiny Q-Former."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(tiny_corpus(), trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    if with_dec:
        fast.add_special_tokens({"bos_token": "[DEC]"})
    return fast


def tiny_config(**overrides) -> EmoLlamaConfig:
    values = dict(llm="llm", vision="vision", num_frames=8, content_tokens=1, qformer_hidden=32,
                  qformer_layers=2, qformer_heads=2, qformer_intermediate=64, qformer_encoder_width=32,
                  qformer_max_positions=320, num_text_queries=4, face_tokens=4,
                  vision_select_layer=-1,  # a 2-layer random tower: its penultimate layer is too raw
                  global_face_tokens=2, aggregator_layers=2, aggregator_heads=2,
                  aggregator_hidden=32, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                  lora_targets=["q_proj", "v_proj"], max_new_tokens=24, version="tiny-base",
                  is_tiny=True, template="tiny")
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
    qformer_tokenizer = build_tiny_bert_tokenizer()
    qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")
    config = tiny_config(qformer_vocab=len(qformer_tokenizer), **overrides)
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


def build_from_parts(llm: str, vision: str, out: str | Path, prior: str | None = None,
                     version: str = "base", llm_gguf_file: str = "", bert: str = "bert-base-uncased") -> Path:
    """An untrained checkpoint that refers to real base parts by hub id or folder.

    Nothing of the base is loaded: the widths come from its config files, only the new modules
    (frame tokens, Face Info Mining) are created and written, and the LoRA adapter is created
    (B = 0, so the base answers unchanged) when the checkpoint loads. A 7B base builds in seconds.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from core.model.face_mining import FaceInfoMining
    from core.model.llamavid import load_bert_tokenizer
    from core.model.llm import load_tokenizer
    from core.model.modeling import MODULES_FILE, QFORMER_TOKENIZER_DIR, load_image_processor
    from core.model.templates import detect_template
    from core.model.vision import FrameTokens

    # A local folder is recorded by its absolute path (a bare name means a checkpoint sub-folder).
    llm, vision = (str(Path(part).resolve()) if Path(part).is_dir() else part for part in (llm, vision))
    config = EmoLlamaConfig(llm=llm, vision=vision, version=version, llm_gguf_file=llm_gguf_file)
    if prior:
        config.prior, config.prior_dim = prior, embedding_dim(prior)
    llm_config = AutoConfig.from_pretrained(llm, **({"gguf_file": llm_gguf_file} if llm_gguf_file else {}))
    vision_config = AutoConfig.from_pretrained(vision)
    vision_config = getattr(vision_config, "vision_config", None) or vision_config
    llm_dim, vision_dim = llm_config.get_text_config().hidden_size, vision_config.hidden_size
    tokenizer = load_tokenizer(llm, llm_gguf_file or None)
    config.template = detect_template(llm_config, tokenizer, llm)  # before writing: or a clear error
    processor = load_image_processor(vision)
    qformer_tokenizer = load_bert_tokenizer(bert)
    config.qformer_vocab = len(qformer_tokenizer)

    modules = {"frame_tokens": FrameTokens(config, vision_dim, llm_dim),
               "fim": FaceInfoMining(config, vision_dim, llm_dim)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"{name}.{k}": v.contiguous() for name, module in modules.items()
               for k, v in module.state_dict().items()}, out / MODULES_FILE)
    # The tokenizer is saved with the checkpoint, so every later load formats prompts the same way.
    tokenizer.save_pretrained(out / "tokenizer")
    processor.save_pretrained(out / "processor")
    qformer_tokenizer.save_pretrained(out / QFORMER_TOKENIZER_DIR)
    config.qformer_tokenizer = QFORMER_TOKENIZER_DIR
    config.save(out)
    return out
