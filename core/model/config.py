"""EmoLlamaConfig: every size and name the model needs, saved as the checkpoint's config.json;
and where a checkpoint is (a folder, or a hub id fetched into the cache). No torch here."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from core.errors import ModelLoadError
from core.labels import BASIC7
from core.model.recipe import DEFAULT_CATEGORY_PHRASING, DEFAULT_CONVERSATION_PHRASINGS
from core.priors import DEFAULT_PRIOR

CONFIG_NAME = "config.json"
ZERO_SHOT = "zero-shot:"  # a version spec "zero-shot:ID": the released VLM ID as it is (core/model/vlm.py)
MODEL_TYPE = "emo-llama"


@dataclass
class EmoLlamaConfig:
    # Base parts: a hub id, an absolute folder, or a sub-folder of the checkpoint ("llm").
    llm: str = "lmsys/vicuna-7b-v1.5"
    vision: str = "openai/clip-vit-large-patch14-336"
    prior: str = DEFAULT_PRIOR              # the face prior network (core/priors.py)
    prior_dim: int = 128                    # its global embedding size

    # LLaMA-VID: per frame one text-guided context token + `content_tokens` pooled patch tokens
    # (1 = its compress_type "mean", N*N = "grid:N", the patch count = no compression).
    num_frames: int = 8
    content_tokens: int = 1
    vision_select_layer: int = -2           # CLIP/SigLIP: LLaVA's penultimate layer (EVA: its last built)
    # The instruction-aware Q-Former: InstructBLIP's BERT (LLaMA-VID's bert_type qformer_pretrain).
    num_text_queries: int = 32
    qformer_hidden: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    qformer_vocab: int = 30523              # bert-base-uncased + LLaMA-VID's [DEC]
    qformer_max_positions: int = 512
    qformer_cross_attention_frequency: int = 2
    qformer_encoder_width: int = 1408       # EVA ViT-g, what the pretrained Q-Former reads
    qformer_vision_ln: bool = True          # LLaMA-VID's vlm_att_ln (InstructBLIP's ln_vision)
    qformer_tokenizer: str = "qformer_tokenizer"   # sub-folder or hub id (bert-base-uncased)
    qformer_max_text: int = 256             # instruction truncated from the left

    # Face Info Mining: global tokens from the prior embedding, local tokens pooled around the
    # landmarks of the aligned face, aggregated by K learned queries.
    use_fim: bool = True                    # off: frame tokens only (LLaMA-VID as released)
    use_agr: bool = True                    # off: no age/gender/race sentence in the prompt
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

    # The recipe: one set of choices that export, training, evaluation and the engine all read
    # from the checkpoint (core/model/recipe.py), so what a version was trained on is what it
    # is asked at serving time.
    template: str = ""                      # conversation template (core/model/templates.py)
    max_new_tokens: int = 320               # room for the 3-5 sentence explanations
    label_scoring: str = "mean"             # option log-likelihood: "mean" per token | "sum"
    label_temperature: float = 1.0          # fitted on the validation split by `evaluate`
    pad_to_square: bool = False             # LLaMA-VID's eval scripts pad; its CLI does not
    # The free-form questions trained on; the first is what serving and evaluation ask.
    conversation_phrasings: list[str] = field(default_factory=lambda: list(DEFAULT_CONVERSATION_PHRASINGS))
    category_phrasing: str = DEFAULT_CATEGORY_PHRASING   # "{medium}", "{options}" filled in

    # LLM weights inside a GGUF file of the `llm` folder (transformers' gguf_file=).
    llm_gguf_file: str = ""
    # A released vision-language model as the base (core/model/vlm.py): its hub id or folder;
    # "" = the LLaMA-VID path above. `zero_shot`: that VLM as released (no FIM, no LoRA).
    vlm: str = ""
    zero_shot: bool = False
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
        return num_frames * self.tokens_per_frame() + (self.face_tokens if with_face and self.use_fim else 0)

    def base_key(self) -> str | None:
        """Identity of the frozen base, or None when it cannot be told (parts in sub-folders
        without a recorded base_id: two such checkpoints may hold different weights)."""
        if self.base_id:
            return self.base_id
        if any("/" not in part for part in (self.llm, self.vision)):  # stored inside a checkpoint
            return None
        # Two GGUF files of one folder (e.g. two quantisations) are two different bases.
        llm = f"{self.llm}#{self.llm_gguf_file}" if self.llm_gguf_file else self.llm
        return f"{llm}|{self.vision}"

    def save(self, folder: str | Path) -> None:
        Path(folder, CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "EmoLlamaConfig":
        data = json.loads(Path(folder, CONFIG_NAME).read_text())
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type is {data.get('model_type')!r}, not {MODEL_TYPE!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder as-is; otherwise a hub id fetched (or read from the cache) by huggingface_hub."""
    path = Path(name_or_path)
    if path.is_dir() and not (path / CONFIG_NAME).exists():
        raise ModelLoadError(f"{path}: no {CONFIG_NAME}; build one with `python app.py build-model`")
    return local_or_hub(name_or_path, "checkpoint folder", ModelLoadError)


def local_or_hub(name_or_path: str | Path, what: str, error: type[Exception]) -> Path:
    """A local folder as-is; "org/name" a hub repository fetched (or read from the cache) by
    huggingface_hub; anything else, or a failed fetch, raises `error` in one line."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
        raise error(f"{name_or_path}: no such {what}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path)))
    except Exception as exc:
        raise error(f"{name_or_path}: cannot fetch from the Hugging Face hub "
                    f"({type(exc).__name__}); pass a local folder instead") from None


def zero_shot_id(spec) -> str | None:
    """"zero-shot:ID" -> "ID"; None for any other spec."""
    spec = str(spec)
    return spec[len(ZERO_SHOT):] if spec.startswith(ZERO_SHOT) else None
