"""Which Gemini model, which key, how fast: settings from the environment, and list prices.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from core.errors import UserError


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
