"""The engine's model as a client of a vLLM server (its OpenAI-compatible API).

    EMO_VLLM_URL=http://gpu-box:8000/v1 EMO_LLAMA_MODEL=zero-shot:Qwen/Qwen2.5-VL-3B-Instruct \\
        python app.py serve
    model = OpenAIChatModel("http://gpu-box:8000/v1", "zero-shot:Qwen/Qwen2.5-VL-3B-Instruct")

The version spec names what the server serves: `zero-shot:ID` asks for the base model ID, any
other spec is sent as it is (a merged version's --served-model-name, or a LoRA adapter's NAME of
`--lora-modules NAME=PATH`); the server must list it in GET /v1/models. `EMO_VLLM_API_KEY` is
the server's --api-key (sent as a bearer token), `EMO_VLLM_TIMEOUT_S` the longest wait for an
answer (default 60), `EMO_VLLM_LABEL_SET` a label set name of core/labels.py (default basic7).
Videos send `num_frames` images per prompt: start vLLM with --limit-mm-per-prompt '{"image": 8}'.

The engine's contract is the local model's (core/model/modeling.py): `prepare_media` once per
request (frames -> JPEG data URLs, on the preprocessing pool), `prepare` per question,
`score_labels` and `generate` per batch; the requests of a batch run concurrently (threads),
since the server batches them itself. Face analysis stays local; only pixels and text travel.

Every request is one user message: the frames as `image_url` parts (JPEG, base64 data URLs),
then one text part, the AGR sentence (when the face has attributes and `use_agr`) and the
question on the next line, as core/model/prompt.py words them.

Explanations: POST /v1/chat/completions with
    {"model": NAME, "messages": [USER], "max_tokens": N, "temperature": 0, "stream": true}
read as SSE chunks; when `is_active(i)` turns false the stream is closed, and vLLM aborts a
request whose client disconnected. In the engine's continuous batching each explanation is a
row of a RemoteDecodeBatch (`decode_batch_type`): its stream runs on its own thread, so rows
join and leave at any time and the server does the batching.

Label scores: every label is scored as a complete answer, one request per (request, label):
    {"model": NAME, "messages": [USER, {"role": "assistant", "content": LABEL}],
     "max_tokens": 1, "temperature": 0,
     "add_generation_prompt": false, "continue_final_message": false, "prompt_logprobs": 1}
`add_generation_prompt: false` ends the prompt with the assistant turn as the chat template
closes it (LABEL, then the template's end token, e.g. <|im_end|>); vLLM's `prompt_logprobs`
extension (top-level in the response) gives, per prompt position, {token id: {"logprob",
"rank", "decoded_token"}}: the prompt token plus the top-1 when they differ (rank 1 is the
top-1, so the prompt token is the only entry or the one not ranked 1). 1 rather than 0: early
V1 engines read 0 as "off". `echo` and `logprobs`/`top_logprobs` are not used: echo only
prepends the last message to the output, and top-k logprobs of the next token would miss labels
outside the top k. The LABEL tokens are found as the last run of prompt tokens whose decoded
text is the label (whitespace and SentencePiece/BPE space marks ignored); the token after them
is the end token. As in EmoLlama.score_labels, the option's log-likelihood is the mean (or sum,
`config.label_scoring`) of its tokens' log-probs, end token included, divided by
`config.label_temperature`, softmaxed over the label set.
Differences from the local scoring: the end token is whatever the served chat template closes
an assistant turn with (a template ending turns in "\\n" scores that); the prompt is the served
model's own chat template, not a trained checkpoint's; each label is a separate prompt, and
vLLM's V1 engine skips its prefix cache for requests that ask for prompt logprobs, so a label
costs a full prefill of the image prompt (7 labels = 7 prefills; the local model runs the prompt
once and the options as one short batch).

Errors (server down, timeout, HTTP 4xx/5xx, an unreadable answer, a label not found in the
prompt logprobs) become one-line UserErrors naming the server, never the key or the body.
"""
from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from core.errors import ModelLoadError, UserError
from core.labels import BASIC7, LABEL_SETS
from core.model.config import EmoLlamaConfig, zero_shot_id
from core.model.prompt import agr_sentence

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
MAX_SIDE = 768       # vLLM's processors resize anyway; larger JPEGs only cost upload time
JPEG_QUALITY = 90
MAX_WORKERS = 32     # concurrent HTTP requests per batch; the server queues and batches them
_SPACE_MARKS = re.compile(r"[\s\u2581\u0120\u010a]")  # whitespace, SentencePiece ▁, byte-BPE Ġ Ċ


