"""EMO-LLaMA on a released vision-language model: the base's own vision pathway, projector, chat
template and image tokens, plus Face Info Mining tokens, the AGR sentence and LoRA on its LM.

    python app.py build-model --from-vlm llava-hf/llava-1.5-7b-hf --out checkpoints/llava   # FIM + AGR + LoRA
    python app.py predict photo.jpg --model checkpoints/llava
    python app.py predict photo.jpg --model zero-shot:HuggingFaceTB/SmolVLM-256M-Instruct  # as released

    model = load_model("zero-shot:HuggingFaceTB/SmolVLM-256M-Instruct")   # core/model/loading.py

Families (transformers' AutoModelForImageTextToText / AutoProcessor): LLaVA-1.5 ("llava"),
Idefics3 / SmolVLM ("idefics3"), Qwen2.5-VL ("qwen2_5_vl", its 3-D rotary positions from the
base's own get_rope_index) and LLaVA-OneVision ("llava_onevision"). The processor applies the
base's chat template and expands its image tokens; the base computes the image features
(`get_image_features`), which go where its image tokens are, as in the base's own forward.
EMO-LLaMA adds K face tokens right after the last image token (K positions whose embeddings are
FIM's output), the AGR sentence before the question in the user text, and LoRA on the language
model only (never the vision tower).

A video is its frames as that many images in one user turn (VLM_NUM_FRAMES by default; the
native video paths of Qwen2.5-VL and OneVision are not used). The face crops for FIM go through the
base's own image pathway too (one view each, no tiling), so FIM's local clues are LM-width.
Everything after the embeddings is EmoLlama's own (core/model/modeling.py): scoring, generation,
the training loss, adapters.

A checkpoint folder: config.json (`vlm` names the base by hub id or folder), emo_modules.safetensors
(FIM), adapter/ (LoRA, peft format) and processor/ (processor, tokenizer, chat template).
"""
from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import ModelLoadError
from core.model.config import ZERO_SHOT, EmoLlamaConfig, local_or_hub
from core.model.face_mining import FaceInfoMining
from core.model.modeling import (ADAPTER_DIR, MODULES_FILE, EmoInput, EmoLlama, PreparedMedia,
                                 _link_or_copy, bitsandbytes_config)
from core.model.vision import patch_grid

TINY_MARKER = "EMO_TINY_TEST_FIXTURE"   # a file in a tiny random base folder (build_tiny_vlm)
FAMILIES = ("llava", "idefics3", "qwen2_5_vl", "llava_onevision")
VLM_NUM_FRAMES = 4                      # frames of a video, each a full image's worth of tokens
# Per family: what the face crops need from its image processor (one image each, no tiling).
_FACE_KWARGS = {"llava": {}, "idefics3": {"do_image_splitting": False}, "qwen2_5_vl": {}, "llava_onevision": {}}
# Per-prompt tensors of the processor that are not image inputs.
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@dataclass
class VlmInput(EmoInput):
    """EmoInput whose before_ids end with the base's last image token (its image tokens expanded
    by the processor) and whose `image_inputs` are the processor's tensors for the base's
    `get_image_features` (pixel_values, pixel_attention_mask, ...)."""
    image_inputs: dict = field(default_factory=dict)
    face_inputs: dict | None = None   # the aligned faces through the image processor (for FIM)


class VlmMedia(PreparedMedia):
    """One request's frames and faces; the processor's image tensors are kept from the first
    prompt prepared from it (the base expands image tokens per prompt, the pixels are the same)."""

    def __init__(self, kind, frames, face_inputs, face_landmarks, prior_embeddings, attributes=None):
        # pixel_values: set from the first prompt's processor pass (prepare)
        super().__init__(kind, torch.empty(len(frames), 0),
                         None if face_inputs is None else face_inputs["pixel_values"],
                         face_landmarks, prior_embeddings, attributes)
        self.frames, self.face_inputs = list(frames), face_inputs
        self.image_inputs: dict | None = None

    def __len__(self) -> int:
        return len(self.frames)


