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
`GenAIClient` (client.py); the rest of the package talks to the small `GeminiClient` interface. The API key
comes from GEMINI_API_KEY or GOOGLE_API_KEY and is never logged, stored or put in an error.

Whole datasets at about half the price: Gemini's Batch API, `generate --batch` (batch.py)
sends these same requests as one JSONL job; samples in an open batch are left out of online runs.

The package, in reading order: settings.py (model, key, list prices), client.py (the SDK behind
one small interface, and its errors), prompts.py, validation.py, limits.py (rate limiter,
retries), media.py (what Gemini is shown), job.py (the generation job), batch.py (the Batch
API), explain.py (on-demand explanations, cached).
"""
from annotation.gemini.client import GeminiError
from annotation.gemini.explain import gemini_explain
from annotation.gemini.job import run_generation
from annotation.gemini.settings import DEFAULT_MODEL, DEFAULT_RPM, DEFAULT_TPM, PROMPT_VERSION

__all__ = ["DEFAULT_MODEL", "DEFAULT_RPM", "DEFAULT_TPM", "PROMPT_VERSION", "GeminiError", "gemini_explain",
           "run_generation"]
