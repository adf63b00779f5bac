"""Convert a LLaMA-VID release (Li et al., 2023) into an EMO-LLaMA checkpoint.

    python app.py build-model --from-llamavid YanweiLi/llama-vid-7b-full-224-video-fps-1 \\
        --eva model_zoo/LAVIS/eva_vit_g.pth --out checkpoints/llamavid-7b

A release, as published on the hub, holds config.json (LLaMA's sizes plus LLaMA-VID's `mm_*`,
`bert_type`, `num_query`, `compress_type`), the weights in shards with their index json, and the
LLaMA tokenizer. It names three things it does not hold, resolved as LLaMA-VID resolves them
(from the working directory first, then the hub) unless a flag says where they are:
  `mm_vision_tower`  the EVA-ViT-g weights file (LAVIS's eva_vit_g.pth)            --eva
  `image_processor`  the CLIP image processor folder                              --processor
  bert-base-uncased  the Q-Former's WordPiece tokenizer (+ LLaMA-VID's "[DEC]")   --bert

What becomes what (sizes are read from the tensors, so a tiny release converts too):
  model.embed_tokens / layers / norm, lm_head   -> llm/ (LlamaForCausalLM, safetensors shards)
  model.vlm_att_encoder.bert.*                  -> frame_tokens.encoder (InstructBlipQFormerModel)
  model.vlm_att_query / _ln / _projector / _key_projector / _val_projector / _bert_proj,
  model.mm_projector                            -> frame_tokens.* (core/model/vision.py)
  the EVA file's blocks 0..n-2 (n stored)       -> vision/ (InstructBlipVisionModel, no final norm)
  the shards' own copy of the vision tower      -> ignored (LLaMA-VID loads EVA from its file)
Face Info Mining and the clue aggregator are added new (trainable), or left out with fim=False.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from core.errors import UserError
from core.model.config import EmoLlamaConfig

INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
FRAME_TOKEN_KEYS = {  # LLaMA-VID name -> ours, under frame_tokens.
    "model.vlm_att_query": "query",
    "model.vlm_att_ln.": "ln.",
    "model.vlm_att_projector.": "projector.",
    "model.vlm_att_key_projector.": "key_projector.",
    "model.vlm_att_val_projector.": "val_projector.",
    "model.vlm_att_bert_proj.": "bert_proj.",
    "model.mm_projector.": "mm_projector.",
}
QFORMER_PREFIX = "model.vlm_att_encoder.bert."
LLAMA_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                     "rope_theta", "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id",
                     "tie_word_embeddings", "attention_bias", "initializer_range")
EVA_HEAD_WIDTH = 88       # LLaMA-VID builds EVA with num_heads = width // 88 (1408 -> 16)
BERT_HEAD_WIDTH = 64      # BERT-base: 768 / 12
DEFAULT_TEMPLATE = "llava_v1"   # what LLaMA-VID's serve/cli.py uses for its "vid" models


def convert_llamavid(source: str, out: str | Path, *, eva: str | None = None, bert: str | None = None,
                     processor: str | None = None, fim: bool = True, agr: bool = True,
                     version: str | None = None) -> dict:
    """Write an EMO-LLaMA checkpoint to `out` from a LLaMA-VID release; returns the report."""
    started = time.monotonic()
    release = resolve_release(source)
    llamavid = _read_json(release / "config.json", "the release's config.json")
    if "mm_vision_tower" not in llamavid or "bert_type" not in llamavid:
        raise UserError(f"{source}: not a LLaMA-VID release (its config.json has no "
                        "mm_vision_tower / bert_type)")
    if "qformer" not in llamavid["bert_type"]:
        raise UserError(f"{source}: bert_type {llamavid['bert_type']!r} is not a Q-Former; only "
                        "LLaMA-VID's qformer variants convert")
    if llamavid.get("mm_vision_select_feature", "patch") != "patch":
        raise UserError(f"{source}: mm_vision_select_feature {llamavid['mm_vision_select_feature']!r} "
                        "is not supported (LLaMA-VID's releases use 'patch')")
    eva_file = resolve_local(eva or llamavid["mm_vision_tower"], "the EVA-ViT-g weights file", "--eva")
    image_processor = load_processor(processor or llamavid.get("image_processor")
                                     or "openai/clip-vit-large-patch14")
    qformer_tokenizer = load_bert_tokenizer(bert or "bert-base-uncased")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"source": str(source), "out": str(out), "consumed": 0, "ignored": defaultdict(int),
              "unknown": [], "resized_vocab": None}
    llm_shards, modules = [], {}
    for shard_name, tensors in iter_shards(release):
        llm_part = {}
        for key, tensor in tensors.items():
            target = route(key)
            if target is None:
                report["unknown"].append(key)
                continue
            kind, name = target
            if kind == "ignored":
                report["ignored"][name] += 1
                continue
            report["consumed"] += 1
            (llm_part if kind == "llm" else modules)[name] = tensor
        llm_shards.append(llm_part)

    tokenizer, embed_rows = save_llm(release, llamavid, llm_shards, out / "llm", report)
    vision_config = save_eva(eva_file, image_processor, out / "vision", report)
    config = emo_config(llamavid, modules, vision_config, qformer_tokenizer, fim=fim, agr=agr,
                        version=version or f"llamavid-{release.name}")
    config.base_id = release_fingerprint(release, eva_file)
    write_modules(config, modules, vision_config.hidden_size, embed_rows[1], out)

    tokenizer.save_pretrained(out / "tokenizer")
    image_processor.save_pretrained(out / "processor")
    qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")
    config.save(out)
    report["ignored"] = dict(report["ignored"])
    report.update(version=config.version, fim=fim, agr=agr, template=config.template,
                  content_tokens=config.content_tokens, eva_blocks=vision_config.num_hidden_layers,
                  seconds=round(time.monotonic() - started, 2))
    (out / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------------- finding the parts
def resolve_release(source: str) -> Path:
    """A local folder, or a hub id fetched (or read from the cache) with huggingface_hub."""
    from core.model.config import local_or_hub

    return local_or_hub(source, "LLaMA-VID release folder", UserError)


def resolve_local(path: str, what: str, flag: str) -> Path:
    """A file the release names by a path relative to where LLaMA-VID was run."""
    if Path(path).is_file():
        return Path(path)
    raise UserError(f"{what} is missing: {path} (pass {flag} FILE)")


def load_processor(name_or_path: str):
    """LLaMA-VID's CLIPImageProcessor, PIL-backed (its pixels come from PIL's bicubic resize)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path, backend="pil")
    except Exception:
        raise UserError(f"the CLIP image processor is missing: {name_or_path} "
                        "(pass --processor DIR)") from None