def family_of(model_type: str) -> str:
    if model_type in ("llava",):
        return "llava"
    if model_type in ("idefics3", "smolvlm"):
        return "idefics3"
    if model_type in ("qwen2_5_vl", "llava_onevision"):
        return model_type
    raise ModelLoadError(f"VLM family {model_type!r} is not supported; use one of: LLaVA-1.5 (llava), "
                         "Idefics3 / SmolVLM (idefics3), Qwen2.5-VL (qwen2_5_vl), LLaVA-OneVision "
                         "(llava_onevision)")


def _language_model_prefix(vlm: nn.Module) -> str:
    """The module path of the base's language model ("model.language_model", "model.text_model")."""
    decoder = vlm.get_decoder()
    return next(name for name, module in vlm.named_modules() if module is decoder)


def vlm_lora_config(config: EmoLlamaConfig, vlm: nn.Module):
    """LoRA on the language model's `lora_targets` only: the vision tower has q_proj/v_proj too."""
    from peft import LoraConfig

    prefix = re.escape(_language_model_prefix(vlm))
    targets = "|".join(re.escape(t) for t in config.lora_targets)
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=rf"^{prefix}\..*\.({targets})$", task_type="CAUSAL_LM")


class VlmEmoLlama(EmoLlama):
    """EmoLlama whose media tokens are a released VLM's own image tokens (+ FIM tokens)."""

    def __init__(self, config: EmoLlamaConfig, llm: nn.Module, processor, source_dir: str | Path | None = None,
                 adapter_name: str = "default", llm_lock: threading.RLock | None = None):
        nn.Module.__init__(self)  # not EmoLlama's: no LLaMA-VID frame tokens, no Q-Former
        self.config, self.llm, self.processor = config, llm, processor
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.source_dir = Path(source_dir) if source_dir else None
        self.adapter_name, self._llm_lock, self._released = adapter_name, llm_lock or threading.RLock(), False
        self.vlm = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        self.family = family_of(self.vlm.config.model_type)
        self.image_token_id = int(getattr(self.vlm.config, "image_token_id", None)
                                  or self.vlm.config.image_token_index)
        # The frozen vision side (tower + projector) is not trained and never in training mode.
        inner = self.vlm.model
        self.vision = next(getattr(inner, n) for n in ("vision_tower", "vision_model", "visual") if hasattr(inner, n))
        dim = self.vlm.get_input_embeddings().embedding_dim
        # FIM's local clues come from the base's own projected image features of the face crop,
        # so their width is the LM's.
        self.fim = FaceInfoMining(config, dim, dim) if config.use_fim else None
        self.vision.requires_grad_(False)
        self.vision.eval()
        self._answer_start, self._end_id = self._answer_layout()
        # Qwen2.5-VL's rotary positions are 3-D over its image tokens (get_rope_index); the
        # prompts' positions go from batch_prompt_embeddings to the pass that runs them.
        self.mrope = self.family == "qwen2_5_vl"
        self._mrope = threading.local()

    def trainable_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"fim": self.fim} if self.fim is not None else {})

    # ------------------------------------------------------------------ chat template
    def _chat(self, text: str | None, images: int, answer: str | None = None) -> str:
        content = [{"type": "image"} for _ in range(images)]
        if text is not None:
            content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)

    def _answer_layout(self) -> tuple[str, int]:
        """(what the chat template puts between the generation prompt and an answer, the id of
        the token that ends an answer: the first special token after it, else EOS)."""
        probe = "QZXJ"
        prompt, full = self._chat("hi", 1), self._chat("hi", 1, probe)
        start = full.rindex(probe)
        # A template whose assistant turn does not continue its generation prompt (OneVision's
        # "assistant " vs "assistant\n"): the answer follows the generation prompt directly.
        lead = full[len(prompt):start] if full.startswith(prompt) else ""
        # LLaVA-1.5 closes an answer with " " and no special token: there EOS ends it.
        after = full[start + len(probe):].lstrip()
        end = max((t for t in self.tokenizer.all_special_tokens if t and after.startswith(t)), key=len, default=None)
        end_id = self.tokenizer.convert_tokens_to_ids(end) if end else self.tokenizer.eos_token_id
        if end_id is None:
            raise ModelLoadError("cannot tell which token ends an answer in this VLM's chat template")
        return lead, int(end_id)

    # ------------------------------------------------------------------ inputs
    def _to_model(self, tensors: dict) -> dict:
        return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in tensors.items()}

    def prepare_media(self, frames: list[np.ndarray], faces: list[list]) -> VlmMedia:
        """Frames (RGB uint8) + per-frame faces, largest first; see EmoLlama.prepare_media."""
        main_faces, attributes = self._main_faces(frames, faces)
        face_inputs = landmarks = priors = None
        if main_faces and self.fim is not None:
            face_inputs = dict(self.image_processor(images=[[f.aligned for f in main_faces]], return_tensors="pt",
                                                    **_FACE_KWARGS[self.family]))
            landmarks = torch.tensor(np.stack([f.aligned_landmarks for f in main_faces]), dtype=torch.float32)
            priors = torch.from_numpy(np.stack([self._prior_vector(f) for f in main_faces]))
        return VlmMedia("image" if len(frames) == 1 else "video", frames, face_inputs, landmarks, priors, attributes)

    def prepare(self, frames: "list[np.ndarray] | VlmMedia", faces: list[list], question: str) -> VlmInput:
        """The base's chat template around [images] + AGR sentence + question, image tokens
        expanded by its processor; the K face tokens go right after the last image token."""
        from core.model.prompt import agr_sentence

        media = frames if isinstance(frames, VlmMedia) else self.prepare_media(frames, faces)
        text = "\n".join(p for p in (agr_sentence(media.attributes), question.strip()) if p)
        out = self.processor(text=[self._chat(text, len(media))], images=[media.frames], return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        if media.image_inputs is None:
            media.image_inputs = {k: v for k, v in out.items() if k not in _TEXT_KEYS}
            media.pixel_values = media.image_inputs["pixel_values"]
        last = max(i for i, t in enumerate(ids) if t == self.image_token_id) + 1
        return VlmInput(kind=media.kind, pixel_values=media.pixel_values, before_ids=ids[:last],
                        after_ids=ids[last:], question_ids=[], face_pixels=media.face_pixels,
                        face_landmarks=media.face_landmarks, prior_embeddings=media.prior_embeddings,
                        media=media, image_inputs=media.image_inputs, face_inputs=media.face_inputs)

    # ------------------------------------------------------------------ embeddings
    def frozen_features(self, x: VlmInput) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's frozen features: (image tokens (T, D) in LM space, face crops
        (N, P, D) or (0, 0, D)), what PreparedMedia.keep_features caches (the trainer too)."""
        with torch.no_grad():
            frames = torch.cat(list(self.vlm.get_image_features(**self._to_model(x.image_inputs)).pooler_output))
            if x.face_inputs is not None and self.fim is not None and self.family == "llava_onevision":
                faces = self._base_view_features(x.face_inputs["pixel_values"])
            elif x.face_inputs is not None and self.fim is not None:
                n = x.face_landmarks.shape[0]
                faces = torch.cat(list(self.vlm.get_image_features(
                    **self._to_model(x.face_inputs)).pooler_output)).reshape(n, -1, frames.shape[-1])
            else:
                faces = frames.new_zeros(0, 0, frames.shape[-1])
        return frames, faces

    def _base_view_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """LLaVA-OneVision: each face crop's base view (its first tile) through the tower and the
        projector as the base's get_image_features does, without AnyRes tiling and the newline
        token (a 112-pixel face gains nothing from tiles): (N, P, D)."""
        config = self.vlm.config
        inner = self.vlm.model
        hidden = inner.vision_tower(pixels[:, 0].to(self.device, self.dtype), output_hidden_states=True)
        layer = config.vision_feature_layer
        if isinstance(layer, int):
            selected = hidden.hidden_states[layer]
        else:
            selected = torch.cat([hidden.hidden_states[i] for i in layer], dim=-1)
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        return inner.multi_modal_projector(selected)

    def _vision_features(self, batch: list[VlmInput]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each request's frozen features; prompts of one VlmMedia share one vision pass (its
        cache), each new media runs through the base alone (tile counts differ per image)."""
        seen: dict[int, tuple] = {}
        for x in batch:
            owner = x.media if x.media is not None else x
            if id(owner) in seen:
                continue
            cached = x.media.cached_features(self.vision, self.dtype) if x.media is not None else None
            if cached is None:
                cached = self.frozen_features(x)
                if x.media is not None:
                    x.media.keep_features(self.vision, self.dtype, *cached)
            seen[id(owner)] = cached
        return [seen[id(x.media if x.media is not None else x)] for x in batch]

    def encode_media(self, batch: list[VlmInput]) -> list[torch.Tensor]:
        """Each request's FIM face tokens (K, D), or (0, D) without FIM or without a face."""
        out = []
        for x, (_, faces) in zip(batch, self._vision_features(batch)):
            if self.fim is not None and x.face_pixels is not None:
                out.append(self.fim(x.prior_embeddings.to(self.device, self.dtype), patch_grid(faces),
                                    x.face_landmarks.to(self.device)))
            else:
                out.append(torch.zeros(0, self.llm.get_input_embeddings().embedding_dim,
                                       device=self.device, dtype=self.dtype))
        return out

    def batch_prompt_embeddings(self, batch: list[VlmInput]) -> list[torch.Tensor]:
        """Each request's prompt as the base embeds it (ids, image features scattered at its image
        tokens), with the face tokens inserted right after the last image token."""
        prompts, positions = [], []
        for x, (frames, _), face in zip(batch, self._vision_features(batch), self.encode_media(batch)):
            ids = torch.tensor(x.before_ids + x.after_ids, device=self.device)
            embeds = self._embed_ids(x.before_ids + x.after_ids)
            image = (ids == self.image_token_id)[:, None]
            if int(image.sum()) != frames.shape[0]:
                raise ValueError(f"{int(image.sum())} image tokens but {frames.shape[0]} image features")
            embeds = embeds.masked_scatter(image, frames.to(embeds.dtype))
            cut = len(x.before_ids)
            prompts.append(torch.cat([embeds[:cut], face.to(embeds.dtype), embeds[cut:]]))
            if self.mrope:
                positions.append(self._rope_positions(x, face.shape[0]))
        if self.mrope:
            self._mrope.positions = positions
        return prompts

    # ------------------------------------------------------------------ Qwen2.5-VL positions
    def _rope_positions(self, x: VlmInput, faces: int) -> torch.Tensor:
        """(3, T) rotary positions of one prompt as the base's get_rope_index gives them, the
        face tokens counted as text right after the image."""
        cut = len(x.before_ids)
        ids = torch.tensor(x.before_ids + [0] * faces + x.after_ids, device=self.device)
        types = (ids == self.image_token_id).int()
        types[cut:cut + faces] = 0
        positions, _ = self.vlm.model.get_rope_index(ids[None], mm_token_type_ids=types[None],
                                                     image_grid_thw=x.image_inputs["image_grid_thw"].to(self.device))
        return positions[:, 0]

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, **kwargs):
        if not self.mrope:
            return super()._run(embeds, mask, **kwargs)
        # Each left-padded row: its prompt's 3-D positions, then its appended text (answers)
        # one by one after the prompt's largest position, as the base continues a sequence.
        prompts = self._mrope.positions
        positions = torch.zeros(3, *mask.shape, dtype=torch.long, device=self.device)
        deltas = []
        for row, prompt in enumerate(prompts):
            real = int(mask[row].sum())
            extra = torch.arange(1, real - prompt.shape[1] + 1, device=self.device) + prompt.max()
            positions[:, row, mask.shape[1] - real:] = torch.cat([prompt, extra.expand(3, -1)], dim=1)
            deltas.append(int(prompt.max()) + 1 - prompt.shape[1])
        self._mrope.deltas = torch.tensor(deltas, device=self.device)
        return self._call_llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs)

    def score_labels(self, batch, label_set, *, raw=False):
        if not self.mrope:
            return super().score_labels(batch, label_set, raw=raw)
        self._mrope.options = True  # the option pass continues each prompt at its rope delta
        try:
            return super().score_labels(batch, label_set, raw=raw)
        finally:
            self._mrope.options = False

    def prefill(self, batch):
        out = super().prefill(batch)
        if not self.mrope:
            return out
        # Decoding goes on in text positions, each row shifted by its prompt's rope delta.
        return out._replace(positions=out.positions + self._mrope.deltas[:, None])

    # ------------------------------------------------------------------ answers
    def answer_ids(self, answer: str) -> list[int]:
        """An answer's tokens as they follow the generation prompt in the base's chat template
        (" answer" after "ASSISTANT:"), + the token that ends an answer there."""
        head = self._chat("hi", 1)[-16:]  # the generation prompt's end, for a context-true split
        both, alone = self._ids(head + self._answer_start + answer), self._ids(head)
        ids = both[len(alone):] if both[:len(alone)] == alone else self._ids(self._answer_start + answer)
        return ids + [self._end_id]

    def stop_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id, self._end_id}
        configured = getattr(getattr(self.vlm, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    def token_budget(self, kind: str = "image", num_frames: int = 1, question: str | None = None) -> dict:
        """LLM input positions for one request of 480x640 frames: image + face tokens + text."""
        from core.model.prompt import category_question

        question = question or category_question(self.config.label_set, kind, self.config)
        x = self.prepare([np.zeros((480, 640, 3), np.uint8)] * num_frames, [[]] * num_frames, question)
        ids = x.before_ids + x.after_ids
        images = sum(1 for t in ids if t == self.image_token_id)
        face = self.config.face_tokens if self.fim is not None else 0
        return {"frames": num_frames, "media": images + face, "text": len(ids) - images,
                "total": len(ids) + face}

    def _call_llm(self, **kwargs):
        if self.mrope and getattr(self._mrope, "options", False) and kwargs["position_ids"].ndim == 2:
            rows = kwargs["position_ids"].shape[0]
            deltas = self._mrope.deltas
            kwargs["position_ids"] = kwargs["position_ids"] + deltas.repeat_interleave(rows // len(deltas))[:, None]
        if self.config.zero_shot:  # the base as released: no adapter to activate
            if self._released:
                raise RuntimeError(f"version {self.version} was released")
            with self._llm_lock:
                return self.llm(**kwargs)
        return super()._call_llm(**kwargs)

    # ------------------------------------------------------------------ saving / loading
    def save_pretrained(self, folder: str | Path, version: str | None = None) -> Path:
        """config.json, emo_modules.safetensors (FIM), adapter/ and processor/ (see the module
        docstring); the base stays where `config.vlm` names it (a sub-folder is hard-linked)."""
        import shutil

        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self.config.zero_shot:
            raise ModelLoadError("a zero-shot model has nothing trained to save; build a checkpoint with "
                                 "`python app.py build-model --from-vlm ID --out DIR`")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if version:
            self.config.version = version
        part = self.config.vlm
        inside = "/" not in part and not Path(part).is_absolute()  # a base kept inside its checkpoint
        if inside and self.source_dir and (self.source_dir / part).is_dir() and not (folder / part).exists():
            shutil.copytree(self.source_dir / part, folder / part, copy_function=_link_or_copy)
        self.config.save(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.trainable_modules().state_dict().items()},
                  folder / MODULES_FILE)
        adapter_dir = folder / ADAPTER_DIR
        adapter_dir.mkdir(exist_ok=True)
        adapter = get_peft_model_state_dict(self.llm, adapter_name=self.adapter_name)
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()},
                  adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
        adapter_config = copy.deepcopy(self.llm.peft_config[self.adapter_name])
        adapter_config.inference_mode = True
        adapter_config.save_pretrained(str(adapter_dir))
        self.processor.save_pretrained(folder / "processor")
        return folder

    @classmethod
    def from_parts(cls, config: EmoLlamaConfig, folder: Path | None = None, trainable: bool = False,
                   dtype: torch.dtype | None = None, quantization: str | None = None,
                   device: str | torch.device = "cpu") -> "VlmEmoLlama":
        """The base VLM named by `config.vlm` + (when the folder has them) trained weights."""
        from peft import PeftModel, get_peft_model
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        base = config.vlm
        if folder is not None and "/" not in base and not Path(base).is_absolute():
            base = str(folder / base)
        base_dir = str(local_or_hub(base, "VLM", ModelLoadError))
        quantized = ({"quantization_config": bitsandbytes_config(quantization, dtype),
                      "device_map": {"": str(device)}} if quantization else {})
        vlm = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=dtype, **quantized)
        family_of(vlm.config.model_type)  # an unsupported family fails here, in one line
        processor_dir = folder / "processor" if folder is not None and (folder / "processor").exists() else base_dir
        processor = AutoProcessor.from_pretrained(str(processor_dir))
        vlm.requires_grad_(False)
        if config.zero_shot:
            llm = vlm
        elif folder is not None and (folder / ADAPTER_DIR).exists():
            llm = PeftModel.from_pretrained(vlm, str(folder / ADAPTER_DIR), is_trainable=trainable)
        else:
            llm = get_peft_model(vlm, vlm_lora_config(config, vlm))
        model = cls(config, llm, processor, source_dir=folder)
        if folder is not None and (folder / MODULES_FILE).exists() and model.fim is not None:
            model.trainable_modules().load_state_dict(load_file(folder / MODULES_FILE))
        model.trainable_modules().requires_grad_(trainable or folder is None)
        return model

    @classmethod
    def zero_shot(cls, vlm: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  quantization: str | None = None) -> "VlmEmoLlama":
        """A released VLM as it is: its chat template, no FIM, no AGR, no LoRA; version "zero-shot:ID"."""
        if not vlm.strip():
            raise ModelLoadError(f"{ZERO_SHOT} names no VLM: use {ZERO_SHOT}ORG/NAME (a hub id) or {ZERO_SHOT}FOLDER")
        config = vlm_config(vlm, zero_shot=True, use_fim=False, use_agr=False, version=f"{ZERO_SHOT}{vlm}")
        try:
            model = cls.from_parts(config, None, dtype=dtype, quantization=quantization, device=device)
        except ModelLoadError:
            raise
        except Exception as exc:  # not a VLM folder, corrupt weights, ...: one line, its first
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ModelLoadError(f"{ZERO_SHOT}{vlm}: cannot load the VLM ({type(exc).__name__}: {first})") from None
        model.trainable_modules().requires_grad_(False)
        if quantization is None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    def load_version(self, name_or_path: str | Path, trainable: bool = False) -> "VlmEmoLlama":
        """Another version on this model's loaded VLM (its adapter and FIM only; see
        EmoLlama.load_version). A version on another base, or a zero-shot base (it has no
        adapters to switch), raises ModelLoadError "built on base ...": Engine.swap then loads it
        in full."""
        from safetensors.torch import load_file
        from transformers import AutoProcessor

        from core.model.modeling import _adapter_names, _load_config, resolve_checkpoint

        folder = resolve_checkpoint(name_or_path)
        config = _load_config(folder, name_or_path)
        mine, theirs = self.config.base_key(), config.base_key()
        if self.config.zero_shot or not config.vlm or mine != theirs:
            raise ModelLoadError(f"{name_or_path}: built on base {theirs or 'unknown'}, not on the loaded "
                                 f"base {mine if not self.config.zero_shot else 'zero-shot ' + mine}; "
                                 "load it with from_pretrained")
        adapter_name = f"version_{next(_adapter_names)}"
        try:
            with self._llm_lock:
                self.llm.load_adapter(str(folder / ADAPTER_DIR), adapter_name=adapter_name,
                                      is_trainable=trainable, autocast_adapter_dtype=False)
            for name, p in self.llm.named_parameters():
                if f".{adapter_name}." in name:
                    p.data = p.data.to(self.dtype)
            processor = (AutoProcessor.from_pretrained(str(folder / "processor"))
                         if (folder / "processor").exists() else self.processor)
            other = type(self)(config, self.llm, processor, source_dir=folder, adapter_name=adapter_name,
                               llm_lock=self._llm_lock)
            if other.fim is not None:
                other.trainable_modules().load_state_dict(load_file(folder / MODULES_FILE))
            other.trainable_modules().to(device=self.device, dtype=self.dtype).requires_grad_(trainable)
        except Exception as exc:
            with self._llm_lock:
                if adapter_name in self.llm.peft_config:
                    self.llm.delete_adapter(adapter_name)
            raise ModelLoadError(f"{name_or_path}: cannot load the version "
                                 f"({type(exc).__name__}: {exc})") from None
        return other.train(trainable)


