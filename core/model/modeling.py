"""EMO-LLaMA: frozen vision encoder + LLaMA-VID frame tokens + Face Info Mining + LLM with LoRA.

    model = EmoLlama.from_pretrained("checkpoints/v3")          # a folder or a hub id
    x = model.prepare(frames, faces, question)                   # CPU work: tokens, pixels
    model.score_labels([x], model.config.label_set)              # [{"happiness": 0.91, ...}]
    model.generate([x])                                          # ["Happiness: the cheeks ..."]
    v4 = model.load_version("checkpoints/v4")                    # same frozen base, new adapter

The API is batch-first: the engine collects requests from many users and runs them together
(one vision pass over all frames and faces, then left padding + attention masks in the LLM),
with results equal to running each alone.

A checkpoint folder holds config.json (EmoLlamaConfig), emo_modules.safetensors (frame tokens,
FIM, clue aggregator), adapter/ (the LoRA adapter, peft format), tokenizer/ and processor/;
the base LLM and vision encoder are hub ids or folders named in the config (a tiny test
checkpoint keeps them inside, in llm/ and vision/).
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import ModelLoadError
from core.model.config import EmoLlamaConfig, resolve_checkpoint
from core.model.decoding import DecodeBatch, Prefill
from core.model.face_mining import FaceInfoMining
from core.model.prompt import split_prompt
from core.model.vision import EVA_MODEL_TYPES, FrameTokens, encoder_features, load_vision_encoder, patch_grid

MODULES_FILE = "emo_modules.safetensors"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
ADAPTER_DIR = "adapter"
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft vs transformers 5
# peft imports bitsandbytes when installed; on CPUs with AVX512-BF16 its import warns that it
# cannot fetch an optional 4-bit kernel from the hub (no network here); its own fallback works.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_adapter_names = itertools.count(1)  # peft adapter names of versions loaded onto a shared base


@dataclass
class EmoInput:
    """One request, prepared on the CPU: everything the model needs, nothing it must decode."""
    kind: str                              # "image" | "video"
    pixel_values: torch.Tensor             # (F, 3, H, W)
    before_ids: list[int]                  # prompt tokens before the media
    after_ids: list[int]                   # prompt tokens after it, up to the answer
    question_ids: list[int]                # the instruction's Q-Former (BERT WordPiece) ids
    face_pixels: torch.Tensor | None       # (N, 3, H, W) aligned faces, one per frame with a face
    face_landmarks: torch.Tensor | None    # (N, 5, 2) in aligned-crop pixels
    prior_embeddings: torch.Tensor | None  # (N, prior_dim)
    # The request's media as prepared once (prepare_media): prompts built from the same
    # PreparedMedia share it, so the vision tower runs once for all of them (encode_media).
    media: "PreparedMedia | None" = None


class PreparedMedia:
    """One request's frames and faces, through the image processor once; the vision tower's
    features are kept here the first time a prompt needs them, so the category prompt and the
    conversation prompt of one request cost one vision pass between them.

    `len()` is the frame count, so it reads like the frame list it replaces in `prepare()`.
    """

    def __init__(self, kind: str, pixel_values: torch.Tensor, face_pixels: torch.Tensor | None,
                 face_landmarks: torch.Tensor | None, prior_embeddings: torch.Tensor | None,
                 attributes=None):
        self.kind, self.pixel_values, self.face_pixels = kind, pixel_values, face_pixels
        self.face_landmarks, self.prior_embeddings, self.attributes = face_landmarks, prior_embeddings, attributes
        self._features: tuple | None = None  # (vision module, dtype, frame features, face features)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def cached_features(self, vision: nn.Module, dtype: torch.dtype) -> tuple | None:
        with self._lock:
            if self._features is not None and self._features[0] is vision and self._features[1] == dtype:
                return self._features[2:]
            return None

    def keep_features(self, vision: nn.Module, dtype: torch.dtype, frames: torch.Tensor,
                      faces: torch.Tensor) -> None:
        with self._lock:
            self._features = (vision, dtype, frames, faces)

    def forget_features(self) -> None:
        """Free the cached features (device memory) once the request is answered."""
        with self._lock:
            self._features = None


QUANTIZATION_MODES = ("8bit", "4bit")


def bitsandbytes_config(mode: str, dtype: torch.dtype | None):
    """transformers' BitsAndBytesConfig for "8bit" (LLM.int8) or "4bit" (NF4, double quant)."""
    if mode not in QUANTIZATION_MODES:
        raise ModelLoadError(f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZATION_MODES)}")
    try:
        import bitsandbytes  # noqa: F401  (optional: only this path needs it)
    except ImportError:
        raise ModelLoadError(f"{mode} loading needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype or torch.float32)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a frozen base file into a new checkpoint; copy it across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class EmoLlama(nn.Module):
    def __init__(self, config: EmoLlamaConfig, llm: nn.Module, vision: nn.Module, tokenizer,
                 image_processor, qformer_tokenizer, source_dir: str | Path | None = None,
                 adapter_name: str = "default", llm_lock: threading.RLock | None = None):
        super().__init__()
        self.config, self.llm, self.vision = config, llm, vision
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.qformer_tokenizer = qformer_tokenizer
        qformer_tokenizer.truncation_side = "left"
        self.source_dir = Path(source_dir) if source_dir else None
        # Versions loaded with load_version() share `llm` (one peft model, one adapter each) and
        # this lock: every LLM call activates its own adapter under it.
        self.adapter_name = adapter_name
        self._llm_lock = llm_lock or threading.RLock()
        self._released = False
        vision_dim = vision.config.hidden_size
        llm_dim = llm.get_input_embeddings().embedding_dim
        self.frame_tokens = FrameTokens(config, vision_dim, llm_dim)
        self.fim = FaceInfoMining(config, vision_dim, llm_dim) if config.use_fim else None
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
        return nn.ModuleDict({"frame_tokens": self.frame_tokens, **({"fim": self.fim} if self.fim else {})})

    def train(self, mode: bool = True) -> "EmoLlama":
        super().train(mode)
        self.vision.eval()  # frozen: never in training mode, whatever the caller asks
        return self

    # ------------------------------------------------------------------ inputs
    def _pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        if self.config.pad_to_square:
            fill = [int(255 * m) for m in self.image_processor.image_mean]
            images = [pad_to_square(image, fill) for image in images]
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _qformer_ids(self, question: str) -> list[int]:
        """The instruction as the Q-Former reads it: lower-cased WordPiece, [CLS] ... [SEP],
        truncated from the left (set in __init__: LLaMA-VID keeps the end of a long instruction)."""
        return self.qformer_tokenizer(question, truncation=True,
                                      max_length=self.config.qformer_max_text)["input_ids"]

    def _prior_vector(self, face) -> np.ndarray:
        embedding = getattr(face, "embedding", None)
        if embedding is None:
            raise ValueError("a face without the prior network's embedding (core.faces.FaceAnalyzer "
                             "sets Face.embedding)")
        embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if embedding.shape[0] != self.config.prior_dim:
            raise ValueError(f"the face embedding has {embedding.shape[0]} values; this checkpoint "
                             f"expects {self.config.prior_dim} (prior network {self.config.prior!r})")
        return embedding

    def _main_faces(self, frames: list[np.ndarray], faces: list[list]) -> tuple[list, object]:
        """The largest face of each frame that has one (a fixed face-token budget per request)
        and the first attributes among them (None without AGR). For a single image `faces` may
        be that image's list of faces."""
        if not frames:
            raise ValueError("prepare() needs at least one frame")
        if len(frames) == 1 and faces and hasattr(faces[0], "aligned"):
            faces = [faces]
        if len(faces) != len(frames):
            raise ValueError(f"prepare() got {len(frames)} frame(s) but faces for {len(faces)}")
        main_faces = [fs[0] for fs in faces if fs]
        attributes = (next((f.attributes for f in main_faces if f.attributes is not None), None)
                      if self.config.use_agr else None)
        return main_faces, attributes

    def prepare_media(self, frames: list[np.ndarray], faces: list[list]) -> PreparedMedia:
        """Frames (RGB uint8) + per-frame faces (core.faces.Face, largest first), through the
        image processor once; pass the result to `prepare()` as its frames, once per question.

        For a single image, `faces` may also be that image's list of faces.
        """
        main_faces, attributes = self._main_faces(frames, faces)
        face_pixels = landmarks = priors = None
        if main_faces and self.config.use_fim:
            face_pixels = self._pixels([f.aligned for f in main_faces])
            landmarks = torch.tensor(np.stack([f.aligned_landmarks for f in main_faces]), dtype=torch.float32)
            priors = torch.from_numpy(np.stack([self._prior_vector(f) for f in main_faces]))
        return PreparedMedia("image" if len(frames) == 1 else "video", self._pixels(frames),
                             face_pixels, landmarks, priors, attributes)

    def prepare(self, frames: "list[np.ndarray] | PreparedMedia", faces: list[list],
                question: str) -> EmoInput:
        """Frames (RGB uint8) + per-frame faces (core.faces.Face, largest first) + question.

        For a single image, `faces` may also be that image's list of faces. `frames` may be
        `prepare_media()`'s result (then `faces` is not read again): every prompt prepared from
        it shares one image-processor pass and one vision pass. The prompt follows the
        checkpoint's conversation template (core/model/templates.py), BOS first when it says so.
        """
        from core.model.templates import bos_ids, model_template

        media = frames if isinstance(frames, PreparedMedia) else self.prepare_media(frames, faces)
        template = model_template(self)
        before, after = split_prompt(template, question, media.attributes)
        return EmoInput(kind=media.kind, pixel_values=media.pixel_values,
                        before_ids=bos_ids(template, self.tokenizer) + self._ids(before),
                        after_ids=self._ids(after), question_ids=self._qformer_ids(question),
                        face_pixels=media.face_pixels, face_landmarks=media.face_landmarks,
                        prior_embeddings=media.prior_embeddings, media=media)

    # ------------------------------------------------------------------ embeddings
    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device))

    def encode_media(self, batch: list[EmoInput]) -> list[torch.Tensor]:
        """Each request's media tokens, (frames x (1 + content_tokens) + K, D) in LLM space.

        All frames and aligned faces of the batch go through the vision encoder in one pass; each
        frame's context token reads its own request's instruction (padded and masked).
        """
        frame_counts = [x.pixel_values.shape[0] for x in batch]
        face_counts = [0 if x.face_pixels is None else x.face_pixels.shape[0] for x in batch]
        frame_features, face_features = self._vision_features(batch)
        face_patches = patch_grid(face_features)

        pad = self.qformer_tokenizer.pad_token_id or 0
        length = max(len(x.question_ids) for x in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long, device=self.device)
        text_mask = torch.zeros(len(batch), length, dtype=torch.long, device=self.device)
        for i, x in enumerate(batch):
            ids[i, :len(x.question_ids)] = torch.tensor(x.question_ids, device=self.device)
            text_mask[i, :len(x.question_ids)] = 1
        per_frame = torch.tensor(frame_counts, device=self.device)
        ids = ids.repeat_interleave(per_frame, dim=0, output_size=sum(frame_counts))
        text_mask = text_mask.repeat_interleave(per_frame, dim=0, output_size=sum(frame_counts))
        tokens = self.frame_tokens(frame_features, ids, text_mask)

        media = []
        faces = iter(face_patches.split(face_counts))
        for x, frame_tokens in zip(batch, tokens.split(frame_counts)):
            own_faces = next(faces)
            media.append(frame_tokens.flatten(0, 1))
            if x.face_pixels is not None and self.fim is not None:
                face = self.fim(x.prior_embeddings.to(self.device, self.dtype), own_faces,
                                x.face_landmarks.to(self.device))  # pixel positions stay float32
                media[-1] = torch.cat([media[-1], face])
        return media

    def _vision_features(self, batch: list[EmoInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """(all frames' features, all faces' features) of the batch, in batch order.

        The vision tower is frozen, so its features of a request's pixels never change: inputs
        prepared from one PreparedMedia reuse what the first of them computed, and every
        PreparedMedia seen for the first time goes through the tower in one pass with the rest.
        """
        fresh: dict[int, PreparedMedia | EmoInput] = {}  # id -> owner of pixels to run now
        known: dict[int, tuple] = {}
        for x in batch:
            owner = x.media if x.media is not None else x
            key = id(owner)
            if key in fresh or key in known:
                continue
            cached = x.media.cached_features(self.vision, self.dtype) if x.media is not None else None
            if cached is not None:
                known[key] = cached
            else:
                fresh[key] = owner
        if fresh:
            owners = list(fresh.values())
            frames = [o.pixel_values.shape[0] for o in owners]
            faces = [0 if o.face_pixels is None else o.face_pixels.shape[0] for o in owners]
            pixels = torch.cat([o.pixel_values for o in owners]
                               + [o.face_pixels for o in owners if o.face_pixels is not None])
            with torch.no_grad():
                features = encoder_features(self.vision, pixels.to(self.device, self.dtype),
                                            self.config.vision_select_layer)
            frame_part, face_part = features.split([sum(frames), sum(faces)])
            for key, owner, fr, fa in zip(fresh, owners, frame_part.split(frames), face_part.split(faces)):
                known[key] = (fr, fa)
                if isinstance(owner, PreparedMedia):
                    owner.keep_features(self.vision, self.dtype, fr, fa)
        parts = [known[id(x.media if x.media is not None else x)] for x in batch]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def media_embeddings(self, x: EmoInput) -> torch.Tensor:
        """(frames x (1 + content_tokens) + K, D) LLM-space tokens for one request's media."""
        return self.encode_media([x])[0]

    def batch_prompt_embeddings(self, batch: list[EmoInput]) -> list[torch.Tensor]:
        """Each request's prompt: chat prefix, media tokens, AGR sentence + question, chat suffix."""
        return [torch.cat([self._embed_ids(x.before_ids), media, self._embed_ids(x.after_ids)])
                for x, media in zip(batch, self.encode_media(batch))]

    def prompt_embeddings(self, x: EmoInput) -> torch.Tensor:
        return self.batch_prompt_embeddings([x])[0]

    def _left_pad(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(s.shape[0] for s in sequences)
        dim = sequences[0].shape[1]
        embeds = sequences[0].new_zeros(len(sequences), length, dim)
        mask = torch.zeros(len(sequences), length, dtype=torch.long, device=self.device)
        for i, s in enumerate(sequences):
            embeds[i, length - s.shape[0]:] = s
            mask[i, length - s.shape[0]:] = 1
        return embeds, mask

    def _call_llm(self, **kwargs):
        """The LLM with this version's adapter active (versions may share one base)."""
        if self._released:
            raise RuntimeError(f"version {self.version} was released")
        with self._llm_lock:
            if getattr(self.llm, "active_adapter", self.adapter_name) != self.adapter_name:
                self.llm.set_adapter(self.adapter_name, inference_mode=not self.training)
            return self.llm(**kwargs)

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, **kwargs):
        # Positions count real tokens only, so a left-padded row sees the same positions as alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._call_llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs)

    def answer_ids(self, answer: str) -> list[int]:
        """An answer as trained and scored: its tokens + the template's end token ("</s>" for
        Vicuna, <|eot_id|> for Llama 3, <|im_end|> for ChatML)."""
        from core.model.templates import end_token_id, model_template

        return self._ids(answer) + [end_token_id(model_template(self), self.tokenizer)]

    def stop_token_ids(self) -> set[int]:
        """The template's end tokens, EOS and every end token the LLM's generation config names."""
        from core.model.templates import model_template, stop_ids

        ids = {self.tokenizer.eos_token_id, *stop_ids(model_template(self), self.tokenizer)}
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    def _answer_logprobs(self, prompts: list[torch.Tensor], answers: list[list[int]],
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of every answer token given its prompt, from one batched pass.

        Returns (R, A) log-probs and the (R, A) mask of real answer tokens, A the longest answer.
        Left padding puts every answer at the end of its row, so only the last A + 1 positions
        need logits (a vocabulary-sized row each).
        """
        sequences = [torch.cat([p, self._embed_ids(ids)]) for p, ids in zip(prompts, answers)]
        embeds, mask = self._left_pad(sequences)
        longest = max(len(ids) for ids in answers)
        logits = self._run(embeds, mask, logits_to_keep=longest + 1).logits.float()
        targets = torch.zeros(len(answers), longest, dtype=torch.long, device=self.device)
        valid = torch.zeros(len(answers), longest, dtype=torch.bool, device=self.device)
        for row, ids in enumerate(answers):
            targets[row, longest - len(ids):] = torch.tensor(ids, device=self.device)
            valid[row, longest - len(ids):] = True
        logprobs = logits[:, :-1].log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        return logprobs, valid

    # ------------------------------------------------------------------ training
    def forward(self, batch: list[EmoInput], answers: list[str]) -> torch.Tensor:
        """Mean cross-entropy of the answers' tokens given the prompts (prompts are not scored)."""
        if len(batch) != len(answers):
            raise ValueError(f"{len(batch)} inputs but {len(answers)} answers")
        logprobs, valid = self._answer_logprobs(self.batch_prompt_embeddings(batch),
                                                [self.answer_ids(a) for a in answers])
        return -(logprobs * valid).sum() / valid.sum()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def score_labels(self, batch: list[EmoInput], label_set: list[str], *,
                     raw: bool = False) -> list[dict[str, float]]:
        """P(label | media, question) for every label: each option is scored as a complete answer
        (its tokens + EOS); the option log-likelihoods, combined by `config.label_scoring`
        ("mean": mean log-prob per token, end token included, so multi-token labels are not
        penalised for their length; "sum": the joint log-likelihood), are divided by
        `config.label_temperature` (fitted on a validation split by `python app.py evaluate`;
        1 = none) and normalised with a softmax. `raw=True` returns the combined option
        log-likelihoods themselves (before temperature and softmax), the inputs of that fit.

        The prompt (media tokens + question) is the long part and the same for every option, so
        it runs once per request; its KV cache is then repeated for the options, which run as
        one short batch (rows: every option of every request, right-padded).
        """
        if not label_set:
            raise ValueError("score_labels() needs a non-empty label set")
        rule, temperature = self.config.label_scoring, float(self.config.label_temperature)
        if rule not in ("mean", "sum"):
            raise ValueError(f"label_scoring is {rule!r}: use 'mean' (per token) or 'sum'")
        if not 0 < temperature < float("inf"):  # NaN fails too
            raise ValueError(f"label_temperature must be a positive number, not {temperature!r}")
        options = [self.answer_ids(label) for label in label_set]
        n, longest = len(options), max(len(ids) for ids in options)
        embeds, prompt_mask = self._left_pad(self.batch_prompt_embeddings(batch))
        prompt = self._run(embeds, prompt_mask, use_cache=True, logits_to_keep=1)
        cache = prompt.cache
        cache.batch_repeat_interleave(n)

        targets = torch.zeros(n, longest, dtype=torch.long, device=self.device)
        valid = torch.zeros(n, longest, dtype=torch.bool, device=self.device)
        for row, ids in enumerate(options):
            targets[row, :len(ids)] = torch.tensor(ids, device=self.device)
            valid[row, :len(ids)] = True
        targets, valid = targets.repeat(len(batch), 1), valid.repeat(len(batch), 1)
        mask = torch.cat([prompt_mask.repeat_interleave(n, 0), valid.long()], dim=1)
        # Option tokens continue the real (unpadded) positions of their prompt.
        positions = prompt_mask.sum(-1).repeat_interleave(n)[:, None] + torch.arange(longest, device=self.device)
        answer = self._call_llm(inputs_embeds=self.llm.get_input_embeddings()(targets), attention_mask=mask,
                                position_ids=positions, cache=cache, use_cache=True)
        # The prompt's last logits predict each option's first token; option token j the next one.
        logits = torch.cat([prompt.logits[:, -1:].repeat_interleave(n, 0), answer.logits[:, :-1]], dim=1)
        logprobs = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        totals = (logprobs * valid).sum(-1).reshape(len(batch), n)
        if rule == "mean":
            totals = totals / valid.sum(-1).reshape(len(batch), n)
        scores = totals if raw else (totals / temperature).softmax(dim=-1)
        return [dict(zip(label_set, (float(v) for v in row))) for row in scores.cpu()]

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
              generator: torch.Generator | None) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        scores = TemperatureLogitsWarper(max(temperature, 1e-5))(None, logits.float())
        if top_p < 1.0:  # nucleus: the smallest set of tokens whose mass reaches top_p
            scores = TopPLogitsWarper(top_p)(None, scores)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)

    def prefill(self, batch: list[EmoInput]) -> Prefill:
        """Decoding hook: the prompts in one left-padded pass, with what decoding goes on from
        (core/model/decoding.py). Positions count real tokens only, as in `_run`; a subclass
        with other position ids overrides this and `decode`."""
        embeds, mask = self._left_pad(self.batch_prompt_embeddings(batch))
        out = self._run(embeds, mask, use_cache=True, logits_to_keep=1)
        return Prefill(out.logits[:, -1], out.cache, mask, mask.sum(-1, keepdim=True) - 1)

    def decode(self, next_ids: torch.Tensor, cache, mask: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """Decoding hook: one token per row at `positions` (R, 1); returns the next logits (R, V)
        and grows `cache` in place."""
        out = self._call_llm(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                             cache=cache, use_cache=True)
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, batch: list[EmoInput], max_new_tokens: int | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 is_active: Callable[[int], bool] | None = None, *, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> list[str]:
        """Greedy decoding (sampling when asked) for a batch. `on_text(i, piece)` streams request
        i's new text; `is_active(i)` false stops request i early (a client that went away).

        Requests that finish or are cancelled leave the batch (and its KV cache) at once, so the
        others do not pay for them. The engine drives the same decoder (DecodeBatch) itself, so
        that requests can also join a batch that is already decoding.
        """
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        decoder = DecodeBatch(self, do_sample=do_sample, temperature=temperature, top_p=top_p,
                              generator=generator)
        rows = decoder.add(batch, max_new_tokens=max_new_tokens, on_text=on_text, is_active=is_active)
        while decoder:
            decoder.step()
        return [row.answer for row in rows]

    # ------------------------------------------------------------------ saving / loading
    def save_pretrained(self, folder: str | Path, version: str | None = None) -> Path:
        """A self-describing checkpoint folder (see the module docstring)."""
        from peft import get_peft_model_state_dict

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if version:
            self.config.version = version
        for part in (self.config.llm, self.config.vision):
            if self.source_dir and (self.source_dir / part).is_dir() and not (folder / part).exists():
                # Hard links: a version of a 7B base kept inside its checkpoint costs no disk.
                shutil.copytree(self.source_dir / part, folder / part, copy_function=_link_or_copy)
        self.config.qformer_tokenizer = QFORMER_TOKENIZER_DIR  # saved below: the folder is self-contained
        self.config.save(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.trainable_modules().state_dict().items()}
        save_file(state, folder / MODULES_FILE)
        # This version's adapter only, flat in adapter/ (peft's own save_pretrained would put an
        # adapter not named "default" into a sub-folder, and would save every loaded version).
        adapter_dir = folder / ADAPTER_DIR
        adapter_dir.mkdir(exist_ok=True)
        adapter = get_peft_model_state_dict(self.llm, adapter_name=self.adapter_name)
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()},
                  adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
        adapter_config = copy.deepcopy(self.llm.peft_config[self.adapter_name])
        adapter_config.inference_mode = True
        adapter_config.save_pretrained(str(adapter_dir))
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.image_processor.save_pretrained(folder / "processor")
        self.qformer_tokenizer.save_pretrained(folder / QFORMER_TOKENIZER_DIR)
        return folder

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, trainable: bool = False,
                        quantization: str | None = None) -> "EmoLlama":
        """Load a checkpoint; `quantization` "8bit" / "4bit" loads the frozen LLM through
        bitsandbytes (when installed) to fit a smaller GPU, the rest stays in `dtype`."""
        folder = resolve_checkpoint(name_or_path)
        config = _load_config(folder, name_or_path)
        if config.vlm and cls is EmoLlama:  # a checkpoint on a released VLM (core/model/vlm.py)
            from core.model.vlm import VlmEmoLlama

            return VlmEmoLlama.from_pretrained(folder, device=device, dtype=dtype, trainable=trainable,
                                               quantization=quantization)
        try:
            model = cls.from_parts(config, folder, trainable=trainable, dtype=dtype,
                                   quantization=quantization, device=device)
        except ModelLoadError:
            raise
        except Exception as exc:  # corrupt weights, wrong shapes, missing files: all one message
            raise ModelLoadError(f"{name_or_path}: cannot load the checkpoint "
                                 f"({type(exc).__name__}: {exc})") from None
        if quantization is None:
            return model.to(device=device, dtype=dtype).train(trainable)
        # A bitsandbytes model refuses .to(dtype); it was placed on `device` when it loaded.
        for child in model.children():
            if child is not model.llm:
                child.to(device=device, dtype=dtype)
        return model.train(trainable)

    @classmethod
    def from_parts(cls, config: EmoLlamaConfig, folder: Path | None = None,
                   trainable: bool = False, dtype: torch.dtype | None = None,
                   quantization: str | None = None,
                   device: str | torch.device = "cpu") -> "EmoLlama":
        """Base parts named by the config + (when the folder has them) trained weights."""
        from peft import PeftModel, get_peft_model
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from core.model.llm import load_causal_lm, load_tokenizer

        hf_logging.disable_progress_bar()

        def where(part: str) -> str:
            """A bare name ("llm") is a sub-folder of the checkpoint; "org/name" a hub id or path."""
            if folder is not None and "/" not in part and not Path(part).is_absolute():
                if not (folder / part).is_dir():
                    raise ModelLoadError(f"{folder}: cannot load the checkpoint: its {part}/ folder "
                                         "is missing")
                return str(folder / part)
            return part

        quantized = ({"quantization_config": bitsandbytes_config(quantization, dtype),
                      "device_map": {"": str(device)}} if quantization else {})
        llm = load_causal_lm(where(config.llm), config.llm_gguf_file, dtype=dtype, **quantized)
        vision = load_vision_encoder(where(config.vision), dtype=dtype)
        tokenizer_dir = folder / "tokenizer" if folder is not None and (folder / "tokenizer").exists() else None
        tokenizer = load_tokenizer(tokenizer_dir or where(config.llm), None if tokenizer_dir else config.llm_gguf_file)
        from core.model.templates import resolve_template  # the config's template, or a clear error
        config.template = resolve_template(config, getattr(llm, "config", None), tokenizer).name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        processor_dir = folder / "processor" if folder is not None and (folder / "processor").exists() else None
        processor = load_image_processor(str(processor_dir or where(config.vision)))
        if folder is not None and (folder / ADAPTER_DIR).exists():
            llm = PeftModel.from_pretrained(llm, str(folder / ADAPTER_DIR), is_trainable=trainable)
        else:
            llm = get_peft_model(llm, lora_config(config))
        qformer_tokenizer = AutoTokenizer.from_pretrained(where(config.qformer_tokenizer))
        model = cls(config, llm, vision, tokenizer, processor, qformer_tokenizer, source_dir=folder)
        if folder is not None and (folder / MODULES_FILE).exists():
            model.trainable_modules().load_state_dict(load_file(folder / MODULES_FILE))
        model.trainable_modules().requires_grad_(trainable or folder is None)
        return model

    @classmethod
    def from_configs(cls, config: EmoLlamaConfig, llm_config, vision_config, tokenizer,
                     image_processor, qformer_tokenizer) -> "EmoLlama":
        """An untrained model from base *configs*, no weights read: under `torch.device("meta")`
        this checks real base models' sizes offline (tests/test_model.py does, for Vicuna-7B +
        CLIP ViT-L/14-336)."""
        from peft import get_peft_model
        from transformers import AutoModel, AutoModelForCausalLM

        llm = get_peft_model(AutoModelForCausalLM.from_config(llm_config), lora_config(config))
        if vision_config.model_type in EVA_MODEL_TYPES:
            from transformers import InstructBlipVisionModel

            vision = InstructBlipVisionModel(vision_config)
        else:
            vision = AutoModel.from_config(vision_config)
        return cls(config, llm, getattr(vision, "vision_model", vision), tokenizer, image_processor,
                   qformer_tokenizer)

    # ------------------------------------------------------------------ versions on one base
    def load_version(self, name_or_path: str | Path, trainable: bool = False) -> "EmoLlama":
        """Another version (its LoRA adapter + trainable modules) on this model's frozen base.

        The LLM and the vision encoder are shared, not loaded again: the new version costs only
        its adapter and modules. Both versions stay usable (each LLM call activates its own
        adapter under a shared lock), so in-flight work can finish on the old one; call
        `release()` on a version no longer needed. A version built on another base raises
        ModelLoadError: load that one with `EmoLlama.from_pretrained`.
        """
        from transformers import AutoTokenizer

        folder = resolve_checkpoint(name_or_path)
        config = _load_config(folder, name_or_path)
        mine, theirs = self.config.base_key(), config.base_key()
        if mine is None or mine != theirs:
            raise ModelLoadError(f"{name_or_path}: built on base {theirs or 'unknown'}, not on the "
                                 f"loaded base {mine or 'unknown'}; load it with from_pretrained")
        adapter_name = f"version_{next(_adapter_names)}"
        try:
            with self._llm_lock:
                self.llm.load_adapter(str(folder / ADAPTER_DIR), adapter_name=adapter_name,
                                      is_trainable=trainable, autocast_adapter_dtype=False)
            for name, p in self.llm.named_parameters():
                if f".{adapter_name}." in name:
                    p.data = p.data.to(self.dtype)
            tokenizer = (AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
                         if (folder / "tokenizer").exists() else self.tokenizer)
            processor = (load_image_processor(str(folder / "processor"))
                         if (folder / "processor").exists() else self.image_processor)
            qformer_tokenizer = (AutoTokenizer.from_pretrained(str(folder / QFORMER_TOKENIZER_DIR))
                                 if (folder / QFORMER_TOKENIZER_DIR).exists() else self.qformer_tokenizer)
            other = type(self)(config, self.llm, self.vision, tokenizer, processor, qformer_tokenizer,
                               source_dir=folder,
                               adapter_name=adapter_name, llm_lock=self._llm_lock)
            other.trainable_modules().load_state_dict(load_file(folder / MODULES_FILE))
            other.trainable_modules().to(device=self.device, dtype=self.dtype).requires_grad_(trainable)
        except Exception as exc:
            with self._llm_lock:
                if adapter_name in self.llm.peft_config:
                    self.llm.delete_adapter(adapter_name)
            raise ModelLoadError(f"{name_or_path}: cannot load the version "
                                 f"({type(exc).__name__}: {exc})") from None
        return other.train(trainable)

    def release(self) -> None:
        """Drop this version's adapter from a shared base (the base stays for the others)."""
        with self._llm_lock:
            others = [name for name in self.llm.peft_config if name != self.adapter_name]
            if others and self.adapter_name in self.llm.peft_config:
                if self.llm.active_adapter == self.adapter_name:
                    self.llm.set_adapter(others[0], inference_mode=True)
                self.llm.delete_adapter(self.adapter_name)
                self._released = True

    def parameter_report(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": sum(p.numel() for p in self.parameters())}

    def token_budget(self, kind: str = "image", num_frames: int = 1, question: str | None = None) -> dict:
        """LLM input positions for one request: media tokens + the prompt's text tokens."""
        from core.model.prompt import category_question
        from core.model.templates import bos_ids, model_template

        question = question or category_question(self.config.label_set, kind, self.config)
        template = model_template(self)
        before, after = split_prompt(template, question)
        text = len(bos_ids(template, self.tokenizer)) + len(self._ids(before)) + len(self._ids(after))
        media = self.config.visual_token_budget(num_frames)
        return {"frames": num_frames, "media": media, "text": text, "total": media + text}


def pad_to_square(image: np.ndarray, fill: list[int]) -> np.ndarray:
    """LLaVA's expand2square: the image centred on a square of the processor's mean colour
    (122, 116, 104 for CLIP), so the centre crop keeps the whole frame."""
    height, width = image.shape[:2]
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=image.dtype)
    square[:] = fill
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = image
    return square


def load_image_processor(name_or_path: str):
    """The PIL-backed processor: LLaMA-VID's pixels come from PIL's bicubic resize, which the
    torchvision backend (transformers' default) does not reproduce."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(name_or_path, backend="pil")


def lora_config(config: EmoLlamaConfig):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_targets, task_type="CAUSAL_LM")


def _load_config(folder: Path, name_or_path) -> EmoLlamaConfig:
    try:
        return EmoLlamaConfig.load(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{name_or_path}: not an EMO-LLaMA checkpoint ({exc})") from None
