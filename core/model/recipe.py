"""The recipe: the questions, frames and answer length a checkpoint is trained, evaluated and served with.

One set of choices, kept in the checkpoint's config.json (EmoLlamaConfig), read everywhere:

    conversation_phrasings  the free-form questions trained on (one per record, picked by the
                            media's content hash); the FIRST one is what serving and evaluation ask
    category_phrasing       the label question ("{medium}", "{options}" filled in)
    num_frames              frames sampled per video (training, evaluation and the engine)
    max_new_tokens          the longest explanation generated
    template                the conversation template (core/model/templates.py)

    conversation_question("video", config)           # what the engine asks for an explanation
    category_question(labels, "image", config)       # what labels are scored against
    frames(config, override)                         # override (a flag) or config.num_frames

Functions take the config (anything with these attributes) or None for the defaults below:
export runs without a model, so its records use the defaults, which are every config's defaults
too; training re-asks each record with the trained model's own phrasings (record_question).
"""
from __future__ import annotations

DEFAULT_CATEGORY_PHRASING = ("What is the facial expression of the person in the {medium}? "
                             "Choose one from the following options: {options}.")
DEFAULT_CONVERSATION_PHRASINGS = (
    "Describe the facial expression of the person in the {medium} and explain which facial "
    "cues support your judgement.",
    "What emotion does the person in the {medium} show? Explain your answer by citing the "
    "facial evidence (brows, eyes, mouth, action units).",
    "Analyse the face in the {medium}: which expression is it, and what in the face tells you so?",
)
DEFAULT_NUM_FRAMES = 8


def conversation_phrasings(config=None) -> list[str]:
    """The free-form questions trained on, in order (the first is the serving question)."""
    return list(getattr(config, "conversation_phrasings", None) or DEFAULT_CONVERSATION_PHRASINGS)


def category_phrasing(config=None) -> str:
    return getattr(config, "category_phrasing", None) or DEFAULT_CATEGORY_PHRASING


def category_question(label_set: list[str], medium: str = "image", config=None) -> str:
    """The label question: every option, in order."""
    return category_phrasing(config).replace("{medium}", medium).replace("{options}", ", ".join(label_set))


def conversation_question(medium: str = "image", config=None) -> str:
    """The explanation question serving and evaluation ask: the first training phrasing."""
    return conversation_phrasings(config)[0].replace("{medium}", medium)


def training_conversation_question(medium: str, content_hash: str, config=None) -> str:
    """The phrasing a record trains on, picked by its media's content hash (every run agrees)."""
    phrasings = conversation_phrasings(config)
    return phrasings[int(content_hash, 16) % len(phrasings)].replace("{medium}", medium)


def record_text_question(record: dict) -> str:
    """The human turn of an exported record without its media token."""
    human = next(t["value"] for t in record["conversations"] if t["from"] == "human")
    return human.replace("<image>", "").replace("<video>", "").strip()


def record_question(record: dict, config=None, label_set: list[str] | None = None) -> str:
    """The question to train a record on with `config`'s recipe: a category record is asked the
    category phrasing (over `label_set`, the snapshot's), a conversation record its phrasing by
    content hash; anything else (or a record missing what that needs) keeps its own text."""
    medium = "video" if "video" in record else "image"
    task = record.get("task")
    if task == "conversation" and record.get("content_hash"):
        return training_conversation_question(medium, record["content_hash"], config)
    if task == "category" and label_set:
        return category_question(label_set, medium, config)
    return record_text_question(record)


def frames(config=None, override: int | None = None) -> int:
    """Frames per video: an explicit override (a flag, an option), else the checkpoint's."""
    if override:
        return int(override)
    return int(getattr(config, "num_frames", None) or DEFAULT_NUM_FRAMES)


def new_tokens(config=None, override: int | None = None) -> int | None:
    """The longest generated answer: an explicit override, else the checkpoint's."""
    return int(override) if override else getattr(config, "max_new_tokens", None)
