"""The vision side of LLaMA-VID: a frozen encoder, one context token and content tokens per frame.

For each frame (LLaMA-VID, Li et al. 2023, `vlm_attention` + `token_generation`):
  tokens   = frozen encoder features of a chosen layer, CLS included: EVA ViT-g (transformers'
             BLIP-2 / InstructBLIP vision model, 39 blocks, no final norm) or a CLIP / SigLIP
             tower (LLaVA's penultimate layer, `vision_select_layer = -2`)
  text_q   = the instruction-aware Q-Former (InstructBLIP's, transformers' InstructBlipQFormerModel):
             learned queries + the instruction's BERT WordPiece ids (with positions), cross-
             attending to LayerNorm(tokens); the query outputs, projected to the vision width
  patches  = tokens without CLS (LLaMA-VID's rule: an odd token count has one)
  context  = val_proj( mean_q softmax(text_q . key_proj(patches)^T / sqrt(D)) patches )
  content  = mm_projector(pool(patches)): the mean (1 token), a grid pool (N x N), or all patches
Order per frame: [context, content...]. A video is its frames' tokens one after another.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.model.config import EmoLlamaConfig

EVA_MODEL_TYPES = ("blip_2_vision_model", "instructblip_vision_model")


def load_vision_encoder(name_or_path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers vision encoder; a full CLIP/SigLIP checkpoint gives its vision half.

    For a two-tower checkpoint (CLIP, SigLIP) only the vision tower's class is built, so the
    text tower's weights are never materialised.
    """
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type in EVA_MODEL_TYPES:  # EVA-ViT-g, as converted from LLaMA-VID / BLIP-2
        from transformers import Blip2VisionModel, InstructBlipVisionModel

        eva = InstructBlipVisionModel if config.model_type.startswith("instructblip") else Blip2VisionModel
        return eva.from_pretrained(name_or_path, dtype=dtype)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None and type(vision_config) in MODEL_MAPPING:
        model = MODEL_MAPPING[type(vision_config)].from_pretrained(name_or_path, config=vision_config,
                                                                   dtype=dtype)
    else:
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype)
    return getattr(model, "vision_model", model)


