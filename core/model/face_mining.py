"""Face Info Mining (FIM) and the clue aggregator of EMO-LLaMA.

Clues per face:
  global: the face prior network's embedding (core/faces.py: FER2013 mini-Xception, 128-d),
          mapped to `global_face_tokens` tokens;
  local:  features of the aligned face, ROI-pooled from the vision encoder's patch map around the
          landmarks — eyes, brows (above the eyes), nose, mouth corners and mouth centre.
The clue aggregator (Q-Former style: K learned queries, cross-attention over the clues of all
faces/frames) emits K face tokens in the LLM's embedding space.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import roi_align

from core.model.config import EmoLlamaConfig
from core.model.vision import projector

ALIGNED_SIZE = 112.0


def facial_regions(landmarks: torch.Tensor) -> torch.Tensor:
    """(5, 2) aligned landmarks -> (8, 2) region centres: eyes, brows, nose, mouth corners, mouth."""
    left_eye, right_eye, nose, mouth_left, mouth_right = landmarks
    eye_gap = (right_eye - left_eye).norm()
    up = torch.stack([torch.zeros_like(eye_gap), -0.35 * eye_gap])
    return torch.stack([left_eye, right_eye, left_eye + up, right_eye + up, nose,
                        mouth_left, mouth_right, (mouth_left + mouth_right) / 2])


class AggregatorLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, queries: torch.Tensor, clues: torch.Tensor) -> torch.Tensor:
        x = self.norms[0](queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        x = self.norms[1](queries)
        queries = queries + self.cross_attn(x, clues, clues, need_weights=False)[0]
        return queries + self.mlp(self.norms[2](queries))


class FaceInfoMining(nn.Module):
    def __init__(self, config: EmoLlamaConfig, vision_dim: int, llm_dim: int):
        super().__init__()
        self.config = config
        d = config.aggregator_hidden
        self.global_proj = nn.Linear(config.prior_dim, config.global_face_tokens * d)
        self.local_proj = nn.Linear(vision_dim, d)
        self.region_embed = nn.Parameter(torch.randn(8, d) * 0.02)   # which region a clue is from
        self.queries = nn.Parameter(torch.randn(1, config.face_tokens, d) * 0.02)
        self.layers = nn.ModuleList(AggregatorLayer(d, config.aggregator_heads)
                                    for _ in range(config.aggregator_layers))
        self.out = projector(d, llm_dim)

    def local_features(self, face_patches: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """ROI-pool the patch map of each aligned face around its regions: (N, 8, Dv)."""
        n, p, dv = face_patches.shape
        side = math.isqrt(p)
        # roi_align has no bfloat16 kernels, and box corners need more precision than bf16 has
        # (92.2 px -> 92.0): pool in float32, hand back the encoder's dtype.
        feature_map = face_patches.transpose(1, 2).reshape(n, dv, side, side).float()
        scale = side / ALIGNED_SIZE
        half = self.config.landmark_roi * ALIGNED_SIZE / 2
        boxes = []
        for i in range(n):
            centres = facial_regions(landmarks[i].float())
            index = torch.full((8, 1), float(i), device=feature_map.device)
            boxes.append(torch.cat([index, centres - half, centres + half], dim=1))
        pooled = roi_align(feature_map, torch.cat(boxes), output_size=2,
                           spatial_scale=scale, sampling_ratio=2, aligned=True)
        return pooled.mean(dim=(2, 3)).reshape(n, 8, dv).to(face_patches.dtype)

    def forward(self, prior_embeddings: torch.Tensor, face_patches: torch.Tensor,
                landmarks: torch.Tensor) -> torch.Tensor:
        """Clues of the N faces of ONE request -> (K, Dllm) face tokens."""
        n = prior_embeddings.shape[0]
        d = self.config.aggregator_hidden
        global_clues = self.global_proj(prior_embeddings).reshape(n * self.config.global_face_tokens, d)
        local_clues = (self.local_proj(self.local_features(face_patches, landmarks))
                       + self.region_embed).reshape(n * 8, d)
        clues = torch.cat([global_clues, local_clues])[None]
        queries = self.queries
        for layer in self.layers:
            queries = layer(queries, clues)
        return self.out(queries)[0]
