"""Gemini instruction data: the paper's FERID generation pipeline, robust and resumable.

    GEMINI_API_KEY=... python app.py generate --dataset rafdb --limit 50
    GEMINI_BASE_URL=http://127.0.0.1:8765 python app.py generate --dataset rafdb --json

    from annotation.gemini import run_generation, gemini_explain
    summary = run_generation("rafdb", limit=50, progress=lambda done, total, summary: ...)
    gemini_explain("face.jpg")   # {"label", "explanation", "cached", "source", ...}

Per sample (as in EMO-LLaMA's FERID data): the ground-truth label + the image (for a video, its
centre frame or a few frames, plus the scene description when the dataset has one) + a
versioned prompt -> structured JSON {label, explanation, action_units}. The answer is validated
and stored as a `Suggestion(source="gemini:<model>", prompt_version=PROMPT_VERSION)`: status
"ok", or "rejected" with the reason (blocked, truncated, malformed JSON, a missing field, a
label that contradicts the ground truth, an empty explanation, no facial evidence cited).

Robustness: exponential backoff with full jitter on 429/5xx/timeouts that honours Retry-After,
a client-side requests- and tokens-per-minute limiter shared by a bounded worker pool, and
idempotency per (sample, gemini model, prompt version): a rerun after a crash or Ctrl-C skips
every sample that already has a suggestion, so nothing is paid for twice.

The SDK is `google-genai` (the maintained successor of `google-generativeai`), used only inside
`GenAIClient`; the rest of the module talks to the small `GeminiClient` interface. The API key
comes from GEMINI_API_KEY or GOOGLE_API_KEY and is never logged, stored or put in an error.

Whole datasets at about half the price: Gemini's Batch API, `generate --batch`
(annotation/gemini_batch.py) sends these same requests as one JSONL job; samples in an open
batch are left out of online runs.

Reading order: settings and prices, the client, prompts, validation, rate limiter, retries,
media, the batch job, on-demand explanations.
"""
from __future__ import annotations

import email.utils
import hashlib
import io
import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from core.errors import MediaError, UserError
from core.labels import WITH_CONTEMPT8, normalize_label

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ settings

PROMPT_VERSION = "ferid-v1"            # bump whenever GENERATE_PROMPT or the schema changes
EXPLAIN_PROMPT_VERSION = "explain-v1"  # the same for EXPLAIN_PROMPT
DEFAULT_MODEL = "gemini-2.5-flash"
KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RPM = 60
DEFAULT_TPM = 250_000
MAX_OUTPUT_TOKENS = 4096                # 2.5 models count their thinking tokens in this budget

# ESTIMATE ONLY: list prices in USD per 1M tokens (input, output) for the Gemini Developer API's
# paid tier, standard context, as published in 2025 (ai.google.dev/gemini-api/docs/pricing).
# Thinking tokens are billed as output. Your bill is Google's, not this table's.
PRICES_USD_PER_MTOK: dict[str, tuple[float, float]] = {
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.0-flash-lite": (0.075, 0.30),
}


def model_price(model: str) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for a model id, by longest matching prefix."""
    name = model.removeprefix("models/")
    matches = [key for key in PRICES_USD_PER_MTOK if name.startswith(key)]
    return PRICES_USD_PER_MTOK[max(matches, key=len)] if matches else None


def estimate_cost(model: str, input_tokens: int, output_tokens: int) -> float | None:
    """Estimated USD for the tokens, or None when the model is not in the price table."""
    price = model_price(model)
    if price is None:
        return None
    return round((input_tokens * price[0] + output_tokens * price[1]) / 1e6, 6)


@dataclass(frozen=True)
class GeminiSettings:
    api_key: str = field(repr=False)  # repr=False: a logged settings object shows no key
    model: str = DEFAULT_MODEL
    base_url: str | None = None


def gemini_settings(model: str | None = None) -> GeminiSettings:
    """Key, model and endpoint from the environment; a one-line UserError without a key."""
    api_key = next((os.environ[v].strip() for v in KEY_VARIABLES if os.environ.get(v, "").strip()),
                   None)
    if not api_key:
        raise UserError(f"no Gemini API key: set {' or '.join(KEY_VARIABLES)} in the environment")
    model = (model or os.environ.get("GEMINI_MODEL") or DEFAULT_MODEL).strip()
    if not re.fullmatch(r"[\w.\-/]{1,80}", model):
        raise UserError(f"Gemini model {model!r}: expected an id such as {DEFAULT_MODEL}")
    return GeminiSettings(api_key=api_key, model=model.removeprefix("models/"),
                          base_url=os.environ.get("GEMINI_BASE_URL", "").strip() or None)


# ------------------------------------------------------------------------------ errors

class GeminiError(UserError):
    """The whole job cannot go on (key rejected, model unknown) or an on-demand call failed."""


class TransientError(Exception):
    """A call that may succeed later: 429, 5xx, a timeout, a dropped connection."""

    def __init__(self, code: str, message: str = "", retry_after: float | None = None):
        super().__init__(f"{code} {message}".strip())
        self.code = code                # short and stable: counted in the job summary
        self.retry_after = retry_after  # seconds the server asked us to wait, if it did


class CallError(Exception):
    """This request was refused and sending it again would not help (a 400 about the input)."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code} {message}".strip())
        self.code = code


