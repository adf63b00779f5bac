"""A tiny LLaMA-VID release in its own layout, and LLaMA-VID's inference written out plainly.

`build_tiny_release(root)` writes what a user has after cloning a release and fetching the files
its config names: `release/` (config.json with the mm_* fields, two pytorch_model-*.bin shards +
index json, a tokenizer that adds BOS), `model_zoo/LAVIS/eva_vit_g.pth` (3 stored blocks, 2 built),
`llamavid/processor/clip-patch14-224/` and `bert-base-uncased/` — paths relative to `root`, as
LLaMA-VID resolves them from its working directory. Weights are random, key names are theirs.

`ReferenceLlamaVid` runs LLaMA-VID's inference from the release's raw tensors with plain torch
ops (EVA blocks, the LAVIS BERT Q-Former, context attention, mm_projector) and transformers'
LlamaForCausalLM for the language model: an implementation independent of core/model, written
from LLaMA-VID's code (llamavid_arch.py, qformer.py, eva_vit.py, mm_utils.py, serve/cli.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_TOKEN_INDEX = -200
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Tiny sizes: EVA width 176 (2 heads of 88, LLaMA-VID's rule), 28 px images of 14 px patches
# (2 x 2 patches + CLS), EVA position embeddings stored for a 3 x 3 grid (interpolated), a
# 3-layer Q-Former of width 128 with cross-attention every 2nd layer, LLaMA of width 64.
EVA = dict(width=176, heads=2, mlp=256, stored_blocks=3, patch=14, stored_grid=3)
QFORMER = dict(hidden=128, layers=3, intermediate=192, positions=300, queries=4, freq=2)
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
IMAGE_SIZE = 28


def _rand(generator, *shape, scale=0.1):
    return torch.randn(*shape, generator=generator) * scale


def _layer_norm(generator, prefix, dim) -> dict:
    return {f"{prefix}.weight": 1 + _rand(generator, dim), f"{prefix}.bias": _rand(generator, dim)}


def _linear(generator, prefix, n_in, n_out, scale=0.1) -> dict:
    return {f"{prefix}.weight": _rand(generator, n_out, n_in, scale=scale),
            f"{prefix}.bias": _rand(generator, n_out, scale=scale)}


def eva_state(generator) -> dict:
    """EVA-ViT-g weights in LAVIS's eva_vit_g.pth key names."""
    w, grid = EVA["width"], EVA["stored_grid"]
    state = {"cls_token": _rand(generator, 1, 1, w), "pos_embed": _rand(generator, 1, 1 + grid * grid, w),
             "patch_embed.proj.weight": _rand(generator, w, 3, EVA["patch"], EVA["patch"], scale=0.02),
             "patch_embed.proj.bias": _rand(generator, w)}
    for i in range(EVA["stored_blocks"]):
        b = f"blocks.{i}"
        state |= _layer_norm(generator, f"{b}.norm1", w) | _layer_norm(generator, f"{b}.norm2", w)
        state |= {f"{b}.attn.qkv.weight": _rand(generator, 3 * w, w), f"{b}.attn.q_bias": _rand(generator, w),
                  f"{b}.attn.v_bias": _rand(generator, w)}
        state |= _linear(generator, f"{b}.attn.proj", w, w)
        state |= _linear(generator, f"{b}.mlp.fc1", w, EVA["mlp"]) | _linear(generator, f"{b}.mlp.fc2", EVA["mlp"], w)
    return state


