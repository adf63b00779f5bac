"""Is an answer usable? Blocked, truncated, malformed, contradicting the ground truth, or citing
no facial evidence: rejected with the reason.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from annotation.gemini.client import Reply
from core.labels import normalize_label


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