class Cancelled(Exception):
    """The job is stopping (Ctrl-C or an abort): no new attempts."""


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


# ------------------------------------------------------------------------------ the client

@dataclass
class Reply:
    """One generateContent answer, reduced to what the pipeline needs."""
    text: str | None
    finish_reason: str | None  # STOP, MAX_TOKENS, SAFETY, ...; PROMPT_<reason>: input blocked
    input_tokens: int = 0
    output_tokens: int = 0     # answer + thinking tokens: both are billed as output


class GeminiClient(Protocol):
    """What the pipeline needs from Gemini: images + prompt + JSON schema -> one Reply."""
    model: str

    def generate(self, images: list[bytes], prompt: str, schema: dict) -> Reply: ...


RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class GenAIClient:
    """`GeminiClient` over the google-genai SDK, with the SDK's own retries switched off.

    Errors come out as TransientError (retry), CallError (this input) or GeminiError (stop
    the job), their messages scrubbed of the API key.
    """

    def __init__(self, settings: GeminiSettings, timeout_s: float = DEFAULT_TIMEOUT_S):
        from google import genai
        from google.genai import types

        self.model = settings.model
        self._key = settings.api_key
        http_options = types.HttpOptions(
            base_url=settings.base_url,
            # A custom endpoint needs the version spelled out; Google's own default is v1beta.
            api_version="v1beta",
            timeout=int(timeout_s * 1000),  # milliseconds
            retry_options=types.HttpRetryOptions(attempts=1),  # our RetryPolicy decides
        )
        self._client = genai.Client(api_key=settings.api_key, vertexai=False,
                                    http_options=http_options)
        self._types = types

    def generate(self, images: list[bytes], prompt: str, schema: dict) -> Reply:
        from google.genai import errors

        types = self._types
        parts = [types.Part.from_bytes(data=image, mime_type="image/jpeg") for image in images]
        config = types.GenerateContentConfig(
            system_instruction=SYSTEM_INSTRUCTION, temperature=0.4,
            max_output_tokens=MAX_OUTPUT_TOKENS, response_mime_type="application/json",
            response_schema=schema,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
        timeouts, transport_errors = _http_errors()
        try:
            response = self._client.models.generate_content(
                model=self.model, contents=[*parts, prompt], config=config)
        except errors.APIError as exc:
            raise self._classify(exc) from None
        except timeouts:
            raise TransientError("timeout", "no answer within the timeout") from None
        except transport_errors as exc:
            raise TransientError("connection", type(exc).__name__) from None
        except (ValueError, TypeError, KeyError) as exc:  # a 200 whose body the SDK cannot read
            detail = redact(f"{type(exc).__name__}: {exc}", self._key)[:300]
            raise CallError("bad_response", detail) from None
        return self._reply(response)

    def _classify(self, exc) -> Exception:
        code = int(exc.code or 0)
        message = redact(str(exc.message or ""), self._key)[:300]
        label = f"{code} {exc.status or ''}".strip()
        if code in RETRYABLE_STATUS:
            return TransientError(label, message, retry_after=retry_after_seconds(exc))
        if code in (401, 403) or "API_KEY" in str(exc.details) or "API key" in message:
            return GeminiError(f"Gemini refused the API key ({label}: {message}); check "
                               f"{' / '.join(KEY_VARIABLES)}")
        if code == 404:
            return GeminiError(f"Gemini model {self.model!r} was not found at the endpoint "
                               f"({label}); check --gemini-model / GEMINI_MODEL")
        return CallError(label, message)

    @staticmethod
    def _reply(response) -> Reply:
        usage = response.usage_metadata
        input_tokens = (usage.prompt_token_count or 0) if usage else 0
        output_tokens = ((usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)
                         if usage else 0)
        if not response.candidates:
            feedback = response.prompt_feedback
            reason = feedback.block_reason if feedback and feedback.block_reason else "NO_ANSWER"
            return Reply(None, f"PROMPT_{getattr(reason, 'value', reason)}", input_tokens,
                         output_tokens)
        candidate = response.candidates[0]
        finish = candidate.finish_reason
        parts = candidate.content.parts if candidate.content and candidate.content.parts else []
        text = "".join(p.text for p in parts if p.text and not p.thought) or None
        return Reply(text, getattr(finish, "value", finish), input_tokens, output_tokens)


def _http_errors() -> tuple[tuple, tuple]:
    """(timeout, transport) exception classes of the HTTP stacks the SDK may use: httpx, and
    httpx2 (a fork the SDK prefers when it is installed)."""
    modules = []
    for name in ("httpx", "httpx2"):
        try:
            modules.append(__import__(name))
        except ImportError:
            pass
    return (tuple(m.TimeoutException for m in modules),
            tuple(m.TransportError for m in modules))


def retry_after_seconds(exc) -> float | None:
    """The wait a 429/503 asks for: the Retry-After header, else google.rpc.RetryInfo."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            moment = email.utils.parsedate_to_datetime(value)  # the HTTP-date form
            if moment is not None:
                return max(0.0, moment.timestamp() - time.time())
    details = exc.details.get("error", exc.details) if isinstance(exc.details, dict) else {}
    for detail in details.get("details", []) if isinstance(details, dict) else []:
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and re.fullmatch(r"\d+(\.\d+)?s", delay):
            return float(delay[:-1])
    return None


# ------------------------------------------------------------------------------ prompts

SYSTEM_INSTRUCTION = (
    "You are an expert in facial expression analysis and the Facial Action Coding System "
    "(FACS). You write training data for a multimodal assistant that recognises facial "
    "expressions and explains them from visible facial evidence.")

GENERATE_PROMPT = """\
{media} shows a person whose facial expression human annotators labelled "{label}". This label \
is the ground truth.{scene}

Answer as JSON:
- "label": exactly "{label}" (the options are: {options}).
- "explanation": 3 to 5 sentences answering "What is the facial expression of the person, and \
why?" as an assistant who sees the {kind}. Name the expression and cite the concrete facial \
evidence consistent with it: the eyebrows, the eyes and eyelids, the mouth and lips, the \
cheeks and nose, and the facial action units (for example AU6 cheek raiser, AU12 lip corner \
puller). Describe only what is visible; do not mention labels, annotators or these \
instructions.
- "action_units": the FACS action units you see, for example ["AU6", "AU12"].
"""

EXPLAIN_PROMPT = """\
What is the facial expression of the person in the image? Choose one from the following \
options: {options}.

Answer as JSON:
- "label": the expression, exactly one of the options.
- "explanation": 3 to 5 sentences that name the expression and cite the visible facial \
evidence: the eyebrows, the eyes and eyelids, the mouth and lips, the cheeks and nose, and the \
facial action units (for example AU6 cheek raiser, AU12 lip corner puller).
- "action_units": the FACS action units you see, for example ["AU6", "AU12"].
"""


def generation_prompt(label: str, label_set: list[str], modality: str = "image",
                      n_frames: int = 1, description: str | None = None) -> str:
    """The PROMPT_VERSION prompt for one sample with a ground-truth label."""
    if modality != "video":
        media, kind = "The image", "image"
    elif n_frames == 1:
        media, kind = "The image, the middle frame of a video clip,", "video"
    else:
        media = f"The {n_frames} images, frames sampled in order from one video clip,"
        kind = "video"
    description = (description or "").strip()
    scene = f"\nScene description: {description}" if description else ""
    return GENERATE_PROMPT.format(media=media, kind=kind, label=label, scene=scene,
                                  options=", ".join(label_set))


def explain_prompt(label_set: list[str]) -> str:
    return EXPLAIN_PROMPT.format(options=", ".join(label_set))


def response_schema(label_set: list[str]) -> dict:
    """The structured-output schema (REST form, OpenAPI subset) of both prompts."""
    return {"type": "OBJECT",
            "properties": {"label": {"type": "STRING", "enum": list(label_set)},
                           "explanation": {"type": "STRING"},
                           "action_units": {"type": "ARRAY", "items": {"type": "STRING"}}},
            "required": ["label", "explanation", "action_units"],
            "propertyOrdering": ["label", "explanation", "action_units"]}


# ------------------------------------------------------------------------------ validation

BLOCKED = {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY",
           "IMAGE_PROHIBITED_CONTENT", "RECITATION", "IMAGE_RECITATION"}
# Words that show an explanation cites facial evidence, as the FERID answers do.
EVIDENCE = re.compile(r"\b(eye\w*|brow\w*|lid\w*|mouth|lips?|cheeks?|nose|nostrils?|jaw|chin|"
                      r"forehead|teeth|smil\w*|frown\w*|wrinkl\w*|gaze|AU\s?\d+)\b", re.I)


@dataclass
class Verdict:
    status: str                  # ok | rejected
    reason: str | None = None    # "<code>: <detail>"; the code is what summaries count
    label: str | None = None
    explanation: str | None = None
    action_units: list[str] = field(default_factory=list)

    @property
    def code(self) -> str | None:
        return self.reason.split(":", 1)[0] if self.reason else None


def validate(reply: Reply, label_set: list[str], truth: str | None = None) -> Verdict:
    """Check an answer; anything not usable as training data comes back rejected with why."""
    finish = reply.finish_reason or "STOP"
    if finish.startswith("PROMPT_") or finish in BLOCKED:
        return Verdict("rejected", f"blocked: finish reason {finish}")
    if finish == "MAX_TOKENS":
        return Verdict("rejected", "truncated: the answer hit the output token limit")
    if finish != "STOP":
        return Verdict("rejected", f"finish_reason: {finish}")
    if not reply.text:
        return Verdict("rejected", "no_answer: the reply has no text")
    try:
        answer = json.loads(reply.text)
    except json.JSONDecodeError as exc:
        return Verdict("rejected", f"malformed_json: {exc.msg} at char {exc.pos}")
    if not isinstance(answer, dict):
        return Verdict("rejected", "malformed_json: expected an object")
    for name in ("label", "explanation"):
        if not isinstance(answer.get(name), str):
            return Verdict("rejected", f"missing_field: {name}")
    raw_label, explanation = answer["label"].strip(), answer["explanation"].strip()
    units = [str(u) for u in answer.get("action_units") or [] if isinstance(u, (str, int))]
    label = normalize_label(raw_label) if raw_label not in label_set else raw_label
    if label not in label_set:
        return Verdict("rejected", f"label_not_in_set: {raw_label!r}", raw_label, explanation,
                       units)
    if truth is not None and label != truth:
        return Verdict("rejected", f"wrong_label: answered {label}, ground truth {truth}",
                       label, explanation, units)
    if not explanation:
        return Verdict("rejected", "empty_explanation: the explanation is empty", label, "", units)
    if not EVIDENCE.search(explanation):
        return Verdict("rejected", "no_facial_evidence: cites no brows, eyes, mouth or AUs",
                       label, explanation, units)
    return Verdict("ok", None, label, explanation, units)


# ------------------------------------------------------------------------------ rate limiter

class RateLimiter:
    """Requests and tokens per minute over a sliding window, shared by all workers.

    `acquire(estimate)` blocks until one more request of about `estimate` tokens fits both
    budgets and returns a ticket; `settle(ticket, actual)` swaps in the real usage once the
    reply says it. A single request larger than the token budget still goes when the window
    is empty (otherwise it could never go).
    """

    def __init__(self, rpm: int | None, tpm: int | None, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep):
        self.rpm, self.tpm, self.window_s = rpm, tpm, window_s
        self._clock, self._sleep = clock, sleep
        self._sent: deque[list] = deque()  # [time, tokens] per request in the window
        self._lock = threading.Lock()

    def _wait_needed(self, now: float, tokens: int) -> float:
        """Seconds until a request of `tokens` fits both budgets (0: it fits now)."""
        while self._sent and self._sent[0][0] <= now - self.window_s:
            self._sent.popleft()
        waits = [0.0]
        if self.rpm and len(self._sent) >= self.rpm:
            waits.append(self._sent[-self.rpm][0] + self.window_s - now)
        if self.tpm and self._sent:
            excess = sum(t for _, t in self._sent) + tokens - self.tpm
            for sent_at, sent_tokens in self._sent:  # oldest first: wait for enough to expire
                if excess <= 0:
                    break
                excess -= sent_tokens
                waits.append(sent_at + self.window_s - now)
        return max(waits)

    def acquire(self, tokens: int = 0, stop: threading.Event | None = None) -> list:
        while True:
            with self._lock:
                now = self._clock()
                delay = self._wait_needed(now, tokens)
                if delay <= 0:
                    ticket = [now, tokens]
                    self._sent.append(ticket)
                    return ticket
            if stop is None:
                self._sleep(delay)
            elif stop.wait(delay):
                raise Cancelled()

    def settle(self, ticket: list, tokens: int) -> None:
        with self._lock:
            ticket[1] = tokens


# ------------------------------------------------------------------------------ retries

@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter; a server's Retry-After is a floor on the wait."""
    attempts: int = 6
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    max_retry_after_s: float = 600.0  # asked to wait longer (a daily quota): give up instead

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = rng.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** attempt))
        return max(backoff, retry_after or 0.0)