def qformer_state(generator, vocab: int) -> dict:
    """The LAVIS BERT Q-Former in LLaMA-VID's names (model.vlm_att_encoder.bert.*)."""
    h, i_dim, width = QFORMER["hidden"], QFORMER["intermediate"], EVA["width"]
    p = "model.vlm_att_encoder.bert."
    state = {p + "embeddings.word_embeddings.weight": _rand(generator, vocab, h, scale=0.5),
             p + "embeddings.position_embeddings.weight": _rand(generator, QFORMER["positions"], h, scale=0.5),
             p + "embeddings.position_ids": torch.arange(QFORMER["positions"])[None]}
    state |= _layer_norm(generator, p + "embeddings.LayerNorm", h)
    for layer in range(QFORMER["layers"]):
        b = f"{p}encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            state |= _linear(generator, b + f"attention.self.{name}", h, h)
        state |= _linear(generator, b + "attention.output.dense", h, h) | _layer_norm(generator, b + "attention.output.LayerNorm", h)
        if layer % QFORMER["freq"] == 0:
            state |= _linear(generator, b + "crossattention.self.query", h, h)
            state |= _linear(generator, b + "crossattention.self.key", width, h)
            state |= _linear(generator, b + "crossattention.self.value", width, h)
            state |= _linear(generator, b + "crossattention.output.dense", h, h)
            state |= _layer_norm(generator, b + "crossattention.output.LayerNorm", h)
        for suffix in ("", "_query"):
            state |= _linear(generator, b + f"intermediate{suffix}.dense", h, i_dim)
            state |= _linear(generator, b + f"output{suffix}.dense", i_dim, h)
            state |= _layer_norm(generator, b + f"output{suffix}.LayerNorm", h)
    return state


def build_tiny_release(root: Path, compress_type: str = "mean", seed: int = 0, llama: dict | None = None) -> Path:
    """The release under root/release and the files it names; `llama` overrides LLaMA's sizes."""
    from transformers import CLIPImageProcessorPil, LlamaConfig, LlamaForCausalLM

    from core.model.build import build_tiny_bert_tokenizer, build_tiny_tokenizer
    from tokenizers import processors

    generator = torch.Generator().manual_seed(seed)
    release = root / "release"
    release.mkdir(parents=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    bos = tokenizer.bos_token_id
    # LLaMA's tokenizer adds BOS; tokenizer_image_token relies on it.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.save_pretrained(release)

    torch.manual_seed(seed)
    llm_config = LlamaConfig(bos_token_id=bos, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
                             tie_word_embeddings=False, initializer_range=0.3,
                             **({"vocab_size": len(tokenizer)} | LLAMA | (llama or {})))
    llm = LlamaForCausalLM(llm_config).state_dict()
    bert = build_tiny_bert_tokenizer(with_dec=False)
    bert.save_pretrained(root / "bert-base-uncased")
    width, hidden, q = EVA["width"], llm_config.hidden_size, QFORMER["hidden"]
    connector = qformer_state(generator, len(bert) + 1)   # + LLaMA-VID's [DEC]
    connector |= {"model.vlm_att_query": _rand(generator, 1, QFORMER["queries"], q, scale=0.5)}
    connector |= _layer_norm(generator, "model.vlm_att_ln", width)
    connector |= _linear(generator, "model.vlm_att_projector", q, width)
    connector |= _linear(generator, "model.vlm_att_key_projector", width, width)
    connector |= _linear(generator, "model.vlm_att_val_projector", width, hidden, scale=0.3)
    connector |= _linear(generator, "model.mm_projector.0", width, hidden, scale=0.3)
    connector |= _linear(generator, "model.mm_projector.2", hidden, hidden, scale=0.3)
    # A stale copy of the vision tower in the shards, which LLaMA-VID does not use.
    connector |= {"model.vision_tower.vision_tower.cls_token": _rand(generator, 1, 1, width)}

    shards = {"pytorch_model-00001-of-00002.bin": {k: v for k, v in llm.items() if not k.startswith("lm_head")},
              "pytorch_model-00002-of-00002.bin": connector | {"lm_head.weight": llm["lm_head.weight"]}}
    weight_map = {}
    for name, tensors in shards.items():
        torch.save(tensors, release / name)
        weight_map |= {k: name for k in tensors}
    (release / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = llm_config.to_dict() | {
        "architectures": ["LlavaLlamaAttForCausalLM"], "model_type": "llava",
        "mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth",
        "image_processor": "./llamavid/processor/clip-patch14-224",
        "mm_hidden_size": width, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "bert_type": "qformer_pretrain", "num_query": QFORMER["queries"], "compress_type": compress_type,
        "use_mm_proj": True, "tune_mm_mlp_adapter": False}
    (release / "config.json").write_text(json.dumps(config, indent=2))

    (root / "model_zoo" / "LAVIS").mkdir(parents=True)
    torch.save(eva_state(generator), root / "model_zoo" / "LAVIS" / "eva_vit_g.pth")
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                          ).save_pretrained(root / "llamavid" / "processor" / "clip-patch14-224")
    return release


# ---------------------------------------------------------------------- the reference
def reference_pixels(image: np.ndarray, size: int = IMAGE_SIZE, pad: bool = False) -> torch.Tensor:
    """CLIP preprocessing by hand: shortest side to `size` with PIL bicubic, centre crop,
    rescale, normalise (after LLaVA's expand2square when `pad`)."""
    pil = Image.fromarray(image)
    if pad:
        side = max(pil.size)
        square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in CLIP_MEAN))
        square.paste(pil, ((side - pil.width) // 2, (side - pil.height) // 2))
        pil = square
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    pil = pil.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC)
    array = np.asarray(pil, dtype=np.float32)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    array = array[top:top + size, left:left + size] / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())[None]


