"""The vision side of LLaMA-VID: a frozen encoder, one context token and content tokens per frame.

For each frame:
  patches  = frozen vision encoder (CLIP / SigLIP / EVA: any transformers vision model)
  context  = text-guided: a Q-Former reads learned queries + the instruction and cross-attends to
             the patches, giving text queries Q; the context token is mean(softmax(Q P^T) P)
             (LLaMA-VID's "context attention"), projected into the LLM.
  content  = the patches average-pooled to `content_tokens` tokens, projected into the LLM.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, Blip2QFormerConfig, Blip2QFormerModel

from core.model.config import EmoLlamaConfig


def load_vision_encoder(name_or_path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers vision encoder; a full CLIP/SigLIP checkpoint gives its vision half.

    For a two-tower checkpoint (CLIP, SigLIP) only the vision tower's class is built, so the
    text tower's weights are never materialised.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(name_or_path)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None and type(vision_config) in MODEL_MAPPING:
        model = MODEL_MAPPING[type(vision_config)].from_pretrained(name_or_path, config=vision_config,
                                                                   dtype=dtype)
    else:
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype)
    return getattr(model, "vision_model", model)


def patch_features(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, P, D) patch features, without a CLS token when the encoder has one."""
    hidden = encoder(pixel_values=pixel_values).last_hidden_state
    side = math.isqrt(hidden.shape[1])
    return hidden if side * side == hidden.shape[1] else hidden[:, 1:]


def projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """LLaVA's two-layer MLP projector."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class FrameTokens(nn.Module):
    """Context + content tokens for each frame (LLaMA-VID), in the LLM's embedding space."""

    def __init__(self, config: EmoLlamaConfig, vision_dim: int, llm_dim: int):
        super().__init__()
        self.config = config
        q = config.qformer_hidden
        self.queries = nn.Parameter(torch.randn(1, config.num_text_queries, q) * 0.02)
        self.text_in = nn.Linear(llm_dim, q)   # instruction embeddings (from the LLM) -> Q-Former
        self.qformer = Blip2QFormerModel(Blip2QFormerConfig(
            hidden_size=q, num_hidden_layers=config.qformer_layers,
            num_attention_heads=config.qformer_heads, intermediate_size=4 * q,
            encoder_hidden_size=vision_dim, cross_attention_frequency=1, vocab_size=2,
            use_qformer_text_input=True))  # feed-forward for the instruction tokens too
        self.query_to_vision = nn.Linear(q, vision_dim)
        self.context_proj = projector(vision_dim, llm_dim)
        self.content_proj = projector(vision_dim, llm_dim)

    def forward(self, patches: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """patches (F, P, Dv), text (F, T, Dllm) + mask (F, T) -> (F, 1 + content_tokens, Dllm)."""
        frames = patches.shape[0]
        queries = self.queries.expand(frames, -1, -1)
        n_queries = queries.shape[1]
        q_in = torch.cat([queries, self.text_in(text)], dim=1)
        mask = torch.cat([torch.ones(frames, n_queries, dtype=text_mask.dtype, device=text_mask.device),
                          text_mask], dim=1)
        # Cross-attention to the patches only for the learned queries (query_length), as in
        # InstructBLIP; the instruction tokens steer them through self-attention.
        text_queries = self.qformer(query_embeds=q_in, query_length=n_queries, attention_mask=mask,
                                    encoder_hidden_states=patches).last_hidden_state[:, :n_queries]
        q = self.query_to_vision(text_queries)                                # (F, M, Dv)
        attention = torch.softmax(q @ patches.transpose(1, 2) / math.sqrt(patches.shape[-1]), dim=-1)
        context = (attention @ patches).mean(dim=1, keepdim=True)              # (F, 1, Dv)
        content = pool_patches(patches, self.config.content_tokens)            # (F, C, Dv)
        return torch.cat([self.context_proj(context), self.content_proj(content)], dim=1)


def pool_patches(patches: torch.Tensor, tokens: int) -> torch.Tensor:
    """(F, P, D) patches -> (F, tokens, D) content tokens: average pooling over the patch grid.

    A square `tokens` (1, 4, 16, 64...) pools the 2-D grid into that many cells, row by row, so
    each content token covers one region of the frame; any other count pools the patch sequence.
    """
    frames, count, dim = patches.shape
    side, cells = math.isqrt(count), math.isqrt(tokens)
    if side * side == count and cells * cells == tokens:
        grid = patches.transpose(1, 2).reshape(frames, dim, side, side)
        return F.adaptive_avg_pool2d(grid, cells).flatten(2).transpose(1, 2)
    return F.adaptive_avg_pool1d(patches.transpose(1, 2), tokens).transpose(1, 2)
