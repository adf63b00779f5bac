"""The words around the media: the questions, the AGR sentence, the conversation layout.

The LLM sees   [BOS] <template prefix> [media tokens] <AGR sentence> <question> <template suffix> <answer>
where [media tokens] are embeddings, not text; the rest is the checkpoint's conversation template
(core/model/templates.py) rendered around the user message and split at MEDIA_MARKER, which
stands where LLaMA-VID puts "<image>". The questions come from the checkpoint's recipe
(core/model/recipe.py).
"""
from __future__ import annotations

from core.model.recipe import DEFAULT_CATEGORY_PHRASING
from core.model.recipe import category_question, conversation_question  # noqa: F401  (re-exported)
from core.model.templates import MEDIA_MARKER, ConversationTemplate

CATEGORY_QUESTION = DEFAULT_CATEGORY_PHRASING
# NOT the serving question (that is recipe.conversation_question: the checkpoint's first training
# phrasing, DEFAULT_CONVERSATION_PHRASINGS[0] by default). Kept, word for word, because the tiny
# tokenizer learns its merges from it (core/model/build.py tiny_corpus): changing it changes every
# tiny test checkpoint's vocabulary, hence its random weights.
CONVERSATION_QUESTION = ("Describe the facial expression of the person in the {medium} and the "
                         "facial evidence for it.")

_GENDER_NOUNS = {"female": "woman", "male": "man"}
_CHILD_NOUNS = {"female": "girl", "male": "boy"}
_CHILD_AGES = {"0-2", "3-9"}  # FairFace's brackets below ten


def agr_sentence(attributes) -> str:
    """The handcrafted age-gender-race prompt of the paper, or "" when attributes are unknown.

    >>> agr_sentence(Attributes(age="30-39", gender="female", race="East Asian"))
    'The person appears to be a 30-39 year old East Asian woman.'

    Parts the attribute network did not give are left out, never guessed.
    """
    if attributes is None:
        return ""
    age, gender, race = (str(getattr(attributes, k, "") or "").strip() for k in ("age", "gender", "race"))
    if not (age or gender or race):
        return ""
    nouns = _CHILD_NOUNS if age in _CHILD_AGES else _GENDER_NOUNS
    words = [f"{age} year old" if age else "", race, nouns.get(gender.lower(), "person")]
    phrase = " ".join(w for w in words if w)
    article = "an" if phrase[0].lower() in "aeiou" or phrase.startswith(("8", "11", "18")) else "a"
    return f"The person appears to be {article} {phrase}."


def user_message(question: str, attributes=None) -> str:
    """The user turn: media first, then what we know about the person, then the question."""
    parts = [MEDIA_MARKER, agr_sentence(attributes), question.strip()]
    return "\n".join(p for p in parts if p)


def split_prompt(template: ConversationTemplate, question: str, attributes=None) -> tuple[str, str]:
    """(text before the media, text after it, up to where the assistant's answer starts).

    BOS is not text: the caller puts the tokenizer's BOS id in front when `template.add_bos`."""
    return template.split(user_message(question, attributes), MEDIA_MARKER)