def served_name(spec: str) -> str:
    """The model name sent to the server: `zero-shot:ID` -> ID, anything else as it is."""
    spec = str(spec).strip()
    return zero_shot_id(spec) or spec


def _jpeg_data_url(rgb: np.ndarray) -> str:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).convert("RGB")
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


class RemoteMedia:
    """One request's frames as JPEG data URLs, encoded once for both of its prompts."""

    def __init__(self, kind: str, urls: list[str], attributes=None):
        self.kind, self.urls, self.attributes = kind, urls, attributes

    def __len__(self) -> int:
        return len(self.urls)

    def forget_features(self) -> None:
        """Nothing to free: the engine calls this once the prompts are prefilled, but a failed
        stream is re-run from these frames; they go with the request."""


@dataclass
class RemoteInput:
    kind: str          # "image" | "video"
    text: str          # the AGR sentence and the question, as the user message's text part
    media: RemoteMedia

    def messages(self) -> list[dict]:
        images = [{"type": "image_url", "image_url": {"url": url}} for url in self.media.urls]
        return [{"role": "user", "content": images + [{"type": "text", "text": self.text}]}]


def _squash(text: str) -> str:
    return _SPACE_MARKS.sub("", text)


def _prompt_token(position: dict) -> tuple[str, float]:
    """(decoded text, log-prob) of the prompt token at one prompt_logprobs position."""
    entries = list(position.values())
    entry = entries[0] if len(entries) == 1 else next((e for e in entries if e.get("rank") != 1), None)
    if entry is None:
        raise ValueError("a prompt_logprobs position with no prompt token")
    return entry["decoded_token"] or "", float(entry["logprob"])  # null: a server without a tokenizer


def answer_logprobs(positions: list, answer: str) -> list[float] | None:
    """Log-probs of the answer's tokens and the end token after them, from vLLM's prompt_logprobs
    of a prompt that ends with the assistant turn `answer`; None when no run of tokens spells it.

    The answer is the LAST such run (the question names every label too); runs ending in
    whitespace-only tokens are skipped, so the end token is the first token after the text."""
    tokens = [None if p is None else _prompt_token(p) for p in positions]
    target = _squash(answer)
    if not target:
        return None
    for end in range(len(tokens), 0, -1):
        if tokens[end - 1] is None or not _squash(tokens[end - 1][0]):
            continue
        text = ""
        for start in range(end - 1, -1, -1):
            if tokens[start] is None:
                break
            text = _squash(tokens[start][0]) + text
            if text == target:
                span = tokens[start:end] + ([tokens[end]] if end < len(tokens) and tokens[end] else [])
                return [logprob for _, logprob in span]
            if not target.endswith(text):
                break
    return None


class RemoteRow:
    """One request of a RemoteDecodeBatch: its stream runs on its own thread."""

    def __init__(self, key, max_new_tokens: int, on_text, is_active):
        self.key, self.max_new_tokens, self.on_text, self.is_active = key, max_new_tokens, on_text, is_active
        self.text, self.error = "", None
        self.done = threading.Event()
        self.stopped = False
        self.lock = threading.Lock()  # clear() vs a last piece: nothing is sent after clear()

    @property
    def answer(self) -> str:
        return self.text

    def active(self) -> bool:
        return not self.stopped and (self.is_active is None or self.is_active(self.key))

    def send(self, piece: str) -> None:
        with self.lock:
            if self.on_text and not self.stopped:
                self.on_text(self.key, piece)


