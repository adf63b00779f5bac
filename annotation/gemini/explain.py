"""On-demand explanations for the Compare tab, cached per image content and prompt version.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from annotation.gemini.client import (CallError, GeminiClient, GeminiError, GenAIClient,
                                      TransientError)
from annotation.gemini.limits import RetryPolicy, call_with_retry
from annotation.gemini.media import encode_jpeg, sample_images
from annotation.gemini.prompts import explain_prompt, response_schema
from annotation.gemini.settings import EXPLAIN_PROMPT_VERSION, gemini_settings
from annotation.gemini.validation import validate
from core.errors import MediaError
from core.labels import WITH_CONTEMPT8


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
