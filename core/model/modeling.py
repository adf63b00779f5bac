"""EMO-LLaMA: frozen vision encoder + LLaMA-VID frame tokens + Face Info Mining + LLM with LoRA.

    model = EmoLlama.from_pretrained("checkpoints/v3")          # a folder or a hub id
    x = model.prepare(frames, faces, question)                   # CPU work: tokens, pixels
    model.score_labels([x], model.config.label_set)              # [{"happiness": 0.91, ...}]
    model.generate([x])                                          # ["Happiness: the cheeks ..."]

The API is batch-first: the engine collects requests from many users and runs them together
(left padding + attention masks), with results equal to running each alone.

A checkpoint folder holds config.json (EmoLlamaConfig), emo_modules.safetensors (frame tokens,
FIM, clue aggregator), adapter/ (the LoRA adapter, peft format), tokenizer/ and processor/;
the base LLM and vision encoder are hub ids or folders named in the config (a tiny test
checkpoint keeps them inside, in llm/ and vision/).
"""
from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import ModelLoadError
from core.model.config import CONFIG_NAME, EmoLlamaConfig
from core.model.face_mining import FaceInfoMining
from core.model.prompt import split_prompt
from core.model.vision import FrameTokens, load_vision_encoder, patch_features

MODULES_FILE = "emo_modules.safetensors"
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft vs transformers 5
DEFAULT_CHAT_TEMPLATE = (  # Vicuna v1.1 layout, for base LLMs that ship without a template
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@dataclass
class EmoInput:
    """One request, prepared on the CPU: everything the model needs, nothing it must decode."""
    kind: str                              # "image" | "video"
    pixel_values: torch.Tensor             # (F, 3, H, W)
    before_ids: list[int]                  # prompt tokens before the media
    after_ids: list[int]                   # prompt tokens after it, up to the answer
    question_ids: list[int]                # the instruction, for the text-guided context token
    face_pixels: torch.Tensor | None       # (N, 3, H, W) aligned faces, one per frame with a face
    face_landmarks: torch.Tensor | None    # (N, 5, 2) in aligned-crop pixels
    prior_embeddings: torch.Tensor | None  # (N, prior_dim)


class EmoLlama(nn.Module):
    def __init__(self, config: EmoLlamaConfig, llm: nn.Module, vision: nn.Module, tokenizer,
                 image_processor, source_dir: str | Path | None = None):
        super().__init__()
        self.config, self.llm, self.vision = config, llm, vision
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.source_dir = Path(source_dir) if source_dir else None
        vision_dim = vision.config.hidden_size
        llm_dim = llm.get_input_embeddings().embedding_dim
        self.frame_tokens = FrameTokens(config, vision_dim, llm_dim)
        self.fim = FaceInfoMining(config, vision_dim, llm_dim)
        self.vision.requires_grad_(False)
        self.vision.eval()

    # ------------------------------------------------------------------ identity
    @property
    def version(self) -> str:
        return self.config.version

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def trainable_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"frame_tokens": self.frame_tokens, "fim": self.fim})

    # ------------------------------------------------------------------ inputs
    def _pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prepare(self, frames: list[np.ndarray], faces: list[list], question: str) -> EmoInput:
        """Frames (RGB uint8) + per-frame faces (core.faces.Face, largest first) + question."""
        if not frames:
            raise ValueError("prepare() needs at least one frame")
        # One face per frame (the largest) keeps the face-token budget fixed per request.
        main_faces = [fs[0] for fs in faces if fs]
        attributes = next((f.attributes for f in main_faces if f.attributes is not None), None)
        before, after = split_prompt(self.tokenizer, question, attributes)
        face_pixels = landmarks = priors = None
        if main_faces:
            face_pixels = self._pixels([f.aligned for f in main_faces])
            landmarks = torch.tensor(np.stack([f.aligned_landmarks for f in main_faces]), dtype=torch.float32)
            priors = torch.tensor(np.stack([f.embedding for f in main_faces]), dtype=torch.float32)
        return EmoInput(kind="image" if len(frames) == 1 else "video",
                        pixel_values=self._pixels(frames), before_ids=self._ids(before),
                        after_ids=self._ids(after), question_ids=self._ids(question),
                        face_pixels=face_pixels, face_landmarks=landmarks, prior_embeddings=priors)

    # ------------------------------------------------------------------ embeddings
    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device))

    def media_embeddings(self, x: EmoInput) -> torch.Tensor:
        """(frames x (1 + content_tokens) + K, D) LLM-space tokens for one request's media."""
        pixels = x.pixel_values.to(self.device, self.dtype)
        with torch.no_grad():
            patches = patch_features(self.vision, pixels)
        question = self._embed_ids(x.question_ids or [self.tokenizer.eos_token_id])
        frames = patches.shape[0]
        text = question[None].expand(frames, -1, -1)
        text_mask = torch.ones(text.shape[:2], dtype=torch.long, device=self.device)
        tokens = self.frame_tokens(patches, text, text_mask).flatten(0, 1)
        if x.face_pixels is None:
            return tokens
        with torch.no_grad():
            face_patches = patch_features(self.vision, x.face_pixels.to(self.device, self.dtype))
        face = self.fim(x.prior_embeddings.to(self.device, self.dtype), face_patches,
                        x.face_landmarks.to(self.device, self.dtype))
        return torch.cat([tokens, face])

    def prompt_embeddings(self, x: EmoInput) -> torch.Tensor:
        return torch.cat([self._embed_ids(x.before_ids), self.media_embeddings(x),
                          self._embed_ids(x.after_ids)])

    def _left_pad(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(s.shape[0] for s in sequences)
        dim = sequences[0].shape[1]
        embeds = sequences[0].new_zeros(len(sequences), length, dim)
        mask = torch.zeros(len(sequences), length, dtype=torch.long, device=self.device)
        for i, s in enumerate(sequences):
            embeds[i, length - s.shape[0]:] = s
            mask[i, length - s.shape[0]:] = 1
        return embeds, mask

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, **kwargs):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs)

    def answer_ids(self, answer: str) -> list[int]:
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return self._ids(answer) + eos

    # ------------------------------------------------------------------ training
    def forward(self, batch: list[EmoInput], answers: list[str]) -> torch.Tensor:
        """Mean cross-entropy of the answers given the prompts (prompt tokens are not scored)."""
        sequences, targets = [], []
        for x, answer in zip(batch, answers):
            prompt = self.prompt_embeddings(x)
            ids = self.answer_ids(answer)
            sequences.append(torch.cat([prompt, self._embed_ids(ids)]))
            targets.append([-100] * prompt.shape[0] + ids)
        embeds, mask = self._left_pad(sequences)
        labels = torch.full(mask.shape, -100, dtype=torch.long, device=self.device)
        for i, t in enumerate(targets):
            labels[i, mask.shape[1] - len(t):] = torch.tensor(t, device=self.device)
        logits = self._run(embeds, mask).logits.float()
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           labels[:, 1:].reshape(-1), ignore_index=-100)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def score_labels(self, batch: list[EmoInput], label_set: list[str]) -> list[dict[str, float]]:
        """P(label | media, question) for every label, from one batched log-likelihood pass.

        Each option is scored as a complete answer (its tokens + EOS); the option log-likelihoods
        are normalised with a softmax over the label set.
        """
        options = [self.answer_ids(label) for label in label_set]
        sequences, spans = [], []
        for x in batch:
            prompt = self.prompt_embeddings(x)
            for ids in options:
                sequences.append(torch.cat([prompt, self._embed_ids(ids)]))
                spans.append(ids)
        embeds, mask = self._left_pad(sequences)
        logprobs = torch.log_softmax(self._run(embeds, mask).logits.float(), dim=-1)
        totals = []
        length = mask.shape[1]
        for row, ids in enumerate(spans):
            positions = torch.arange(length - len(ids) - 1, length - 1, device=self.device)
            target = torch.tensor(ids, device=self.device)
            totals.append(logprobs[row, positions, target].sum())
        scores = torch.stack(totals).reshape(len(batch), len(label_set)).softmax(dim=-1).cpu()
        return [dict(zip(label_set, (float(v) for v in row))) for row in scores]

    @torch.no_grad()
    def generate(self, batch: list[EmoInput], max_new_tokens: int | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 is_active: Callable[[int], bool] | None = None) -> list[str]:
        """Greedy decoding for a batch. `on_text(i, piece)` streams request i's new text;
        `is_active(i)` false stops request i early (a client that went away)."""
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        eos = self.tokenizer.eos_token_id
        embeds, mask = self._left_pad([self.prompt_embeddings(x) for x in batch])
        out = self._run(embeds, mask, use_cache=True, logits_to_keep=1)
        tokens: list[list[int]] = [[] for _ in batch]
        texts = [""] * len(batch)
        done = [False] * len(batch)
        positions = mask.sum(-1, keepdim=True) - 1
        for _ in range(max_new_tokens):
            next_ids = out.logits[:, -1].argmax(-1)
            for i, token in enumerate(next_ids.tolist()):
                if done[i]:
                    continue
                if (is_active and not is_active(i)) or token == eos:
                    done[i] = True
                    continue
                tokens[i].append(token)
                text = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
                if on_text and text != texts[i] and not text.endswith("\ufffd"):
                    on_text(i, text[len(texts[i]):] if text.startswith(texts[i]) else text)
                    texts[i] = text
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
            positions = positions + 1
            out = self.llm(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                           cache=out.cache, use_cache=True)
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]

    # ------------------------------------------------------------------ saving / loading
    def save_pretrained(self, folder: str | Path, version: str | None = None) -> Path:
        """A self-describing checkpoint folder (see the module docstring)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if version:
            self.config.version = version
        for part in (self.config.llm, self.config.vision):
            if self.source_dir and _is_subfolder(part) and not (folder / part).exists():
                shutil.copytree(self.source_dir / part, folder / part)
        self.config.save(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.trainable_modules().state_dict().items()}
        save_file(state, folder / MODULES_FILE)
        self.llm.save_pretrained(folder / "adapter")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.image_processor.save_pretrained(folder / "processor")
        return folder

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, trainable: bool = False) -> "EmoLlama":
        folder = resolve_checkpoint(name_or_path)
        try:
            config = EmoLlamaConfig.load(folder)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{name_or_path}: not an EMO-LLaMA checkpoint ({exc})") from None
        try:
            model = cls.from_parts(config, folder, trainable=trainable)
        except ModelLoadError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(f"{name_or_path}: cannot load the checkpoint ({exc})") from None
        return model.to(device=device, dtype=dtype).train(trainable)

    @classmethod
    def from_parts(cls, config: EmoLlamaConfig, folder: Path | None = None,
                   trainable: bool = False) -> "EmoLlama":
        """Base parts named by the config + (when the folder has them) trained weights."""
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        def where(part: str) -> str:
            return str(folder / part) if folder is not None and _is_subfolder(part) else part

        llm = AutoModelForCausalLM.from_pretrained(where(config.llm))
        vision = load_vision_encoder(where(config.vision))
        tokenizer_dir = folder / "tokenizer" if folder is not None and (folder / "tokenizer").exists() else None
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or where(config.llm)))
        if not tokenizer.chat_template:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        processor_dir = folder / "processor" if folder is not None and (folder / "processor").exists() else None
        processor = AutoImageProcessor.from_pretrained(str(processor_dir or where(config.vision)))
        if folder is not None and (folder / "adapter").exists():
            llm = PeftModel.from_pretrained(llm, str(folder / "adapter"), is_trainable=trainable)
        else:
            llm = get_peft_model(llm, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                 lora_dropout=config.lora_dropout,
                                                 target_modules=config.lora_targets, task_type="CAUSAL_LM"))
        model = cls(config, llm, vision, tokenizer, processor, source_dir=folder)
        if folder is not None and (folder / MODULES_FILE).exists():
            model.trainable_modules().load_state_dict(load_file(folder / MODULES_FILE))
        model.trainable_modules().requires_grad_(trainable or folder is None)
        return model

    def parameter_report(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": sum(p.numel() for p in self.parameters())}


def _is_subfolder(part: str) -> bool:
    """A base part stored inside the checkpoint ("llm", "vision") rather than a hub id/abs path."""
    return not Path(part).is_absolute() and "/" not in part


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder as-is; otherwise a hub id fetched (or read from the cache) by huggingface_hub."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / CONFIG_NAME).exists():
            raise ModelLoadError(f"{path}: no {CONFIG_NAME}; build one with `python app.py build-model`")
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
        raise ModelLoadError(f"{name_or_path}: no such checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path)))
    except Exception as exc:
        raise ModelLoadError(f"{name_or_path}: cannot fetch from the Hugging Face hub "
                             f"({type(exc).__name__}); pass a local folder instead") from None
