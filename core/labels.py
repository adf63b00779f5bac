"""Canonical expression names, the label sets of each dataset, and free text -> label."""
from __future__ import annotations

import re

CANONICAL = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger",
             "contempt", "anxiety", "helplessness", "disappointment"]

BASIC7 = CANONICAL[:7]
WITH_CONTEMPT8 = CANONICAL[:8]
MAFW11 = CANONICAL[:11]

LABEL_SETS: dict[str, list[str]] = {
    "basic7": BASIC7,
    "affectnet8": WITH_CONTEMPT8,
    "ferplus8": WITH_CONTEMPT8,
    "mafw11": MAFW11,
}

SYNONYMS: dict[str, str] = {
    "neutral": "neutral", "calm": "neutral", "expressionless": "neutral",
    "happiness": "happiness", "happy": "happiness", "joy": "happiness", "joyful": "happiness",
    "smiling": "happiness", "smile": "happiness",
    "sadness": "sadness", "sad": "sadness", "sorrow": "sadness", "unhappy": "sadness",
    "surprise": "surprise", "surprised": "surprise", "astonished": "surprise",
    "fear": "fear", "afraid": "fear", "fearful": "fear", "scared": "fear", "frightened": "fear",
    "disgust": "disgust", "disgusted": "disgust",
    "anger": "anger", "angry": "anger", "furious": "anger", "mad": "anger",
    "contempt": "contempt", "contemptuous": "contempt", "scorn": "contempt",
    "anxiety": "anxiety", "anxious": "anxiety", "worried": "anxiety", "nervous": "anxiety",
    "helplessness": "helplessness", "helpless": "helplessness",
    "disappointment": "disappointment", "disappointed": "disappointment",
}

_WORD = re.compile(r"[a-z]+")


def normalize_label(word: str) -> str | None:
    """One label word ("Happy", "angry") -> canonical name, or None if it is not a label."""
    return SYNONYMS.get(word.strip().lower())


def parse_label(text: str, label_set: list[str] | None = None) -> str | None:
    """The first expression named in free text, restricted to `label_set` when given.

    "The person looks happy, with raised cheeks" -> "happiness". Returns None when no known
    expression word appears.
    """
    allowed = set(label_set) if label_set else None
    for word in _WORD.findall(text.lower()):
        label = SYNONYMS.get(word)
        if label and (allowed is None or label in allowed):
            return label
    return None