@dataclass
class CallResult:
    reply: Reply
    attempts: int


def call_with_retry(call: Callable[[], Reply], policy: RetryPolicy,
                    limiter: RateLimiter | None = None, estimate: int = 0,
                    stop: threading.Event | None = None, rng: random.Random | None = None,
                    what: str = "request") -> CallResult:
    """Run `call` until it answers; TransientError is retried, anything else goes up.

    Raises the last TransientError when the attempts run out, Cancelled when `stop` is set.
    """
    stop = stop or threading.Event()
    rng = rng or random.Random()
    for attempt in range(policy.attempts):
        if stop.is_set():
            raise Cancelled()
        ticket = limiter.acquire(estimate, stop) if limiter else None
        try:
            reply = call()
        except Exception as exc:
            if limiter:
                limiter.settle(ticket, 0)  # refused requests are not billed
            if not isinstance(exc, TransientError):
                raise
            if attempt + 1 == policy.attempts:
                raise
            if exc.retry_after and exc.retry_after > policy.max_retry_after_s:
                raise TransientError(exc.code, f"server asks to wait {exc.retry_after:.0f}s; "
                                     "try again later") from None
            delay = policy.delay(attempt, exc.retry_after, rng)
            log.info("%s: %s; retry %d/%d in %.1fs", what, exc, attempt + 1,
                     policy.attempts - 1, delay)
            if stop.wait(delay):
                raise Cancelled() from None
            continue
        if limiter:
            limiter.settle(ticket, reply.input_tokens + reply.output_tokens)
        return CallResult(reply, attempt + 1)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ media

