"""The embedded default behind the engine's model interface: no EMO-LLaMA checkpoint, so the
label and scores come from the face prior network and there is no explanation.

    model = PriorOnlyModel()                       # what Engine(None) serves
    model.answer(faces, label_set, prior_labels)   # {"label", "scores", "explanation": "", "note"}

It has no LLM and nothing to batch: the engine asks it in the preprocessing pool, right after the
face analysis (`answers_from_faces`). The largest face of each frame gives its prior's
probabilities; a video's are averaged over the frames with a face. Labels the prior network does
not know are left out and named in the note, not scored 0. A file with no face gets label None,
scores {} and a note saying so: nothing is invented. torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import UserError
from core.priors import DEFAULT_PRIOR

PRIOR_ONLY_NOTE = ("No EMO-LLaMA checkpoint is loaded: the label and scores come from the face "
                   "prior network (FER2013 mini-Xception) and there is no explanation. Set "
                   "EMO_LLAMA_MODEL to a checkpoint folder or hub id, or start with "
                   "`python app.py serve --model DIR`.")


@dataclass
class PriorOnlyConfig:
    """The few config fields the engine reads of any model (core/model/config.py has them all)."""
    prior: str = DEFAULT_PRIOR
    num_frames: int = 8           # frames sampled from a video (the recipe's default)
    use_agr: bool = True          # the AGR sentence is reported as a checkpoint would be told it
    is_tiny: bool = False
    zero_shot: bool = False


class PriorOnlyModel:
    answers_from_faces = True  # the engine answers in preprocessing: no scoring or decoding pass
    llm = None

    def __init__(self, prior: str = DEFAULT_PRIOR):
        self.config = PriorOnlyConfig(prior=prior)

    @property
    def version(self) -> str:
        return f"prior-only:{self.config.prior}"

    def answer(self, faces: list[list], label_set: list[str] | None, prior_labels: list[str]) -> dict:
        """Label, scores, explanation ("") and note from the faces' prior probabilities."""
        labels = label_set or prior_labels
        known = [label for label in labels if label in prior_labels]
        if not known:
            raise UserError(f"without an EMO-LLaMA checkpoint only {', '.join(prior_labels)} can be "
                            f"scored, not {', '.join(labels)}; load a checkpoint (EMO_LLAMA_MODEL / --model)")
        note = PRIOR_ONLY_NOTE
        if len(known) < len(labels):
            missing = ", ".join(label for label in labels if label not in prior_labels)
            note = f"The prior network cannot score {missing}; left out. " + note
        frame_priors = [fs[0].prior for fs in faces if fs]
        if not frame_priors:
            return {"label": None, "scores": {}, "explanation": "",
                    "note": "No face found, so the prior network has nothing to score. " + note}
        mean = {label: float(np.mean([p[label] for p in frame_priors])) for label in known}
        total = sum(mean.values()) or 1.0
        scores = {label: v / total for label, v in mean.items()}
        return {"label": max(scores, key=scores.get), "scores": scores, "explanation": "", "note": note}

    def release(self) -> None:
        """Nothing to free (the engine releases swapped-out versions)."""