def vlm_config(vlm: str, **overrides) -> EmoLlamaConfig:
    """The EmoLlamaConfig of a VLM base (hub id or folder; a folder by its absolute path)."""
    path = Path(vlm)
    if path.is_dir():
        vlm = str(path.resolve())
    tiny = path.is_dir() and (path / TINY_MARKER).exists()
    values = dict(vlm=vlm, llm=vlm, vision=vlm, base_id=vlm, num_frames=VLM_NUM_FRAMES, template="",
                  is_tiny=tiny)
    if tiny:
        values.update(face_tokens=4, aggregator_layers=1, aggregator_heads=2, aggregator_hidden=32,
                      lora_r=8, lora_alpha=16, lora_dropout=0.0, max_new_tokens=8)
    values.update(overrides)
    return EmoLlamaConfig(**values)


def _config_files(vlm: str) -> Path:
    """A folder with the base's config and processor files: a local folder as-is; for a hub id
    only those files are fetched (not the weights: building a checkpoint never reads them)."""
    if Path(vlm).is_dir() or str(vlm).count("/") != 1:
        return local_or_hub(vlm, "VLM", ModelLoadError)
    try:
        from huggingface_hub import snapshot_download

        files = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
        return Path(snapshot_download(str(vlm), allow_patterns=files))
    except Exception as exc:
        raise ModelLoadError(f"{vlm}: cannot fetch from the Hugging Face hub ({type(exc).__name__}); "
                             "pass a local folder instead") from None


