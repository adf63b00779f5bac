"""Face crops (aligned=True), tiny images, capped face counts, predict FOLDER, evaluate prior-only.

Crops are made the way FER datasets make them (the face cut out, 48x48 greyscale, or 100x100)
from scikit-image's astronaut photo; nothing is downloaded and ../shared is not used.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.cli_runner import run_commands
from tests.media_files import face_photo, write_image
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
FACE = (slice(40, 200), slice(150, 300))  # the astronaut's face with a FER-like margin


def fer_crop(size: int = 48, flip: bool = False) -> np.ndarray:
    """The astronaut's face as FER2013 ships faces: size x size greyscale (as RGB)."""
    crop = cv2.resize(face_photo()[FACE], (size, size), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(grey[:, ::-1]) if flip else grey


def not_a_face(size: int = 48, seed: int = 0) -> np.ndarray:
    import skimage.data

    bricks = skimage.data.brick()
    y, x = 40 * seed, 60 * seed
    return cv2.cvtColor(cv2.resize(bricks[y:y + 200, x:x + 200], (size, size)), cv2.COLOR_GRAY2RGB)


def tiled_faces(n: int = 30, side: int = 96) -> np.ndarray:
    """n copies of the astronaut's face on a grey canvas, in rows of 6."""
    face = cv2.resize(face_photo()[FACE], (side, side), interpolation=cv2.INTER_AREA)
    rows = (n + 5) // 6
    canvas = np.full((rows * (side + 24) + 24, 6 * (side + 24) + 24, 3), 128, dtype=np.uint8)
    for i in range(n):
        y, x = 24 + (i // 6) * (side + 24), 24 + (i % 6) * (side + 24)
        canvas[y:y + side, x:x + side] = face
    return canvas


def app(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------- the analyser

@pytest.fixture(scope="module")
def analyzer():
    from core.faces import shared_analyzer

    return shared_analyzer()


def test_a_crop_is_one_face_with_the_landmarks_detection_finds(analyzer):
    """The whole crop is the face; ONet's landmarks agree with MTCNN's on the full photo."""
    photo = face_photo()
    (detected,) = analyzer.analyze(photo)
    x1, y1, x2, y2 = (int(v) for v in detected.box)
    wide = photo[max(0, y1 - 40):y2 + 40, max(0, x1 - 60):x2 + 30]  # off-centre, loose framing
    faces = analyzer.analyze(wide, aligned=True)
    assert faces.found == 1 and faces.notes == []
    (face,) = faces
    assert face.box == (0.0, 0.0, float(wide.shape[1]), float(wide.shape[0]))
    assert face.score > 0.9
    offset = np.array([max(0, x1 - 60), max(0, y1 - 40)])
    assert np.abs(face.landmarks + offset - detected.landmarks).max() < 6  # pixels
    assert face.aligned.shape == (112, 112, 3)
    assert max(face.prior, key=face.prior.get) == "happiness"
    assert face.embedding.shape == (128,)


def test_a_48px_greyscale_crop_is_upscaled_and_aligned(analyzer):
    (face,) = analyzer.analyze(fer_crop(48), aligned=True)
    assert face.score > 0.9
    left_eye, right_eye, nose, mouth_l, mouth_r = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and max(left_eye[1], right_eye[1]) < nose[1]
    assert nose[1] < min(mouth_l[1], mouth_r[1]) and (0 <= face.landmarks).all()
    assert (face.landmarks < 48).all()  # in the crop's own pixels, not the upscaled ones
    # The prior network sees the crop itself: the same scores as fed directly.
    probs, _ = analyzer.prior.predict([fer_crop(48)])
    assert face.prior["happiness"] == pytest.approx(float(probs[0][analyzer.prior.labels.index("happiness")]), abs=1e-5)


def test_a_crop_that_is_no_face_says_so_and_invents_no_confidence(analyzer):
    for image in (not_a_face(48), not_a_face(100, seed=1), np.zeros((48, 48, 3), np.uint8)):
        faces = analyzer.analyze(image, aligned=True)
        assert faces[0].score < 0.5
        assert faces.notes and "may not be a face" in faces.notes[0]


@pytest.mark.parametrize("shape", [(1, 1), (19, 19), (10, 300), (300, 19)])
def test_images_under_20px_a_side_find_no_face_and_say_why(analyzer, shape):
    h, w = shape
    image = np.full((h, w, 3), 127, np.uint8)
    faces = analyzer.analyze(image)
    assert faces == [] and faces.notes == [f"too small to find a face ({w}×{h}; at least 20 px a side)"]


def test_a_tiny_face_crop_is_upscaled_not_refused(analyzer):
    (face,) = analyzer.analyze(fer_crop(16), aligned=True)
    assert face.box == (0.0, 0.0, 16.0, 16.0) and face.aligned.shape == (112, 112, 3)
    assert face.prior and np.isfinite(face.embedding).all()


def test_more_faces_than_the_cap_are_counted_and_said(analyzer):
    faces = analyzer.analyze(tiled_faces(30))
    assert len(faces) == 8 and faces.found == 30
    assert faces.notes == ["8 of 30 faces shown, largest first"]
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)


# ----------------------------------------------------------------------------- the CLI

def test_predict_aligned_tiny_and_many_faces_through_the_cli(tmp_path):
    crop = write_image(tmp_path / "crop.png", fer_crop(48)[:, :, 0])   # greyscale PNG, as FER2013
    tiny = write_image(tmp_path / "tiny.png", fer_crop(19))
    crowd = write_image(tmp_path / "crowd.jpg", tiled_faces(30))
    runs = iter(run_commands([["predict", str(crop), "--aligned", "--json"], ["predict", str(tiny), "--json"],
                              ["predict", str(tiny), "--aligned", "--json"], ["predict", str(crowd), "--json"]],
                             dict(os.environ)))
    out = next(runs)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["media"]["aligned"] is True and result["faces_found"] == 1
    assert result["faces"][0]["box"] == [0.0, 0.0, 48.0, 48.0] and result["faces"][0]["score"] > 0.9
    assert result["label"] == "happiness" and "may not be a face" not in result["note"]

    out = next(runs)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    result = json.loads(out.stdout)
    assert result["label"] is None and result["faces"] == []
    assert result["note"].startswith("Too small to find a face (19×19; at least 20 px a side).")

    out = next(runs)  # the tiny image as a face crop: upscaled
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["label"] is not None and len(result["faces"]) == 1

    out = next(runs)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["faces"]) == 8 and result["faces_found"] == 30
    assert result["note"].startswith("8 of 30 faces shown, largest first.")


def test_predict_folder_writes_one_json_line_per_file_and_survives_head(tmp_path):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    write_image(folder / "a.png", fer_crop(48))
    write_image(folder / "b.png", fer_crop(48, flip=True))
    write_image(folder / "more" / "c.jpg", fer_crop(100))
    write_image(folder / "d.png", not_a_face(48))
    (folder / "e.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("ignored: not media")
    out = app("predict", str(folder), "--aligned", "--json")
    assert out.returncode == 1  # one file failed; its line says why, the others were answered
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["file"] for line in lines] == ["a.png", "b.png", "d.png", "e.jpg", "more/c.jpg"]
    by_file = {line["file"]: line for line in lines}
    assert "not an image" in by_file["e.jpg"]["error"] and "Traceback" not in out.stderr
    for name in ("a.png", "b.png", "more/c.jpg"):
        assert by_file[name]["label"] == "happiness" and by_file[name]["media"]["aligned"] is True
    assert "may not be a face" in by_file["d.png"]["note"]
    assert "5/5" in out.stderr and "5 file(s), 1 failed" in out.stderr  # the progress bar

    piped = subprocess.run(f"{sys.executable} app.py predict {folder} --json | head -1", shell=True,
                           cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert json.loads(piped.stdout)["file"] == "a.png"
    assert "BrokenPipeError" not in piped.stderr and "Traceback" not in piped.stderr


def test_evaluate_prior_only_on_imported_crops(tmp_path):
    """`evaluate --version prior-only` on a folder import, as face crops and as photos."""
    data = tmp_path / "crops"
    for label, images in {"happiness": [fer_crop(48), fer_crop(48, flip=True), fer_crop(100)],
                          "neutral": [not_a_face(48, 0), not_a_face(48, 1)]}.items():
        (data / label).mkdir(parents=True)
        for i, image in enumerate(images):
            write_image(data / label / f"{i}.png", image)
    env = {"EMO_DATA_DIR": str(tmp_path / "data"), "EMO_DB_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
           "EMO_IMPORT_ROOTS": str(tmp_path)}
    for name, flag in (("crops", "--aligned"), ("photos", "--no-aligned")):
        out = app("import", "--format", "folder", str(data), "--name", name, "--split", "test", flag,
                  "--quiet", env=env)
        assert out.returncode == 0, out.stderr

    out = app("evaluate", "--version", "prior-only", "--dataset", "crops", "--split", "test", "--json",
              env=env)
    assert out.returncode == 0, out.stderr
    crops = json.loads(out.stdout)
    assert crops["version"].startswith("prior-only") and crops["n"] == 5
    assert crops["no_face"] == 0  # every crop is a face: each gets a label
    assert crops["per_class_recall"]["happiness"] == 1.0
    assert np.array(crops["confusion"]).sum() == 5 and Path(crops["confusion_png"]).exists()
    assert "evaluate prior-only" in out.stderr and "5/5" in out.stderr  # progress on stderr

    out = app("evaluate", "--version", "prior-only", "--dataset", "photos", "--split", "test", env=env)
    assert out.returncode == 0, out.stderr
    # Detection finds the faces but not the bricks: two samples without a label, both misses.
    assert "no face found in 2 of 5 samples (no label: counted as misses)" in out.stdout
    assert "WAR 0.6000" in out.stdout



def test_evaluate_a_checkpoint_honours_the_crop_flag(tmp_path, tiny_checkpoint):  # noqa: F811
    """A checkpoint folder evaluated on crops finds a face in each; on the same files imported as
    photos the bricks have none (the model then answers from the whole frame: not misses)."""
    data = tmp_path / "crops"
    for label, images in {"happiness": [fer_crop(48), fer_crop(100)], "neutral": [not_a_face(48)]}.items():
        (data / label).mkdir(parents=True)
        for i, image in enumerate(images):
            write_image(data / label / f"{i}.png", image)
    env = {"EMO_DATA_DIR": str(tmp_path / "data"), "EMO_DB_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
           "EMO_IMPORT_ROOTS": str(tmp_path)}
    reports = {}
    for name, flag in (("crops", "--aligned"), ("photos", "--no-aligned")):
        out = app("import", "--format", "folder", str(data), "--name", name, "--split", "test", flag,
                  "--quiet", env=env)
        assert out.returncode == 0, out.stderr
        out = app("evaluate", "--version", str(tiny_checkpoint), "--dataset", name, "--split", "test",
                  "--frames", "1", "--json", "--no-progress", env=env)
        assert out.returncode == 0, out.stderr
        reports[name] = json.loads(out.stdout)
    assert reports["crops"]["no_face"] == 0 and reports["crops"]["n"] == 3
    assert reports["photos"]["no_face"] == 1 and reports["photos"]["no_face_by_class"]["neutral"] == 1
    assert reports["photos"]["unanswered"] == 0 and np.array(reports["photos"]["confusion"]).sum() == 3


# ----------------------------------------------------------------------------- the web app

from tests.test_webapp_api import fake_gemini_url, studio  # noqa: E402,F401  (fixtures: own server)


def test_the_image_tab_face_crop_option_and_evaluating_the_default(studio, tmp_path):  # noqa: F811
    from gradio_client import handle_file

    client = studio.client()
    crop = write_image(tmp_path / "crop.png", fer_crop(48)[:, :, 0])
    as_crop, *_ = client.predict(handle_file(str(crop)), True, api_name="/predict_image")
    assert as_crop["media"]["aligned"] is True and as_crop["faces_found"] == 1
    assert as_crop["faces"][0]["box"] == [0.0, 0.0, 48.0, 48.0] and as_crop["faces"][0]["score"] > 0.9
    as_photo, *_ = client.predict(handle_file(str(crop)), api_name="/predict_image")  # default: off
    assert as_photo["media"]["aligned"] is False

    token = studio.token("ada")
    summary, recall, confusion, _ = client.predict(token, "prior-only", "faces", "test",
                                                   api_name="/evaluate_version")
    assert "prior-only (the embedded default)" in summary and "2 samples" in summary
    assert {row[0] for row in recall["data"]} >= {"happiness", "neutral"}
    assert confusion is not None
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="embedded default, not a model version"):
        client.predict(token, "prior-only", api_name="/publish_version")