class ReferenceLlamaVid:
    def __init__(self, root: Path):
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        release = root / "release"
        self.config = json.loads((release / "config.json").read_text())
        index = json.loads((release / "pytorch_model.bin.index.json").read_text())["weight_map"]
        self.sd = {}
        for shard in sorted(set(index.values())):
            self.sd |= torch.load(release / shard, weights_only=True)
        self.eva = torch.load(root / self.config["mm_vision_tower"], weights_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(release))
        self.tokenizer.add_tokens(["<im_patch>"], special_tokens=True)   # mm_use_im_patch_token absent: on
        self.bert = AutoTokenizer.from_pretrained(str(root / "bert-base-uncased"), truncation_side="left")
        self.bert.add_special_tokens({"bos_token": "[DEC]"})
        keys = {k for k in LlamaConfig().to_dict()}
        llm_config = LlamaConfig(**{k: v for k, v in self.config.items() if k in keys})
        self.llm = LlamaForCausalLM(llm_config)
        self.llm.load_state_dict({k: v for k, v in self.sd.items() if k.startswith(("model.embed", "model.layers",
                                                                                     "model.norm", "lm_head"))})
        self.llm.resize_token_embeddings(len(self.tokenizer))   # as LLaMA-VID's builder does
        self.llm.eval()

    # EVA-ViT-g (eva_vit.py): 39 of 40 blocks in the real model; here all stored blocks but the last.
    def eva_features(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.eva
        x = F.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=EVA["patch"])
        x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        pos = s["pos_embed"]
        grid, stored = math.isqrt(x.shape[1] - 1), math.isqrt(pos.shape[1] - 1)
        if grid != stored:   # LAVIS interpolate_pos_embed
            patches = pos[:, 1:].reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
            patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
        x = x + pos
        heads = EVA["width"] // 88
        blocks = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
        for i in range(blocks - 1):
            b = lambda name: s[f"blocks.{i}.{name}"]  # noqa: E731
            h = F.layer_norm(x, (x.shape[-1],), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
            bias = torch.cat([b("attn.q_bias"), torch.zeros_like(b("attn.v_bias")), b("attn.v_bias")])
            qkv = F.linear(h, b("attn.qkv.weight"), bias).reshape(x.shape[0], x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * qkv.shape[-1] ** -0.5, qkv[1], qkv[2]
            attn = (q @ k.transpose(-2, -1)).softmax(-1) @ v
            x = x + F.linear(attn.transpose(1, 2).reshape(x.shape), b("attn.proj.weight"), b("attn.proj.bias"))
            h = F.layer_norm(x, (x.shape[-1],), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
            x = x + F.linear(F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"), b("mlp.fc2.bias"))
        return x

    # The LAVIS BERT Q-Former (qformer.py) with query_embeds, as vlm_attention calls it.
    def qformer(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        s, p = self.sd, "model.vlm_att_encoder.bert."

        def lin(x, name):
            return F.linear(x, s[p + name + ".weight"], s[p + name + ".bias"])

        def ln(x, name):
            return F.layer_norm(x, (x.shape[-1],), s[p + name + ".weight"], s[p + name + ".bias"], eps=1e-12)

        def attention(x, context, name, additive_mask):
            heads = QFORMER["hidden"] // 64
            split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
            q, k, v = split(lin(x, name + ".query")), split(lin(context, name + ".key")), split(lin(context, name + ".value"))
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if additive_mask is not None:
                scores = scores + additive_mask
            return (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)

        query = s["model.vlm_att_query"].expand(input_ids.shape[0], -1, -1)
        n = query.shape[1]
        text = s[p + "embeddings.word_embeddings.weight"][input_ids]
        text = text + s[p + "embeddings.position_embeddings.weight"][:input_ids.shape[1]]
        x = ln(torch.cat([query, text], dim=1), "embeddings.LayerNorm")
        additive = torch.zeros(1, 1, 1, x.shape[1])   # one unpadded prompt: nothing masked
        layers = 1 + max(int(k[len(p):].split(".")[2]) for k in s if k.startswith(p + "encoder.layer."))
        for i in range(layers):
            b = f"encoder.layer.{i}."
            x = ln(lin(attention(x, x, b + "attention.self", additive), b + "attention.output.dense") + x,
                   b + "attention.output.LayerNorm")
            queries, words = x[:, :n], x[:, n:]
            if p + b + "crossattention.self.query.weight" in s:
                queries = ln(lin(attention(queries, image_embeds, b + "crossattention.self", None),
                                 b + "crossattention.output.dense") + queries, b + "crossattention.output.LayerNorm")
            queries = ln(lin(F.gelu(lin(queries, b + "intermediate_query.dense")), b + "output_query.dense") + queries,
                         b + "output_query.LayerNorm")
            words = ln(lin(F.gelu(lin(words, b + "intermediate.dense")), b + "output.dense") + words,
                       b + "output.LayerNorm")
            x = torch.cat([queries, words], dim=1)
        return x[:, :n]

    def frame_tokens(self, pixels: torch.Tensor, question: str) -> torch.Tensor:
        """vlm_attention + token_generation for one image and one prompt: (2, D_llm)."""
        s = self.sd
        features = self.eva_features(pixels)                      # (1, 1 + P, 176), CLS first
        ids = self.bert([question], truncation=True, max_length=256, return_tensors="pt").input_ids
        image_in = F.layer_norm(features, (features.shape[-1],), s["model.vlm_att_ln.weight"],
                                s["model.vlm_att_ln.bias"], eps=1e-5)
        text_q = F.linear(self.qformer(ids, image_in), s["model.vlm_att_projector.weight"], s["model.vlm_att_projector.bias"])
        patches = features[:, 1:] if features.shape[1] % 2 == 1 else features
        keys = F.linear(patches, s["model.vlm_att_key_projector.weight"], s["model.vlm_att_key_projector.bias"])
        context = ((text_q @ keys.transpose(-1, -2) / patches.shape[-1] ** 0.5).softmax(-1) @ patches).mean(1)
        context = F.linear(context[:, None], s["model.vlm_att_val_projector.weight"], s["model.vlm_att_val_projector.bias"])
        content = patches.mean(dim=1, keepdim=True)               # compress_type "mean"
        content = F.linear(F.gelu(F.linear(content, s["model.mm_projector.0.weight"], s["model.mm_projector.0.bias"])),
                           s["model.mm_projector.2.weight"], s["model.mm_projector.2.bias"])
        return torch.cat([context, content], dim=1)[0]

    def prompt_ids(self, question: str) -> list[int]:
        """serve/cli.py: the llava_v1 conversation, "<image>\\n" + question, tokenizer_image_token."""
        prompt = f"{LLAVA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"
        chunks = [self.tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
        ids = chunks[0]
        for chunk in chunks[1:]:
            ids = ids + [IMAGE_TOKEN_INDEX] + (chunk[1:] if chunk[:1] == [self.tokenizer.bos_token_id] else chunk)
        return ids

    @torch.no_grad()
    def answer(self, image: np.ndarray, question: str, max_new_tokens: int) -> dict:
        pixels = reference_pixels(image)
        ids = self.prompt_ids(question)
        at = ids.index(IMAGE_TOKEN_INDEX)
        table = self.llm.get_input_embeddings()
        media = self.frame_tokens(pixels, question)
        embeds = torch.cat([table(torch.tensor(ids[:at])), media, table(torch.tensor(ids[at + 1:]))])[None]
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.eos_token_id)
        tokens = [t for t in out[0].tolist() if t != self.tokenizer.eos_token_id]
        return {"pixels": pixels, "prompt_ids": ids, "media": media, "tokens": tokens,
                "text": self.tokenizer.decode(tokens, skip_special_tokens=True).strip()}