def encoder_features(encoder: nn.Module, pixel_values: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
    """(N, 3, H, W) -> (N, T, D) features of every token, CLS included.

    EVA (a BLIP-2 / InstructBLIP vision model) gives its last block's output without the final
    LayerNorm, as LLaMA-VID's EVA tower does (it builds 39 of EVA-ViT-g's 40 blocks, so a
    converted checkpoint stores 39). Other towers give `select_layer`'s hidden states.
    """
    if encoder.config.model_type in EVA_MODEL_TYPES:
        return encoder.encoder(inputs_embeds=encoder.embeddings(pixel_values)).last_hidden_state
    return encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[select_layer]


def without_cls(tokens: torch.Tensor) -> torch.Tensor:
    """LLaMA-VID's rule for `mm_vision_select_feature = "patch"`: an odd count has a CLS first."""
    return tokens[:, 1:] if tokens.shape[1] % 2 == 1 else tokens


def patch_grid(tokens: torch.Tensor) -> torch.Tensor:
    """The square patch map without CLS, whatever the grid's parity (for ROI pooling: a 7 x 7
    ViT-B/32 grid + CLS is an even count that LLaMA-VID's rule would keep whole)."""
    count = tokens.shape[1]
    return tokens if math.isqrt(count) ** 2 == count else tokens[:, 1:]


def projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """LLaVA's `mlp2x_gelu` projector (state-dict keys 0.* and 2.*)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def qformer_config(config: EmoLlamaConfig):
    from transformers import InstructBlipQFormerConfig

    q = config.qformer_hidden
    return InstructBlipQFormerConfig(
        vocab_size=config.qformer_vocab, hidden_size=q, num_hidden_layers=config.qformer_layers,
        num_attention_heads=config.qformer_heads, intermediate_size=config.qformer_intermediate or 4 * q,
        max_position_embeddings=config.qformer_max_positions,
        cross_attention_frequency=config.qformer_cross_attention_frequency,
        encoder_hidden_size=config.qformer_encoder_width)


class FrameTokens(nn.Module):
    """Context + content tokens for each frame (LLaMA-VID), in the LLM's embedding space.

    Parameter names follow LLaMA-VID's (`vlm_att_*`, `mm_projector`) minus the prefix, so a
    converted checkpoint is a renaming, not a reinterpretation.
    """

    def __init__(self, config: EmoLlamaConfig, vision_dim: int, llm_dim: int):
        from transformers import InstructBlipQFormerModel

        super().__init__()
        self.config = config
        q, width = config.qformer_hidden, config.qformer_encoder_width
        self.query = nn.Parameter(torch.randn(1, config.num_text_queries, q) * 0.02)
        self.encoder = InstructBlipQFormerModel(qformer_config(config))
        # The pretrained Q-Former reads EVA-width features; another tower is mapped to that width.
        self.bert_proj = nn.Linear(vision_dim, width) if vision_dim != width else None
        self.ln = nn.LayerNorm(width) if config.qformer_vision_ln else None
        self.projector = nn.Linear(q, vision_dim)
        self.key_projector = nn.Linear(vision_dim, vision_dim)
        self.val_projector = nn.Linear(vision_dim, llm_dim)
        self.mm_projector = projector(vision_dim, llm_dim)

    def text_queries(self, tokens: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The Q-Former's query outputs for each frame, (F, M, D_vision)."""
        frames = tokens.shape[0]
        queries = self.query.expand(frames, -1, -1)
        mask = torch.cat([text_mask.new_ones(frames, queries.shape[1]), text_mask], dim=1)
        visual = self.bert_proj(tokens) if self.bert_proj is not None else tokens
        visual = self.ln(visual) if self.ln is not None else visual
        out = self.encoder(input_ids=text_ids, attention_mask=mask, query_embeds=queries,
                           encoder_hidden_states=visual).last_hidden_state
        return self.projector(out[:, :queries.shape[1]])

    def forward(self, tokens: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """tokens (F, T, Dv) with CLS, instruction ids + mask (F, L) -> (F, 1 + content_tokens, Dllm)."""
        text_q = self.text_queries(tokens, text_ids, text_mask)
        patches = without_cls(tokens)
        scores = text_q @ self.key_projector(patches).transpose(1, 2) / math.sqrt(patches.shape[-1])
        context = (scores.softmax(-1) @ patches).mean(dim=1, keepdim=True)     # (F, 1, Dv)
        content = pool_patches(patches, self.config.content_tokens)           # (F, C, Dv)
        return torch.cat([self.val_projector(context), self.mm_projector(content)], dim=1)


def pool_patches(patches: torch.Tensor, tokens: int) -> torch.Tensor:
    """(F, P, D) patches -> (F, tokens, D) content tokens, LLaMA-VID's `compress_type`:
    1 = "mean"; N x N = "grid:N" (average pooling, kernel = stride = side // N); P = no compression.
    """
    frames, count, dim = patches.shape
    if tokens == 1:
        return patches.mean(dim=1, keepdim=True)
    if tokens == count:
        return patches
    side, cells = math.isqrt(count), math.isqrt(tokens)
    stride = side // cells if cells else 0
    if side * side != count or cells * cells != tokens or not stride or side // stride != cells:
        raise ValueError(f"cannot pool {count} patches into {tokens} content tokens "
                         "(use 1, a square grid that divides the patch grid, or all patches)")
    grid = patches.transpose(1, 2).reshape(frames, dim, side, side)
    return F.avg_pool2d(grid, kernel_size=stride, stride=stride).flatten(2).transpose(1, 2)


def compress_type_to_tokens(compress_type: str | None, patch_count: int) -> int:
    """LLaMA-VID's `compress_type` (matched as a substring, as its code does) -> content tokens."""
    if compress_type and "grid" in compress_type:
        return int(compress_type.split("grid:")[-1]) ** 2
    if compress_type and "mean" in compress_type:
        return 1
    return patch_count