IMAGE_TOKENS = 258       # Gemini bills an image up to 384 px (or one 768 px tile) as 258 tokens
MAX_SIDE = 768           # larger images are tiled (more tokens) for no gain on a face crop


def encode_jpeg(rgb: np.ndarray, max_side: int = MAX_SIDE, quality: int = 90) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def sample_images(path: str | os.PathLike, modality: str, frames: int = 1) -> list[bytes]:
    """JPEG bytes to send for a sample: the image, or a video's centre frame / `frames` frames."""
    from core.media import center_frame, load_image, load_video

    if modality != "video":
        return [encode_jpeg(load_image(path))]
    if frames <= 1:
        return [encode_jpeg(center_frame(path))]
    return [encode_jpeg(frame) for frame in load_video(path, num_frames=frames).frames]


def _estimate_tokens(images: list[bytes], prompt: str) -> int:
    return IMAGE_TOKENS * len(images) + len(prompt) // 4 + 600  # 600: a typical answer


# ------------------------------------------------------------------------------ the batch job

@dataclass
class Item:
    """One sample to ask about, detached from its DB session."""
    sample_id: int
    media_path: str
    modality: str
    label: str
    description: str | None
    replaces: int | None = None  # a rejected suggestion this answer replaces (--retry-rejected)


@dataclass
class Outcome:
    item: Item
    kind: str                       # answered | failed | cancelled
    reply: Reply | None = None
    verdict: Verdict | None = None
    attempts: int = 0
    error: str | None = None        # failure code, counted in the summary