class RemoteDecodeBatch:
    """The engine's running decode batch (the interface of core/model/decoding.py DecodeBatch)
    for a server that batches by itself: a row is one streaming request on its own thread, so
    requests join and leave at any time; `step()` waits a moment for rows to finish instead of
    running a decoding step. A row that failed makes `step()` raise its UserError: the engine
    then clears the batch and runs its rows alone (`generate`), as after a failed local step."""

    STEP_WAIT_S = 0.02  # how long a step waits for a row to finish (the engine admits in between)

    def __init__(self, model: OpenAIChatModel):
        self.model = model
        self.rows: list[RemoteRow] = []
        self._changed = threading.Event()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, batch: list[RemoteInput], keys=None, *, max_new_tokens=None, stop=None,
            on_text=None, is_active=None) -> list[RemoteRow]:
        keys = list(range(len(batch))) if keys is None else list(keys)
        limit = max_new_tokens or self.model.config.max_new_tokens
        rows = [RemoteRow(key, limit, on_text, is_active) for key in keys]
        for row, x in zip(rows, batch):
            threading.Thread(target=self._run, args=(row, x.messages()), daemon=True,
                             name="vllm-stream").start()
        self.rows += rows
        return rows

    def _run(self, row: RemoteRow, messages: list[dict]) -> None:
        try:
            row.text = self.model.stream(messages, row.max_new_tokens, row.send, row.active)
        except Exception as exc:  # UserError from _errors; kept for step() to raise
            row.error = exc
        finally:
            row.done.set()
            self._changed.set()

    def step(self) -> list[RemoteRow]:
        """The rows whose streams ended since the last step (they have left)."""
        if not self.rows:
            return []
        self._changed.wait(self.STEP_WAIT_S)
        self._changed.clear()
        # Rows that ended well leave first; a failure is raised once none is left to hand back,
        # since the engine then restarts every row still here.
        finished = [row for row in self.rows if row.done.is_set() and row.error is None]
        if finished:
            self.rows = [row for row in self.rows if row not in finished]
            return finished
        failed = next((row.error for row in self.rows if row.error is not None), None)
        if failed is not None:
            raise failed
        return []

    def clear(self) -> list[RemoteRow]:
        """Drop every row (after a failed step): their streams close at their next piece."""
        rows, self.rows = self.rows, []
        for row in rows:
            with row.lock:
                row.stopped = True
        return rows


