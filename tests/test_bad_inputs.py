"""The bad-input corpus through the paths a user takes: `python app.py predict FILE --json`
(prior-only mode) and gradio_client against the launched app (`/predict_image`, `/predict_video`).

Every file gives a result or one clear message: never a traceback, never the server's generic
"something went wrong", and the server still answers afterwards. The corpus is generated here
(tests/media_files.py: `bad_input_corpus`), nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.cli_runner import run_commands
from tests.media_files import (CORPUS_CODECS, bad_input_corpus, face_photo, has_encoder,
                               write_image)
from tests.test_webapp_api import served_app

REPO = Path(__file__).resolve().parents[1]

# Images with a side under 20 px: MTCNN cannot look at them. The face analyser refuses them
# (or says so in the result's note) before detection: "too small to find a face (W×H; ...)".
TOO_SMALL = r"(?i)too small to find a face"

# name -> what the user must see: "face" (a result with at least one face), or a regex of the
# one-line message (an error, or for TOO_SMALL also a result note).
EXPECTED: dict[str, str] = {
    "empty": r"empty\.png: the file is empty",
    "truncated_png": r"truncated\.png: the image is corrupt or truncated",
    "truncated_jpg": r"truncated\.jpg: the image is corrupt or truncated",
    "text_as_image": r"text\.jpg: not an image file",
    "tiny_1x1": TOO_SMALL,
    "tiny_19x19": TOO_SMALL,
    "thin_300x10": TOO_SMALL,
    "deep_16bit": "face",
    "cmyk": "face",
    "animated_gif": "face",
    "exif_rotated": "face",
    "declared_huge": r"declared_huge\.png: .*megapixel limit",
    "heic": r"photo\.heic: HEIC is not supported: convert to JPEG or PNG",
    "av1": "face",
    "vp9": "face",
    "hevc": "face",
    "audio_only": r"audio_only\.mp4: the file has no video stream",
    "zero_frames": r"zero_frames\.mp4: the file has no (video stream|frames)",
}
VIDEOS = {"av1", "vp9", "hevc", "audio_only", "zero_frames"}
# A file sent to the other tab's endpoint: the message says which one to use.
CROSSED = [("deep_16bit", "/predict_video", r"deep_16bit\.png: this is an image: use the Image tab / predict_image"),
           ("hevc", "/predict_image", r"hevc\.mp4: this is a video: use the Video tab / predict_video"),
           ("heic", "/predict_video", r"photo\.heic: HEIC is not supported"),
           ("declared_huge", "/predict_video", r"declared_huge\.png: .*megapixel limit")]
GENERIC = "Something went wrong on the server"


def _codec_skips() -> list[str]:
    return [f"{name}: the local PyAV has no {codec} encoder"
            for name, codec in CORPUS_CODECS if not has_encoder(codec)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return bad_input_corpus(tmp_path_factory.mktemp("corpus"))


def test_every_codec_of_the_corpus_is_encodable_here():
    """AV1/VP9/HEVC are in the corpus where PyAV can write them; say plainly which cannot."""
    skips = _codec_skips()
    if skips:
        pytest.skip("; ".join(skips))


# ------------------------------------------------------------------------------------ CLI

def _cli_env(tmp: Path) -> dict:
    env = {**os.environ, "EMO_DATA_DIR": str(tmp / "data"), "PYTHONUNBUFFERED": "1"}
    env.pop("EMO_LLAMA_MODEL", None)  # prior-only mode: the embedded default
    return env


@pytest.fixture(scope="module")
def cli_runs(corpus, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`python app.py predict FILE --json` for every file of the corpus, in one interpreter
    (tests/cli_runner.py; 18 processes took a minute); one file also runs as a real process,
    in test_a_real_cli_process_exits_2_with_one_error_line."""
    names = [name for name in EXPECTED if name in corpus]
    runs = run_commands([["predict", str(corpus[name]), "--json"] for name in names],
                        _cli_env(tmp_path_factory.mktemp("cli")))
    return dict(zip(names, runs))


