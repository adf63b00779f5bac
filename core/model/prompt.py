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
_CHILD_AGES = {"0-2", "3-9", "0-9"}  # FairFace's brackets below ten, and our first decade band
# What an attribute source may say instead of a race it did not estimate: left out, never written.
_UNKNOWN = {"", "?", "unknown", "not estimated", "none", "n/a"}


def age_band(years: float) -> str:
    """The decade band an age goes into the prompt as: 33.3 -> "30-39"; 80 and over -> "80+".

    Rounded half up first (as the age network's own C++ did, std::lround). Its top bin is 80,
    so "80+" is as precise as it gets up there."""
    rounded = int(max(0.0, float(years)) + 0.5)
    if rounded >= 80:
        return "80+"
    low = rounded // 10 * 10
    return f"{low}-{low + 9}"


def _age_text(age: str, years) -> str:
    """The age as a band: a bracket as given ("30-39", "70+"), a bare number as its decade band;
    the expected age in years when there is no bracket."""
    if age:
        try:
            return age_band(float(age))
        except ValueError:
            return age
    if years is not None:
        try:
            return age_band(float(years))
        except (TypeError, ValueError):
            return ""
    return ""


def agr_sentence(attributes) -> str:
    """The handcrafted age-gender-race prompt of the paper, or "" when attributes are unknown.

    >>> agr_sentence(Attributes(age="30-39", gender="female", race="East Asian"))
    'The person appears to be a 30-39 year old East Asian woman.'
    >>> agr_sentence(Attributes(age="30-39", gender="female", race=""))    # the default network
    'The person appears to be a 30-39 year old woman.'

    Parts the attribute network did not give are left out, never guessed: the default network
    (core/attributes.py) estimates age and gender only, so its sentences name no race.
    """
    if attributes is None:
        return ""
    age, gender, race = (str(getattr(attributes, k, "") or "").strip() for k in ("age", "gender", "race"))
    age = _age_text(age, getattr(attributes, "age_years", None))
    if race.lower() in _UNKNOWN:
        race = ""
    if gender.lower() in _UNKNOWN:
        gender = ""
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