def load_bert_tokenizer(name_or_path: str):
    """bert-base-uncased's WordPiece tokenizer with LLaMA-VID's added "[DEC]" (its bos token)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception:
        raise UserError(f"the Q-Former's BERT tokenizer is missing: {name_or_path} "
                        "(pass --bert DIR_OR_ID)") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.truncation_side = "left"
    return tokenizer


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} is missing: {path}") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{what} is not valid JSON: {path}") from None


def iter_shards(release: Path):
    """(shard name, {key: tensor}) for each shard the index json lists (LLaMA-VID requires it)."""
    index_file = next((release / name for name in INDEX_FILES if (release / name).exists()), None)
    if index_file is None:
        raise UserError(f"{release}: the weights index is missing ({' or '.join(INDEX_FILES)})")
    weight_map = _read_json(index_file, "the weights index").get("weight_map") or {}
    for name in sorted(set(weight_map.values())):
        shard = release / name
        if not shard.exists():
            raise UserError(f"{release}: the shard {name} that the index lists is missing")
        yield name, load_tensors(shard)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: cannot read the weights ({type(exc).__name__})") from None
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def release_fingerprint(release: Path, eva_file: Path) -> str:
    """Identity of the frozen base: the release's config + index and the EVA file's size."""
    digest = hashlib.sha256((release / "config.json").read_bytes())
    for name in INDEX_FILES:
        if (release / name).exists():
            digest.update((release / name).read_bytes())
    digest.update(str(eva_file.stat().st_size).encode())
    return f"llamavid:{digest.hexdigest()[:16]}"


# ---------------------------------------------------------------------- renaming
def route(key: str) -> tuple[str, str] | None:
    """Where a release key goes: ("llm", name), ("modules", name), ("ignored", why) or None."""
    if key.startswith(LLM_PREFIXES):
        return "llm", key
    if key.startswith("model.vision_tower."):
        return "ignored", "the shards' copy of the vision tower (EVA comes from its own file)"
    if key.startswith(QFORMER_PREFIX):
        name = key[len(QFORMER_PREFIX):]
        if name == "embeddings.position_ids":
            return "ignored", "the Q-Former's position_ids buffer (rebuilt)"
        name = name.replace("embeddings.LayerNorm.", "embeddings.layernorm.")
        name = re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", name)
        return "modules", f"frame_tokens.encoder.{name}"
    if key.startswith("model.vlm_att_encoder.cls."):
        return "ignored", "BERT's language-model head (LLaMA-VID sets it to None)"
    for theirs, ours in FRAME_TOKEN_KEYS.items():
        if key == theirs.rstrip(".") or key.startswith(theirs):
            return "modules", "frame_tokens." + ours + key[len(theirs):]
    return None


def save_llm(release: Path, llamavid: dict, shards: list[dict], folder: Path, report: dict):
    """The LLaMA part as a LlamaForCausalLM folder, shard by shard; the tokenizer with LLaMA-VID's
    added tokens (its builder adds <im_patch> unless mm_use_im_patch_token is false)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(release))
    except Exception as exc:
        raise UserError(f"{release}: the LLaMA tokenizer is missing or unreadable ({type(exc).__name__})") from None
    if llamavid.get("mm_use_im_patch_token", True):
        tokenizer.add_tokens(["<im_patch>"], special_tokens=True)
    if llamavid.get("mm_use_im_start_end", False):
        tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token

    embed = next((s["model.embed_tokens.weight"] for s in shards if "model.embed_tokens.weight" in s), None)
    if embed is None:
        raise UserError(f"{release}: no model.embed_tokens.weight in the shards: not a LLaMA-VID release")
    if len(tokenizer) > embed.shape[0]:
        # As transformers' resize_token_embeddings does: new rows are the mean of the old ones.
        report["resized_vocab"] = [embed.shape[0], len(tokenizer)]
        for shard in shards:
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                if name in shard:
                    old = shard[name]
                    extra = old.float().mean(0, keepdim=True).expand(len(tokenizer) - old.shape[0], -1)
                    shard[name] = torch.cat([old, extra.to(old.dtype)])
    vocab, hidden = next(s["model.embed_tokens.weight"] for s in shards if "model.embed_tokens.weight" in s).shape

    values = {k: llamavid[k] for k in LLAMA_CONFIG_KEYS if k in llamavid}
    values.update(vocab_size=vocab, hidden_size=hidden)
    values.setdefault("tie_word_embeddings", not any("lm_head.weight" in s for s in shards))
    config = LlamaConfig(**values)
    config.architectures = ["LlamaForCausalLM"]
    dtype = next(iter(next(s for s in shards if s).values())).dtype
    config.dtype = str(dtype).removeprefix("torch.")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)

    kept = [s for s in shards if s]
    weight_map = {}
    for i, shard in enumerate(kept, 1):
        name = f"model-{i:05d}-of-{len(kept):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    tokenizer.save_pretrained(folder)
    return tokenizer, (vocab, hidden)


