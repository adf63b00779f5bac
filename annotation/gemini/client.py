"""The Gemini client: the small `GeminiClient` interface the rest talks to, and `GenAIClient`,
the google-genai SDK behind it (the only place the SDK is used), with what its calls can raise.
"""
from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from typing import Protocol

from annotation.gemini.prompts import SYSTEM_INSTRUCTION
from annotation.gemini.settings import (DEFAULT_TIMEOUT_S, GeminiSettings, KEY_VARIABLES,
                                        MAX_OUTPUT_TOKENS)
from core.errors import UserError


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
        timeouts, transport_errors = http_errors()
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


def http_errors() -> tuple[tuple, tuple]:
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
