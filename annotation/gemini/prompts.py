"""The versioned prompts and the JSON schema Gemini answers in (bump PROMPT_VERSION on any change).
"""
from __future__ import annotations


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