def save_eva(eva_file: Path, image_processor, folder: Path, report: dict):
    """EVA-ViT-g from its own weights file as transformers' InstructBlipVisionModel: n - 1 of the
    n stored blocks (LLaMA-VID: 39 of 40, loaded strict=False), positions interpolated to the
    processor's size as LAVIS's interpolate_pos_embed does; the final norm stays unused."""
    from safetensors.torch import save_file
    from transformers import InstructBlipVisionConfig

    state = load_tensors(eva_file)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if "cls_token" not in state or "patch_embed.proj.weight" not in state or not blocks:
        raise UserError(f"{eva_file}: not an EVA-ViT weights file (no cls_token / patch_embed / blocks)")
    built = max(blocks)   # the last stored block is not built
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    size = image_processor.size.get("shortest_edge") or image_processor.size.get("height")
    if width % EVA_HEAD_WIDTH:
        raise UserError(f"{eva_file}: EVA width {width} is not a multiple of {EVA_HEAD_WIDTH}")
    config = InstructBlipVisionConfig(
        hidden_size=width, intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=built, num_attention_heads=width // EVA_HEAD_WIDTH, image_size=size,
        patch_size=patch, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")

    def block(i: int, theirs: str) -> torch.Tensor:
        return state[f"blocks.{i}.{theirs}"]

    ours = {"embeddings.class_embedding": state["cls_token"],
            "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
            "embeddings.patch_embedding.bias": state["patch_embed.proj.bias"],
            "embeddings.position_embedding": interpolate_positions(state["pos_embed"], size // patch)}
    for i in range(built):
        prefix = f"encoder.layers.{i}."
        q_bias, v_bias = block(i, "attn.q_bias"), block(i, "attn.v_bias")
        ours.update({
            prefix + "layer_norm1.weight": block(i, "norm1.weight"), prefix + "layer_norm1.bias": block(i, "norm1.bias"),
            prefix + "self_attn.qkv.weight": block(i, "attn.qkv.weight"),
            # EVA has no key bias: q, 0, v, as its attention concatenates them.
            prefix + "self_attn.qkv.bias": torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]),
            prefix + "self_attn.projection.weight": block(i, "attn.proj.weight"),
            prefix + "self_attn.projection.bias": block(i, "attn.proj.bias"),
            prefix + "layer_norm2.weight": block(i, "norm2.weight"), prefix + "layer_norm2.bias": block(i, "norm2.bias"),
            prefix + "mlp.fc1.weight": block(i, "mlp.fc1.weight"), prefix + "mlp.fc1.bias": block(i, "mlp.fc1.bias"),
            prefix + "mlp.fc2.weight": block(i, "mlp.fc2.weight"), prefix + "mlp.fc2.bias": block(i, "mlp.fc2.bias")})
    # Present so the model loads without "newly initialised" noise; encoder_features never applies it.
    ours["post_layernorm.weight"] = torch.ones(width, dtype=state["cls_token"].dtype)
    ours["post_layernorm.bias"] = torch.zeros(width, dtype=state["cls_token"].dtype)
    used = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    used |= {k for k in state if (m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) < built}
    report["eva_consumed"] = len(used)
    report["eva_not_built"] = sorted(k for k in state if k not in used)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in ours.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return config


def interpolate_positions(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): the CLS position kept, the grid resized bicubically."""
    stored = math.isqrt(pos_embed.shape[1] - 1)
    if stored == grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    patches = patches.reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)], dim=1)


# ---------------------------------------------------------------------- our checkpoint
def emo_config(llamavid: dict, modules: dict, vision_config, qformer_tokenizer, *, fim: bool,
               agr: bool, version: str) -> EmoLlamaConfig:
    """Our config, every size read from the converted tensors."""
    from core.model.vision import compress_type_to_tokens

    prefix = "frame_tokens.encoder."
    try:
        words = modules[prefix + "embeddings.word_embeddings.weight"]
        positions = modules[prefix + "embeddings.position_embeddings.weight"]
        query = modules["frame_tokens.query"]
        modules["frame_tokens.val_projector.weight"]
        modules["frame_tokens.mm_projector.0.weight"]
    except KeyError as missing:
        raise UserError(f"the release has no {missing.args[0]!r} (LLaMA-VID name: see core/model/llamavid.py): "
                        "not a LLaMA-VID Q-Former checkpoint") from None
    layers = sorted({int(m.group(1)) for k in modules if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))})
    cross = sorted({int(m.group(1)) for k in modules
                    if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.crossattention\.", k))})
    if not layers or not cross or cross[0] != 0:
        raise UserError("the release's Q-Former has no cross-attention in its first layer: not LLaMA-VID's")
    frequency = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), frequency)):
        raise UserError(f"the Q-Former's cross-attention layers {cross} are not evenly spaced")
    hidden = words.shape[1]
    if len(qformer_tokenizer) != words.shape[0]:
        raise UserError(f"the BERT tokenizer has {len(qformer_tokenizer)} tokens but the Q-Former "
                        f"{words.shape[0]} (bert-base-uncased + [DEC] is 30523)")
    cross_key = modules[prefix + "encoder.layer.0.crossattention.attention.key.weight"]
    grid = vision_config.image_size // vision_config.patch_size
    return EmoLlamaConfig(
        llm="llm", vision="vision", qformer_tokenizer="qformer_tokenizer", version=version,
        template=DEFAULT_TEMPLATE, content_tokens=compress_type_to_tokens(llamavid.get("compress_type"), grid * grid),
        vision_select_layer=-1, num_text_queries=query.shape[1], qformer_hidden=hidden,
        qformer_layers=len(layers), qformer_heads=max(1, hidden // BERT_HEAD_WIDTH),
        qformer_intermediate=modules[prefix + "encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        qformer_vocab=words.shape[0], qformer_max_positions=positions.shape[0],
        qformer_cross_attention_frequency=frequency, qformer_encoder_width=cross_key.shape[1],
        qformer_vision_ln="frame_tokens.ln.weight" in modules, use_fim=fim, use_agr=agr)


def write_modules(config: EmoLlamaConfig, modules: dict, vision_dim: int, llm_dim: int, out: Path) -> None:
    """emo_modules.safetensors: the converted frame-token weights (checked against the module's own
    names and shapes) and, with FIM on, a new Face Info Mining module."""
    from safetensors.torch import save_file

    from core.model.face_mining import FaceInfoMining
    from core.model.modeling import MODULES_FILE
    from core.model.vision import FrameTokens

    with torch.device("meta"):
        expected = {f"frame_tokens.{k}": v for k, v in FrameTokens(config, vision_dim, llm_dim).state_dict().items()}
    missing = sorted(set(expected) - set(modules))
    extra = sorted(set(modules) - set(expected))
    wrong = sorted(k for k in set(expected) & set(modules) if expected[k].shape != modules[k].shape)
    if missing or extra or wrong:
        raise UserError("the release's connector does not fit LLaMA-VID's layout: "
                        + "; ".join(f"{what} {keys[:3]}" for what, keys in
                                    (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if keys))
    state = {k: v.contiguous() for k, v in modules.items()}
    if config.use_fim:
        torch.manual_seed(0)
        state.update({f"fim.{k}": v.to(modules["frame_tokens.query"].dtype)
                      for k, v in FaceInfoMining(config, vision_dim, llm_dim).state_dict().items()})
    save_file(state, out / MODULES_FILE)