@dataclass
class Summary:
    dataset: str
    model: str
    source: str
    prompt_version: str = PROMPT_VERSION
    selected: int = 0
    skipped: int = 0                # already had a suggestion for (source, prompt version)
    unlabelled: int = 0             # no ground truth: nothing to generate from
    in_batch: int = 0               # left to an open Batch API job (annotation/gemini_batch.py)
    ok: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    failed_by_reason: Counter = field(default_factory=Counter)
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict:
        cost = estimate_cost(self.model, self.input_tokens, self.output_tokens)
        return {
            "dataset": self.dataset, "model": self.model, "source": self.source,
            "prompt_version": self.prompt_version, "selected": self.selected,
            "skipped": self.skipped, "unlabelled": self.unlabelled, "in_batch": self.in_batch,
            "ok": self.ok,
            "rejected": sum(self.rejected_by_reason.values()),
            "rejected_by_reason": dict(self.rejected_by_reason.most_common()),
            "failed": sum(self.failed_by_reason.values()),
            "failed_by_reason": dict(self.failed_by_reason.most_common()),
            "requests": self.requests, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "estimated_cost_usd": cost,
            "cost_note": ("an estimate from list prices (PRICES_USD_PER_MTOK in "
                          "annotation/gemini.py), not a bill" if cost is not None else
                          f"no list price for {self.model}: add it to PRICES_USD_PER_MTOK"),
            "interrupted": self.interrupted,
            "elapsed_s": round(time.monotonic() - self.started, 2),
        }


