"""Cells of an imported file, as an error message may show them: short, escaped excerpts.

The imported file may be anything an admin typed a path to (/proc/self/environ, a key file), so
a message quotes at most a short, escaped excerpt of one cell (`quote`), describes rather than
shows a cell that is not a plain word or number, and `clean` caps whatever a summary prints.
"""
from __future__ import annotations

import csv
import re

QUOTE_LIMIT = 40     # characters of a cell an error message may show
MESSAGE_LIMIT = 300  # characters of any one "where" or "reason" in a summary


def _escape(ch: str) -> str:
    """One character as repr() would show it inside '...': control characters never pass."""
    if ch == "'":
        return "\\'"
    if ch == "\\":
        return "\\\\"
    return ch if ch.isprintable() else repr(ch)[1:-1]


def quote(text: object, limit: int = QUOTE_LIMIT, tail: bool = False) -> str:
    """A cell as an error message may show it: '...' with at most `limit` escaped characters.

    The imported file may be anything an admin typed a path to (/proc/self/environ, a key
    file): a message quotes a short, escaped excerpt of one cell, never a line. `tail` keeps the
    end instead (a file path's end is its name).
    """
    chars = list(str(text))
    if tail:
        chars.reverse()
    body, used = [], 0
    for ch in chars:
        piece = _escape(ch)
        if used + len(piece) > limit:
            break
        body.append(piece)
        used += len(piece)
    cut = len(body) < len(chars)
    if tail:
        return "'" + ("…" if cut else "") + "".join(reversed(body)) + "'"
    return "'" + "".join(body) + ("…" if cut else "") + "'"


# A plain word no longer than a label name can be (the longest, "disappointment", has 14).
_WORD_CELL = re.compile(r"[A-Za-z][A-Za-z' _\-]{0,15}")


def quote_word(text: str) -> str:
    """A label or split cell: quoted when it is a short plain word (a typo the user wants to
    see), else only described: keys and passwords have digits, symbols or length, so a cell of
    some other file (KEY=value lines) is never shown."""
    text = text.strip()
    if _WORD_CELL.fullmatch(text):
        return quote(text)
    return f"(a {len(text)}-character cell)"


def quote_code(text: str) -> str:
    """A cell that should hold a number (a label code, a pixel): quoted only if short."""
    text = text.strip()
    if re.fullmatch(r"[\w.+\-]{1,6}", text):
        return quote(text)
    return f"(a {len(text)}-character cell)"


def clean(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """The last line of defence for anything a summary shows: no control characters, capped."""
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
    return out if len(out) <= limit else out[:limit - 1] + "…"


def has_control(text: str) -> bool:
    return any(not ch.isprintable() for ch in text)


def csv_problem(exc: csv.Error) -> str:
    """The csv module's complaint in words; its messages never carry the row's text."""
    message = str(exc)
    if "new-line character" in message:
        return "malformed CSV row: a stray carriage return (CR) inside a field"
    if "field larger than field limit" in message:
        return f"malformed CSV row: a field over {csv.field_size_limit():,} characters"
    return f"malformed CSV row ({clean(message, 80)})"
