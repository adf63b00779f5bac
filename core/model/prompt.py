"""The words around the media: instruction templates, the AGR sentence, the chat layout.

The LLM sees   <chat prefix> [media tokens] <AGR sentence> <question> <chat suffix> <answer>
where [media tokens] are embeddings, not text; everything else goes through the tokenizer's
chat template, split at MEDIA_MARKER.
"""
from __future__ import annotations

MEDIA_MARKER = "<media>"

CATEGORY_QUESTION = ("What is the facial expression of the person in the {medium}? "
                     "Choose one from the following options: {options}.")
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


def category_question(label_set: list[str], medium: str = "image") -> str:
    return CATEGORY_QUESTION.format(medium=medium, options=", ".join(label_set))


def conversation_question(medium: str = "image") -> str:
    return CONVERSATION_QUESTION.format(medium=medium)


def user_message(question: str, attributes=None) -> str:
    """The user turn: media first, then what we know about the person, then the question."""
    parts = [MEDIA_MARKER, agr_sentence(attributes), question.strip()]
    return "\n".join(p for p in parts if p)


def split_prompt(tokenizer, question: str, attributes=None) -> tuple[str, str]:
    """(text before the media, text after it, up to where the assistant's answer starts)."""
    messages = [{"role": "user", "content": user_message(question, attributes)}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = rendered.split(MEDIA_MARKER, 1)
    return before, after