def build_vlm_checkpoint(vlm: str, out: str | Path, fim: bool = True, agr: bool = True,
                         version: str | None = None) -> Path:
    """An untrained checkpoint on a VLM base, written without loading the base's weights: the
    model is built on the meta device from its config, only FIM and the LoRA adapter (A random,
    B = 0: the base answers unchanged) are materialised and saved, with the base's processor.

        python app.py build-model --from-vlm HuggingFaceTB/SmolVLM-256M-Instruct --out checkpoints/smolvlm
    """
    from peft import get_peft_model, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    base_dir = _config_files(vlm)
    hf_config = AutoConfig.from_pretrained(base_dir)
    family_of(hf_config.model_type)
    config = vlm_config(vlm, use_fim=fim, use_agr=agr, version=version or "base")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    llm = get_peft_model(model, vlm_lora_config(config, model))
    for module in llm.modules():
        if isinstance(module, LoraLayer):
            for part in (module.lora_A, module.lora_B):
                part.to_empty(device="cpu")
            module.reset_lora_parameters("default", True)
    out = Path(out)
    (out / ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
    adapter = get_peft_model_state_dict(llm)
    save_file({k: v.contiguous() for k, v in adapter.items()}, out / ADAPTER_DIR / "adapter_model.safetensors",
              metadata={"format": "pt"})
    adapter_config = copy.deepcopy(llm.peft_config["default"])
    adapter_config.inference_mode = True
    adapter_config.save_pretrained(str(out / ADAPTER_DIR))
    dim = hf_config.get_text_config().hidden_size
    modules = nn.ModuleDict({"fim": FaceInfoMining(config, dim, dim)} if fim else {})
    save_file({k: v.contiguous() for k, v in modules.state_dict().items()}, out / MODULES_FILE)
    AutoProcessor.from_pretrained(str(base_dir)).save_pretrained(out / "processor")
    config.save(out)
    return out


# ---------------------------------------------------------------------- tiny test fixtures
# Chat templates as released (processor chat_template of llava-hf/llava-1.5-7b-hf and of
# HuggingFaceTB/SmolVLM-256M-Instruct); tests/data/vlm_configs/ keeps them with the configs.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr("
    "'type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]"
    "['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}")

QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] "
    "== 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value "
    "+ 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|>"
    "<|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# As in transformers' tests/models/llava_onevision (the processor of llava-onevision-qwen2-*-ov-hf).
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tiny_vlm(out: str | Path, family: str = "llava", seed: int = 0) -> Path:
    """A tiny random base VLM folder of `family` (model + processor, as a hub release is laid
    out), built offline: a TEST FIXTURE (its folder holds TINY_MARKER, so what it answers is
    labelled one). `load_model("zero-shot:" + folder)` serves it; build_vlm_checkpoint wraps it."""
    from transformers import CLIPImageProcessor, LlamaConfig

    from core.model.build import build_tiny_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; use one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None  # the processor carries the VLM's own
    extra = {"llava": ["<image>"],
             "idefics3": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<|im_start|>"],
             "llava_onevision": ["<image>", "<video>", "<|im_start|>", "<|im_end|>"],
             "qwen2_5_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                            "<|video_pad|>"]}[family]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    image_token = tokenizer.convert_tokens_to_ids("<image>" if family != "qwen2_5_vl" else "<|image_pad|>")
    if family == "llava":
        from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                                  LlavaProcessor)

        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
        model = LlavaForConditionalGeneration(LlavaConfig(
            text_config=text, vision_config=vision, image_token_index=image_token, vision_feature_layer=-2,
            vision_feature_select_strategy="default", tie_word_embeddings=False))
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                      crop_size={"height": 32, "width": 32}),
                                   tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    elif family == "llava_onevision":
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                                  LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                                  LlavaOnevisionVideoProcessor, SiglipVisionConfig)

        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=32, patch_size=8)
        grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
        model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
            text_config={**text.to_dict(), "model_type": "qwen2"}, vision_config=vision,
            image_token_index=image_token, video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=grid,
            tie_word_embeddings=False))
        size = {"height": 32, "width": 32}
        processor = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=grid),
            tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(size=size), num_image_tokens=16,
            vision_feature_select_strategy="full", chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)
    elif family == "qwen2_5_vl":
        from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                                  Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

        ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(t) for k, t in (
            ("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"))}
        text_config = {**text.to_dict(), "model_type": "qwen2_5_vl_text",
                       "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text_config, vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                        out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                                                        temporal_patch_size=2, window_size=16,
                                                        fullatt_block_indexes=[1]),
            tie_word_embeddings=False, **ids))
        pixels = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=48 * 48)
        processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                        video_processor=Qwen2VLVideoProcessor(**pixels),
                                        chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    else:
        from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                                  Idefics3Processor, Idefics3VisionConfig)

        vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=32, patch_size=8)
        model = Idefics3ForConditionalGeneration(Idefics3Config(
            text_config=text, vision_config=vision, scale_factor=2, image_token_id=image_token,
            tie_word_embeddings=False))
        image_processor = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                 do_image_splitting=True)
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                      chat_template=SMOLVLM_CHAT_TEMPLATE)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / TINY_MARKER).write_text("random weights: a test fixture, never a trained model\n")
    return out