def _select(session, dataset, source: str, retry_rejected: bool, limit: int | None,
            summary: Summary, exclude: set[int] | frozenset = frozenset()) -> list[Item]:
    """The samples still to do, in id order; counts the ones already done. `exclude`: samples
    an open Batch API job is answering (asking them online too would pay twice)."""
    from sqlalchemy import select

    from db.models import Sample, Suggestion

    done = {sample_id: (sid, status) for sample_id, sid, status in session.execute(
        select(Suggestion.sample_id, Suggestion.id, Suggestion.status)
        .join(Sample, Sample.id == Suggestion.sample_id)
        .where(Sample.dataset_id == dataset.id, Suggestion.source == source,
               Suggestion.prompt_version == PROMPT_VERSION))}
    items = []
    for sample in session.scalars(select(Sample).where(Sample.dataset_id == dataset.id)
                                  .order_by(Sample.id)):
        if sample.id in exclude:
            summary.in_batch += 1
            continue
        previous = done.get(sample.id)
        if previous and not (retry_rejected and previous[1] == "rejected"):
            summary.skipped += 1
            continue
        if not sample.label:
            summary.unlabelled += 1
            continue
        if limit is not None and len(items) >= limit:
            continue
        items.append(Item(sample.id, sample.media_path, sample.modality, sample.label,
                          (sample.meta or {}).get("description"),
                          replaces=previous[0] if previous else None))
    return items


def _store(url: str | None, source: str, outcome: Outcome) -> bool:
    """Write one answered sample; False when another job stored it first."""
    from sqlalchemy.exc import IntegrityError

    from db.models import Suggestion
    from db.session import session_scope

    reply, verdict, item = outcome.reply, outcome.verdict, outcome.item
    try:
        with session_scope(url) as session:
            if item.replaces is not None:  # --retry-rejected: the new answer takes its place
                old = session.get(Suggestion, item.replaces)
                if old is not None:
                    session.delete(old)
                    session.flush()
            session.add(Suggestion(
                sample_id=item.sample_id, source=source, prompt_version=PROMPT_VERSION,
                status=verdict.status, reject_reason=verdict.reason,
                finish_reason=reply.finish_reason, label=verdict.label,
                category_answer=verdict.label if verdict.status == "ok" else None,
                explanation=verdict.explanation, raw=(reply.text or "")[:20_000] or None,
                input_tokens=reply.input_tokens, output_tokens=reply.output_tokens))
    except IntegrityError:
        log.warning("sample %d: already stored by another job; keeping that one", item.sample_id)
        return False
    return True


