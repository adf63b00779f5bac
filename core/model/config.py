"""EmoLlamaConfig: every size and name the model needs, saved as the checkpoint's config.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from core.labels import BASIC7

CONFIG_NAME = "config.json"
MODEL_TYPE = "emo-llama"


@dataclass
class EmoLlamaConfig:
    # Base parts: a hub id, an absolute folder, or a sub-folder of the checkpoint ("llm").
    llm: str = "lmsys/vicuna-7b-v1.5"
    vision: str = "openai/clip-vit-large-patch14-336"
    prior: str = "fer2013-mini-xception"   # the face prior network of core/faces.py
    prior_dim: int = 128                    # its global embedding size

    # LLaMA-VID: per frame one text-guided context token + `content_tokens` pooled patch tokens.
    num_frames: int = 8
    content_tokens: int = 1
    qformer_hidden: int = 768
    qformer_layers: int = 2
    qformer_heads: int = 12
    num_text_queries: int = 32

    # Face Info Mining: global tokens from the prior embedding, local tokens pooled around the
    # landmarks of the aligned face, aggregated by K learned queries.
    face_tokens: int = 8
    global_face_tokens: int = 2
    aggregator_layers: int = 2
    aggregator_heads: int = 8
    aggregator_hidden: int = 512
    landmark_roi: float = 0.18              # ROI side, as a fraction of the aligned crop

    # LoRA on the LLM only.
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    label_set: list[str] = field(default_factory=lambda: list(BASIC7))
    max_new_tokens: int = 96
    version: str = "base"                   # the model version name shown in every answer
    parent_version: str | None = None
    is_tiny: bool = False                   # a test fixture, never a trained model
    # Which frozen base (LLM + vision encoder weights) the adapter and modules were trained on.
    # Versions with the same base can share one loaded base (EmoLlama.load_version).
    base_id: str = ""
    model_type: str = MODEL_TYPE

    def tokens_per_frame(self) -> int:
        return 1 + self.content_tokens

    def visual_token_budget(self, num_frames: int, with_face: bool = True) -> int:
        """LLM input positions spent on media: frames x (context + content) + K face tokens."""
        return num_frames * self.tokens_per_frame() + (self.face_tokens if with_face else 0)

    def base_key(self) -> str | None:
        """Identity of the frozen base, or None when it cannot be told (parts in sub-folders
        without a recorded base_id: two such checkpoints may hold different weights)."""
        if self.base_id:
            return self.base_id
        if any("/" not in part for part in (self.llm, self.vision)):  # stored inside a checkpoint
            return None
        return f"{self.llm}|{self.vision}"

    def save(self, folder: str | Path) -> None:
        Path(folder, CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "EmoLlamaConfig":
        data = json.loads(Path(folder, CONFIG_NAME).read_text())
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type is {data.get('model_type')!r}, not {MODEL_TYPE!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