class OpenAIChatModel:
    """A served vision-language model behind vLLM's OpenAI-compatible API (see the module doc)."""

    decode_batch_type = RemoteDecodeBatch  # the engine's running decode batch for this model

    def __init__(self, url: str, spec: str, api_key: str | None = None, label_set: list[str] | None = None,
                 timeout_s: float | None = None, client=None):
        from openai import OpenAI

        self.url = str(url).rstrip("/")
        self.served = served_name(spec)
        if not self.served:
            raise ModelLoadError("no model name: give the name the vLLM server serves, e.g. "
                                 "zero-shot:Qwen/Qwen2.5-VL-3B-Instruct")
        self.timeout_s = float(timeout_s or DEFAULT_TIMEOUT_S)
        self.config = EmoLlamaConfig(llm=self.served, vision="", use_fim=False, is_tiny=False,
                                     label_set=list(label_set or BASIC7), version=str(spec),
                                     base_id=f"vllm:{self._where()}")
        # The "base" shared by the versions of one server (the engine compares it by identity):
        # load_version reuses this client, as EmoLlama versions share their frozen LLM.
        # max_retries=0: the engine already retries a failed batch one request at a time.
        self.llm = client or OpenAI(base_url=self.url, api_key=api_key or "EMPTY",
                                    timeout=self.timeout_s, max_retries=0)
        self._check_served()

    @classmethod
    def from_environment(cls, spec: str) -> "OpenAIChatModel":
        """EMO_VLLM_URL, EMO_VLLM_API_KEY, EMO_VLLM_TIMEOUT_S, EMO_VLLM_LABEL_SET (module doc)."""
        name = (os.environ.get("EMO_VLLM_LABEL_SET") or "basic7").strip().lower()
        if name not in LABEL_SETS:
            raise UserError(f"EMO_VLLM_LABEL_SET is {name!r}: use one of {', '.join(LABEL_SETS)}")
        try:
            timeout = float(os.environ.get("EMO_VLLM_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
        except ValueError:
            raise UserError("EMO_VLLM_TIMEOUT_S must be a number of seconds") from None
        return cls(os.environ["EMO_VLLM_URL"], spec, api_key=os.environ.get("EMO_VLLM_API_KEY") or None,
                   label_set=LABEL_SETS[name], timeout_s=timeout)

    # ------------------------------------------------------------------ identity
    @property
    def version(self) -> str:
        """What answers show: the spec, and that a server answers it."""
        return f"{self.config.version} via vLLM"

    def eval(self) -> "OpenAIChatModel":
        return self

    def load_version(self, spec: str) -> "OpenAIChatModel":
        """Another model name on the same server, sharing this one's client."""
        return type(self)(self.url, spec, label_set=self.config.label_set, timeout_s=self.timeout_s,
                          client=self.llm)

    def release(self) -> None:
        """Nothing to free here: the weights live on the server, the client is shared."""

    def _where(self) -> str:
        """The server, for messages: scheme, host, port and path; never credentials in the URL."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"

    @contextmanager
    def _errors(self, what: str):
        """Any failure talking to the server -> one UserError line (no key, no response body)."""
        import openai

        where = self._where()
        try:
            yield
        except UserError:
            raise
        except openai.APITimeoutError:
            raise UserError(f"the vLLM server at {where} did not answer the {what} within "
                            f"{self.timeout_s:g} s (EMO_VLLM_TIMEOUT_S)") from None
        except openai.APIConnectionError:
            raise UserError(f"cannot reach the vLLM server at {where} ({what}): is it running "
                            f"and is EMO_VLLM_URL right?") from None
        except openai.APIStatusError as exc:
            log.warning("vLLM %s answered HTTP %s: %.300s", where, exc.status_code, exc.message)
            hint = {401: ": set EMO_VLLM_API_KEY to the server's --api-key",
                    404: f": it does not serve {self.served!r} (see GET /v1/models)",
                    400: " (for videos start vLLM with --limit-mm-per-prompt '{\"image\": "
                         f"{self.config.num_frames}}}')"}.get(exc.status_code, "")
            raise UserError(f"the vLLM server at {where} refused the {what} "
                            f"(HTTP {exc.status_code}){hint}") from None
        except Exception as exc:  # an answer that is not what the API promises (cut-off JSON, ...)
            log.warning("unreadable answer from vLLM %s: %s", where, type(exc).__name__)
            raise UserError(f"the vLLM server at {where} sent an unreadable answer to the {what} "
                            f"({type(exc).__name__})") from None

    def _check_served(self) -> None:
        with self._errors("model list"):
            served = [m.id for m in self.llm.models.list()]
        if self.served not in served:
            raise ModelLoadError(f"the vLLM server at {self._where()} does not serve {self.served!r}; "
                                 f"it serves: {', '.join(served) or 'nothing'}")

    # ------------------------------------------------------------------ inputs
    def prepare_media(self, frames: list[np.ndarray], faces: list[list]) -> RemoteMedia:
        """Frames (RGB uint8) + per-frame faces (largest first) -> JPEG data URLs, once per
        request; `faces` may be a single image's list of faces (as EmoLlama.prepare_media)."""
        if not frames:
            raise ValueError("prepare() needs at least one frame")
        if len(frames) == 1 and faces and hasattr(faces[0], "aligned"):
            faces = [faces]
        main_faces = [fs[0] for fs in faces if fs]
        attributes = (next((f.attributes for f in main_faces if f.attributes is not None), None)
                      if self.config.use_agr else None)
        return RemoteMedia("image" if len(frames) == 1 else "video",
                           [_jpeg_data_url(frame) for frame in frames], attributes)

    def prepare(self, frames: "list[np.ndarray] | RemoteMedia", faces: list[list], question: str) -> RemoteInput:
        media = frames if isinstance(frames, RemoteMedia) else self.prepare_media(frames, faces)
        text = "\n".join(p for p in (agr_sentence(media.attributes), question.strip()) if p)
        return RemoteInput(media.kind, text, media)

    # ------------------------------------------------------------------ inference
    def _option_logprobs(self, x: RemoteInput, label: str) -> list[float]:
        with self._errors("label scoring"):
            response = self.llm.chat.completions.create(
                model=self.served, messages=x.messages() + [{"role": "assistant", "content": label}],
                max_tokens=1, temperature=0,
                extra_body={"add_generation_prompt": False, "continue_final_message": False,
                            "prompt_logprobs": 1})
            positions = (getattr(response, "model_extra", None) or {}).get("prompt_logprobs")
            if not positions:
                raise UserError(f"the server at {self._where()} sent no prompt_logprobs: label scores "
                                f"need vLLM's prompt_logprobs extension (is EMO_VLLM_URL a vLLM server?)")
            found = answer_logprobs(positions, label)
        if not found:
            raise UserError(f"the label {label!r} is not in the prompt logprobs of the vLLM server at "
                            f"{self._where()}: cannot score it")
        return found

    def score_labels(self, batch: list[RemoteInput], label_set: list[str]) -> list[dict[str, float]]:
        """P(label | media, question) for every label, as EmoLlama.score_labels (module doc)."""
        if not label_set:
            raise ValueError("score_labels() needs a non-empty label set")
        rule, temperature = self.config.label_scoring, float(self.config.label_temperature)
        if rule not in ("mean", "sum"):
            raise ValueError(f"label_scoring is {rule!r}: use 'mean' (per token) or 'sum'")
        if not 0 < temperature < float("inf"):
            raise ValueError(f"label_temperature must be a positive number, not {temperature!r}")
        jobs = [(x, label) for x in batch for label in label_set]
        with ThreadPoolExecutor(min(MAX_WORKERS, len(jobs)), thread_name_prefix="vllm-score") as pool:
            options = list(pool.map(lambda job: self._option_logprobs(*job), jobs))
        results = []
        for row in range(len(batch)):
            values = options[row * len(label_set):(row + 1) * len(label_set)]
            totals = [sum(v) / (len(v) if rule == "mean" else 1) / temperature for v in values]
            top = max(totals)
            weights = [math.exp(t - top) for t in totals]
            results.append({label: w / sum(weights) for label, w in zip(label_set, weights)})
        return results

    def stream(self, messages: list[dict], max_new_tokens: int, on_piece: Callable[[str], None] | None = None,
               active: Callable[[], bool] | None = None) -> str:
        """One explanation, streamed greedily; `active()` false closes the stream."""
        text = ""
        if active and not active():
            return text
        with self._errors("explanation"):
            stream = self.llm.chat.completions.create(model=self.served, messages=messages,
                                                      max_tokens=max_new_tokens, temperature=0, stream=True)
            with stream:  # leaving it closes the connection: vLLM aborts the request
                for chunk in stream:
                    if active and not active():
                        break
                    piece = "".join(choice.delta.content or "" for choice in chunk.choices if choice.delta)
                    if piece:
                        text += piece
                        if on_piece:
                            on_piece(piece)
        return text.strip()

    def generate(self, batch: list[RemoteInput], max_new_tokens: int | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 is_active: Callable[[int], bool] | None = None) -> list[str]:
        """Greedy explanations, streamed: `on_text(i, piece)` per piece of request i; `is_active(i)`
        false closes request i's stream (a client that went away)."""
        limit = max_new_tokens or self.config.max_new_tokens

        def one(i: int) -> str:
            return self.stream(batch[i].messages(), limit, on_text and (lambda piece: on_text(i, piece)),
                               is_active and (lambda: is_active(i)))

        with ThreadPoolExecutor(min(MAX_WORKERS, len(batch)), thread_name_prefix="vllm-text") as pool:
            return list(pool.map(one, range(len(batch))))
