"""The words around the media: AGR sentence, questions, conversation layout, label parsing."""
from __future__ import annotations

import pytest

from core.faces import Attributes
from core.labels import BASIC7, MAFW11, parse_label
from core.model.prompt import (MEDIA_MARKER, age_band, agr_sentence, category_question,
                               conversation_question, split_prompt, user_message)
from core.model.templates import get_template


@pytest.fixture(scope="module")
def tokenizer():
    from core.model.build import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.mark.parametrize("attributes, sentence", [
    (Attributes(age="30-39", gender="female", race="East Asian"),
     "The person appears to be a 30-39 year old East Asian woman."),
    (Attributes(age="20-29", gender="male", race="Black"),
     "The person appears to be a 20-29 year old Black man."),
    (Attributes(age="3-9", gender="female", race="Latino/Hispanic"),
     "The person appears to be a 3-9 year old Latino/Hispanic girl."),
    (Attributes(age="", gender="male", race="Indian"),          # no age: the article follows the race
     "The person appears to be an Indian man."),
    (Attributes(age="70+", gender="", race=""),                 # unknown gender: "person", not a guess
     "The person appears to be a 70+ year old person."),
])
def test_agr_sentence_template(attributes, sentence):
    assert agr_sentence(attributes) == sentence


@pytest.mark.parametrize("attributes, sentence", [
    # The default network (core/attributes.py): a decade band and a gender, no race.
    (Attributes(age="30-39", gender="female", race=""),
     "The person appears to be a 30-39 year old woman."),
    (Attributes(age="33", gender="male", race=""),                  # a bare age goes in as its band
     "The person appears to be a 30-39 year old man."),
    (Attributes(age="", gender="female", race="", age_years=47.6),  # no band: the expected age's
     "The person appears to be a 40-49 year old woman."),
    (Attributes(age="80+", gender="male", race="not estimated"),    # "not estimated" is no race
     "The person appears to be an 80+ year old man."),
    (Attributes(age="0-9", gender="female", race="unknown"),
     "The person appears to be a 0-9 year old girl."),
])
def test_agr_sentence_with_age_as_a_decade_band_and_no_unknown_race(attributes, sentence):
    assert agr_sentence(attributes) == sentence


@pytest.mark.parametrize("years, band", [(0, "0-9"), (9.49, "0-9"), (9.5, "10-19"), (33.3, "30-39"),
                                         (79.4, "70-79"), (79.5, "80+"), (80, "80+"), (-1, "0-9")])
def test_age_band_rounds_then_takes_the_decade(years, band):
    assert age_band(years) == band


def test_agr_sentence_is_empty_when_nothing_is_known():
    assert agr_sentence(None) == ""
    assert agr_sentence(Attributes(age="", gender="", race="")) == ""


def test_questions_name_the_medium_and_every_option_in_order():
    question = category_question(MAFW11, "video")
    assert "video" in question and question.endswith(", ".join(MAFW11) + ".")
    assert "image" in conversation_question("image") and "facial cues" in conversation_question("image")


def test_user_message_puts_media_first_and_agr_only_when_known():
    attrs = Attributes(age="30-39", gender="female", race="East Asian")
    assert user_message("  Why?  ", attrs).split("\n") == [MEDIA_MARKER, agr_sentence(attrs), "Why?"]
    assert user_message("Why?", None).split("\n") == [MEDIA_MARKER, "Why?"]


def test_split_prompt_cuts_the_template_at_the_media(tokenizer):
    """The tiny template renders what the tiny tokenizer's own chat template renders (tiny
    checkpoints built before templates existed prompt the same), cut at the media."""
    attrs = Attributes(age="30-39", gender="female", race="East Asian")
    question = category_question(BASIC7)
    before, after = split_prompt(get_template("tiny"), question, attrs)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": user_message(question, attrs)}],
                                             tokenize=False, add_generation_prompt=True)
    assert before + MEDIA_MARKER + after == rendered
    assert before == "<|user|>\n" and after.endswith("<|assistant|>\n")
    assert "30-39 year old East Asian woman" in after and question in after
    _, after = split_prompt(get_template("tiny"), question, None)
    assert "appears to be" not in after


def test_vicuna_layout_is_llamavids_conv_vicuna_v1():
    before, after = split_prompt(get_template("vicuna_v1"), "What is the expression?")
    assert before == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                      "gives helpful, detailed, and polite answers to the user's questions. USER: ")
    assert after == "\nWhat is the expression? ASSISTANT:"


@pytest.mark.parametrize("text, label_set, label", [
    ("The person looks happy, cheeks raised", None, "happiness"),
    ("Angry: lowered brows and pressed lips", None, "anger"),
    ("She seems SCARED.", None, "fear"),
    ("a contemptuous smirk", BASIC7, None),       # contempt is not in the 7 basic labels
    ("a contemptuous smirk", MAFW11, "contempt"),
    ("nothing to see here", None, None),
])
def test_parse_label_maps_free_text_to_labels(text, label_set, label):
    assert parse_label(text, label_set) == label