def test_a_real_cli_process_exits_2_with_one_error_line(corpus, tmp_path):
    run = subprocess.run([sys.executable, "app.py", "predict", str(corpus["empty"]), "--json"], cwd=REPO,
                         env=_cli_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in run.stderr
    assert re.search(EXPECTED["empty"], run.stderr)


def _note(result: dict) -> str:
    return " ".join(str(result.get(key) or "") for key in ("note", "explanation"))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_cli_gives_a_result_or_one_error_line(cli_runs, corpus, name):
    if name not in corpus:
        pytest.skip("; ".join(_codec_skips()))
    run = cli_runs[name]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    expected = EXPECTED[name]
    if run.returncode == 0:
        result = json.loads(run.stdout)
        if expected == "face":
            assert result["faces"], f"{name}: no face found"
            assert result["label"] in result["scores"]
            if name in VIDEOS:
                assert result["media"]["kind"] == "video" and result["media"]["frame_count"] == 12
            if name == "exif_rotated":  # upright: as tall as the photo was, not as stored
                assert (result["media"]["width"], result["media"]["height"]) == (320, 400)
        else:
            assert expected == TOO_SMALL and re.search(expected, _note(result)), \
                f"{name}: expected {expected!r}, got a result: {_note(result)!r}"
            assert result["faces"] == []
        return
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr[-2000:]
    assert run.returncode == 2 and errors[0] == run.stderr.strip().splitlines()[-1]
    assert expected != "face", f"{name}: {errors[0]}"
    assert re.search(expected, errors[0]), f"{name}: {errors[0]}"


# ------------------------------------------------------------------------------------ API

@pytest.fixture(scope="module")
def prior_only_app(tmp_path_factory):
    """`python app.py serve` in prior-only mode (no checkpoint), everything under a tmp folder."""
    root = tmp_path_factory.mktemp("app")
    env = {**_cli_env(root), "EMO_DB_URL": f"sqlite:///{root / 'data' / 'studio.db'}",
           "EMO_SECRET_KEY": "test-secret-key", "GRADIO_TEMP_DIR": str(root / "gradio-tmp"),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    for key in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        env.pop(key, None)
    log = root / "server.log"
    with served_app(env, log) as url:
        yield url, log, root


def _client(app):
    from gradio_client import Client

    url, _, root = app
    return Client(url, verbose=False, download_files=str(root / "downloads"))


def _call(app, path: Path, api_name: str) -> tuple[dict | None, str | None]:
    """(prediction, None) or (None, the error message the user sees)."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    try:
        return _client(app).predict(handle_file(str(path)), api_name=api_name)[0], None
    except AppError as exc:
        return None, str(exc)


def _check_message(name: str, message: str, expected: str) -> None:
    assert "Traceback" not in message and GENERIC not in message, f"{name}: {message}"
    assert "\n" not in message.strip(), f"{name}: more than one line: {message!r}"
    assert re.search(expected, message), f"{name}: expected {expected!r}, got {message!r}"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_api_gives_a_result_or_one_clear_message(prior_only_app, corpus, name):
    if name not in corpus:
        pytest.skip("; ".join(_codec_skips()))
    api_name = "/predict_video" if name in VIDEOS else "/predict_image"
    prediction, message = _call(prior_only_app, corpus[name], api_name)
    expected = EXPECTED[name]
    if prediction is not None:
        if expected == "face":
            assert prediction["faces"] and prediction["mode"] == "prior-only", name
            assert prediction["label"] in prediction["scores"]
        else:
            assert expected == TOO_SMALL and re.search(expected, _note(prediction)), \
                f"{name}: expected {expected!r}, got a result: {_note(prediction)!r}"
        return
    assert expected != "face", f"{name}: {message}"
    _check_message(name, message, expected)


@pytest.mark.parametrize("name,api_name,expected", CROSSED)
def test_api_points_a_file_to_the_right_tab(prior_only_app, corpus, name, api_name, expected):
    if name not in corpus:
        pytest.skip("; ".join(_codec_skips()))
    prediction, message = _call(prior_only_app, corpus[name], api_name)
    assert prediction is None, f"{name} through {api_name} gave a result"
    _check_message(name, message, expected)


def test_16_bit_png_keeps_its_face_through_the_web_app(prior_only_app, corpus):
    """Gradio's own 8-bit conversion clipped this to white; the original file is read now."""
    prediction, message = _call(prior_only_app, corpus["deep_16bit"], "/predict_image")
    assert message is None and len(prediction["faces"]) == 1
    assert prediction["faces"][0]["score"] > 0.9 and prediction["label"] == "happiness"


def test_av1_mkv_is_analysed_through_the_video_tab(prior_only_app, corpus):
    """Decord cannot read AV1: the PyAV fallback used to fail on the web path's limits."""
    if "av1" not in corpus:
        pytest.skip("; ".join(_codec_skips()))
    prediction, message = _call(prior_only_app, corpus["av1"], "/predict_video")
    assert message is None, message
    assert prediction["media"]["frame_count"] == 12 and prediction["media"]["duration_s"] == 2.0
    assert {face["frame"] for face in prediction["faces"]} == set(range(8))


def test_server_is_healthy_after_the_corpus(prior_only_app, corpus):
    """Run last in this file (pytest keeps file order): the server still answers, and nothing
    it logged while serving the corpus was an unexpected error."""
    for name in EXPECTED:
        if name in corpus:
            _call(prior_only_app, corpus[name], "/predict_video" if name in VIDEOS else "/predict_image")
    url, log, root = prior_only_app
    with urllib.request.urlopen(f"{url}/gradio_api/info", timeout=10) as answer:
        assert answer.status == 200
    face = write_image(root / "face_after.jpg", face_photo())
    prediction, message = _call(prior_only_app, face, "/predict_image")
    assert message is None and prediction["label"] == "happiness"
    text = log.read_text()
    assert "Traceback" not in text and "unexpected error" not in text, text[-3000:]