def _run_pool(items: list[Item], ask: Callable[[Item], Outcome],
              record: Callable[[Outcome], None], workers: int, stop: threading.Event) -> None:
    """Ask about items with at most `workers` requests in flight, recording each answer as it
    arrives (so a kill loses at most the answers in flight). On Ctrl-C or an abort: no new
    attempts, the answers already in flight are still recorded, then the exception goes up."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gemini")
    pending: dict[Future, Item] = {}
    queue = iter(items)

    def refill() -> None:
        while len(pending) < workers and not stop.is_set():
            item = next(queue, None)
            if item is None:
                return
            pending[pool.submit(ask, item)] = item

    try:
        refill()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                del pending[future]
                record(future.result())
            refill()
    except BaseException:
        stop.set()
        if pending:
            log.warning("stopping: saving the %d answer(s) in flight (Ctrl-C again to drop them)",
                        len(pending))
        for future in list(pending):
            if future.cancel():
                continue
            try:
                record(future.result())
            except Exception:
                pass  # an abort reason is already on its way up
        raise
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


def run_generation(dataset: str, limit: int | None = None, model: str | None = None, *,
                   workers: int = 4, rpm: int | None = DEFAULT_RPM,
                   tpm: int | None = DEFAULT_TPM, retry_rejected: bool = False,
                   frames: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S,
                   retry: RetryPolicy | None = None, url: str | None = None,
                   client: GeminiClient | None = None,
                   progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Gemini instruction data for the samples of `dataset` that have none yet (resumable).

        python app.py generate --dataset rafdb --limit 50 [--json]

    `progress(done, total, summary_dict)` is called as samples finish (the CLI drives tqdm
    with it, the web UI gr.Progress). Returns the summary dict: ok / rejected_by_reason /
    failed_by_reason counts, tokens and the estimated cost. Failed calls store nothing, so
    the next run retries them; rejected answers are kept (pass retry_rejected to redo them).
    """
    from sqlalchemy import select

    from db.models import Dataset
    from db.session import init_db, session_scope

    for name, value in (("limit", limit), ("workers", workers), ("rpm", rpm), ("tpm", tpm),
                        ("frames", frames)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1")
    if timeout_s <= 0:
        raise UserError("--timeout must be a positive number of seconds")
    if client is None:
        client = GenAIClient(gemini_settings(model), timeout_s=timeout_s)
    source = f"gemini:{client.model}"
    retry = retry or RetryPolicy()
    init_db(url)
    summary = Summary(dataset=dataset, model=client.model, source=source)
    with session_scope(url) as session:
        ds = session.scalars(select(Dataset).where(Dataset.name == dataset)).first()
        if ds is None:
            raise UserError(f"unknown dataset {dataset!r}: import it first (python app.py import)")
        label_set = list(ds.label_set)
        from annotation.gemini_batch import open_batch_samples

        items = _select(session, ds, source, retry_rejected, limit, summary,
                        open_batch_samples(session, ds.id, source))
    summary.selected = len(items)
    schema = response_schema(label_set)
    limiter = RateLimiter(rpm, tpm)
    stop = threading.Event()
    tally = threading.Lock()
    done = 0

    def ask(item: Item) -> Outcome:
        what = f"sample {item.sample_id}"
        try:
            images = sample_images(item.media_path, item.modality, frames)
        except MediaError as exc:
            log.warning("%s: %s", what, exc)
            return Outcome(item, "failed", error="media")
        prompt = generation_prompt(item.label, label_set, item.modality, len(images),
                                   item.description)
        attempts = [0]

        def call() -> Reply:
            attempts[0] += 1
            return client.generate(images, prompt, schema)

        try:
            result = call_with_retry(call, retry, limiter, _estimate_tokens(images, prompt),
                                     stop, what=what)
        except Cancelled:
            return Outcome(item, "cancelled", attempts=attempts[0])
        except (TransientError, CallError) as exc:
            log.warning("%s: failed after %d attempt(s): %s", what, attempts[0], exc)
            return Outcome(item, "failed", attempts=attempts[0], error=exc.code)
        finally:
            with tally:
                summary.requests += attempts[0]
        return Outcome(item, "answered", result.reply,
                       validate(result.reply, label_set, item.label), result.attempts)

    def record(outcome: Outcome) -> None:
        nonlocal done
        if outcome.kind == "cancelled":
            return
        done += 1
        if outcome.kind == "failed":
            summary.failed_by_reason[outcome.error] += 1
        else:
            summary.input_tokens += outcome.reply.input_tokens
            summary.output_tokens += outcome.reply.output_tokens
            if _store(url, source, outcome):
                if outcome.verdict.status == "ok":
                    summary.ok += 1
                else:
                    summary.rejected_by_reason[outcome.verdict.code] += 1
                    log.info("sample %d: rejected (%s)", outcome.item.sample_id,
                             outcome.verdict.reason)
        if progress:
            progress(done, len(items), summary.to_dict())

    if progress:
        progress(0, len(items), summary.to_dict())
    log.info("generate %s with %s (%s): %d to do, %d already done", dataset, source,
             PROMPT_VERSION, len(items), summary.skipped)
    try:
        _run_pool(items, ask, record, workers, stop)
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("interrupted after %d of %d samples; run again to continue", done, len(items))
        raise
    return summary.to_dict()


# ------------------------------------------------------------------------------ on demand

_clients: dict[tuple, GenAIClient] = {}
_clients_lock = threading.Lock()


def default_client(model: str | None = None, timeout_s: float = 60.0) -> GenAIClient:
    """One SDK client per (settings, timeout) per process, for on-demand calls."""
    settings = gemini_settings(model)
    key = (settings, timeout_s)  # GeminiSettings is frozen: hashable, its key never printed
    with _clients_lock:
        if key not in _clients:
            _clients[key] = GenAIClient(settings, timeout_s=timeout_s)
        return _clients[key]


def _explain_version(label_set: list[str]) -> str:
    """EXPLAIN_PROMPT_VERSION plus the label set: the cache must not mix option lists."""
    digest = hashlib.sha256(",".join(label_set).encode()).hexdigest()[:8]
    return f"{EXPLAIN_PROMPT_VERSION}-{digest}"


def _media_for_explain(image) -> tuple[str, bytes]:
    """(content hash, JPEG bytes) of an RGB array or a media path (a video: its centre frame)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise MediaError(f"expected an RGB image array, got shape {image.shape}")
        array = np.ascontiguousarray(image, dtype=np.uint8)
        digest = hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()
        return digest, encode_jpeg(array)
    from core.media import content_hash
    from core.media import media_kind

    path = Path(image)
    if not path.exists():
        raise MediaError(f"{path.name}: no such file")
    return content_hash(path), sample_images(path, media_kind(path))[0]


def gemini_explain(image: np.ndarray | str | os.PathLike, url: str | None = None, *,
                   label_set: Iterable[str] | None = None, model: str | None = None,
                   client: GeminiClient | None = None,
                   retry: RetryPolicy | None = None) -> dict:
    """Gemini's label and explanation for an image with no ground truth (the Compare tab).

        gemini_explain("face.jpg") -> {"label": "happiness", "explanation": "...",
                                       "cached": False, "source": "gemini:gemini-2.5-flash", ...}

    Cached by content hash in ExplainCache: the same picture is paid for once.
    """
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    from db.models import ExplainCache
    from db.session import init_db, session_scope

    labels = list(label_set or WITH_CONTEMPT8)
    client = client or default_client(model)
    source, version = f"gemini:{client.model}", _explain_version(labels)
    digest, jpeg = _media_for_explain(image)
    init_db(url)

    def lookup() -> dict | None:
        with session_scope(url) as session:
            row = session.scalars(select(ExplainCache).where(
                ExplainCache.content_hash == digest, ExplainCache.source == source,
                ExplainCache.prompt_version == version)).first()
            if row is None:
                return None
            return {"label": row.label, "explanation": row.explanation, "cached": True,
                    "source": source, "prompt_version": version, "content_hash": digest,
                    "input_tokens": row.input_tokens, "output_tokens": row.output_tokens}

    cached = lookup()
    if cached:
        return cached
    prompt = explain_prompt(labels)
    try:
        result = call_with_retry(lambda: client.generate([jpeg], prompt, response_schema(labels)),
                                 retry or RetryPolicy(attempts=3), what="gemini_explain")
    except TransientError as exc:
        raise GeminiError(f"Gemini is not answering right now ({exc}); try again shortly") from None
    except CallError as exc:
        raise GeminiError(f"Gemini refused the request ({exc})") from None
    verdict = validate(result.reply, labels)
    if verdict.status != "ok":
        raise GeminiError(f"Gemini's answer is not usable ({verdict.reason})")
    reply = result.reply
    try:
        with session_scope(url) as session:
            session.add(ExplainCache(content_hash=digest, source=source, prompt_version=version,
                                     label=verdict.label, explanation=verdict.explanation,
                                     input_tokens=reply.input_tokens,
                                     output_tokens=reply.output_tokens))
    except IntegrityError:  # a concurrent request cached it first: serve that one
        return lookup()
    return {"label": verdict.label, "explanation": verdict.explanation, "cached": False,
            "source": source, "prompt_version": version, "content_hash": digest,
            "input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens}
