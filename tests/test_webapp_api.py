"""The web app through its HTTP API: the real `python app.py serve` in a subprocess, driven by
gradio_client exactly as a user's script would drive it.

Each test file that uses the `studio` fixture gets its own server (tiny checkpoint, SQLite and
data dir under tmp, the fake Gemini server), so tests/test_webapp_browser.py does not depend on
what these tests stored. Also in-process tests of tokens, escaping, video conversion, backups.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.media_files import (face_frames, face_photo, no_face_photo, ramp_frames, write_image,
                               write_video)
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
USERS = {"ada": ("admin", "ada-admin-pass"), "ann": ("annotator", "ann-annotator-pass"),
         "rev": ("reviewer", "rev-reviewer-pass"), "vic": ("viewer", "vic-viewer-pass")}
GEMINI_KEY = "fake-gemini-test-key"
XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"
SERVER_START_S = 180


@dataclass
class Studio:
    """A running app: its URL, its folders and the files the tests send it."""
    url: str
    root: Path
    db_url: str
    log: Path
    files: dict[str, Path]

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False, download_files=str(self.root / "downloads"))

    def upload(self, name: str):
        from gradio_client import handle_file

        return handle_file(str(self.files[name]))

    def token(self, name: str) -> str:
        return self.client().predict(name, USERS[name][1], api_name="/login")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _face_dataset(root: Path) -> Path:
    """A folder-per-class image dataset of real faces (the astronaut, shifted and tinted)."""
    photo = face_photo()[:320, 96:416]
    for i, (split, label) in enumerate([("train", "happy"), ("train", "sad"), ("train", "angry"),
                                        ("test", "happy"), ("test", "neutral")]):
        tinted = np.clip(photo.astype(int) + (i * 9 - 18), 0, 255).astype(np.uint8)
        (root / split / label).mkdir(parents=True, exist_ok=True)
        write_image(root / split / label / f"{i:03d}.png", np.roll(tinted, 3 * i, axis=1))
    return root


def _wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/gradio_api/info", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not start within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@contextmanager
def served_app(env: dict, log: Path, *serve_args: str) -> Iterator[str]:
    """`python app.py serve` on a free port with `env`, output into `log`; yields its URL once it
    answers and stops it afterwards."""
    port = _free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "app.py", "serve", "--port", str(port), *serve_args],
                                   cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def fake_gemini_url():
    from tests.fake_gemini import FakeGemini

    with FakeGemini(api_key=GEMINI_KEY) as fake:
        yield fake.url


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_checkpoint, fake_gemini_url):  # noqa: F811
    """`python app.py serve` on a free port with everything under a tmp folder."""
    from annotation.ingest import import_dataset
    from annotation.users import add_user
    from db.session import dispose_engine, init_db

    root = tmp_path_factory.mktemp("studio")
    data = root / "data"
    db_url = f"sqlite:///{data / 'studio.db'}"
    init_db(db_url)
    for name, (role, password) in USERS.items():
        add_user(name, role, password, url=db_url)
    import_dataset("folder", _face_dataset(root / "faces"), "faces", url=db_url, progress=False)
    dispose_engine(db_url)

    files = {"face": write_image(root / "face.jpg", face_photo()),
             "no_face": write_image(root / "coffee.jpg", no_face_photo()),
             "video": write_video(root / "clip.mp4", face_frames(12), fps=6),
             "long_video": write_video(root / "long.mp4", ramp_frames(121), fps=1)}
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 20)
    files["corrupt"] = corrupt

    env = {**os.environ, "EMO_DATA_DIR": str(data), "EMO_DB_URL": db_url,
           "EMO_SECRET_KEY": "test-secret-key", "GEMINI_API_KEY": GEMINI_KEY,
           "GEMINI_BASE_URL": fake_gemini_url, "GRADIO_TEMP_DIR": str(root / "gradio-tmp"),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "EMO_ADMIN_USER": "boss", "EMO_ADMIN_PASSWORD": "boss-from-space-secret"}
    env.pop("GOOGLE_API_KEY", None)
    log = root / "server.log"
    with served_app(env, log, "--model", str(tiny_checkpoint)) as url:
        yield Studio(url=url, root=root, db_url=db_url, log=log, files=files)


def _app_error(call) -> str:
    """The message of the gr.Error a call ends with (fails the test if it succeeds)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as raised:
        call()
    return str(raised.value)


# ------------------------------------------------------------------------- public endpoints

def test_predict_image_with_a_face(studio):
    prediction, drawn, *_, explanation = studio.client().predict(
        studio.upload("face"), api_name="/predict_image")
    assert prediction["mode"] == "tiny-test-fixture"
    assert prediction["model_version"].startswith("tiny-test-fixture")
    assert prediction["label"] in prediction["scores"]
    assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-3)
    face = prediction["faces"][0]
    assert len(face["landmarks"]) == 5 and face["box"][2] > face["box"][0]
    assert explanation == prediction["explanation"]
    assert Image.open(drawn).size == Image.open(studio.files["face"]).size


def test_predict_image_without_a_face_gives_no_label(studio):
    prediction, *_, explanation = studio.client().predict(studio.upload("no_face"),
                                                          api_name="/predict_image")
    assert prediction["faces"] == []
    assert prediction["label"] is None or prediction["mode"] != "prior-only"


def test_corrupt_image_is_a_clear_error(studio):
    message = _app_error(lambda: studio.client().predict(studio.upload("corrupt"),
                                                         api_name="/predict_image"))
    assert message.startswith("corrupt.jpg: ") and "corrupt or truncated" in message
    assert "Traceback" not in message


def test_predict_video_reports_faces_per_frame(studio):
    prediction, strip, *_ = studio.client().predict(studio.upload("video"),
                                                    api_name="/predict_video")
    assert prediction["media"]["kind"] == "video"
    assert prediction["label"] in prediction["scores"]
    frames = {face["frame"] for face in prediction["faces"]}
    assert frames and frames <= set(range(len(strip)))
    assert all(item["caption"].startswith("frame ") for item in strip)


def test_too_long_video_is_refused_with_advice(studio):
    message = _app_error(lambda: studio.client().predict(studio.upload("long_video"),
                                                         api_name="/predict_video"))
    assert "2 min 1 s long" in message and "up to 120 s" in message and "ffmpeg" in message


def test_gemini_explain_answers_from_the_fake_server(studio):
    answer, label, explanation, meta = studio.client().predict(studio.upload("face"),
                                                               api_name="/gemini_explain")
    assert answer["label"] and answer["explanation"] == explanation
    assert answer["source"].startswith("gemini:")
    again = studio.client().predict(studio.upload("face"), api_name="/gemini_explain")[0]
    assert again["cached"] is True and again["explanation"] == answer["explanation"]
    assert GEMINI_KEY not in str(answer) + meta


# ------------------------------------------------------------------------- roles through the API

def test_anonymous_call_to_an_admin_endpoint_is_refused(studio):
    message = _app_error(lambda: studio.client().predict(
        None, "folder", str(studio.root / "faces"), "stolen", api_name="/import_dataset"))
    assert "sign in" in message.lower() and "admin" in message


def test_annotator_cannot_reach_admin_actions(studio):
    token = studio.token("ann")
    message = _app_error(lambda: studio.client().predict(token, "faces", False,
                                                         api_name="/export_snapshot"))
    assert "ann (annotator)" in message and "admin role" in message
    message = _app_error(lambda: studio.client().predict(token, api_name="/status"))
    assert "admin role" in message


def test_forged_and_tampered_tokens_are_refused(studio):
    token = studio.token("ann")
    body, signature = token.split(".")
    forged = body + "." + "0" * len(signature)
    for bad in (forged, "not-a-token", token + "x"):
        message = _app_error(lambda bad=bad: studio.client().predict(bad, "faces",
                                                                     api_name="/next_record"))
        assert "sign in again" in message


def test_space_secrets_create_the_admin_who_sees_engine_health(studio):
    client = studio.client()
    token = client.predict("boss", "boss-from-space-secret", api_name="/login")
    report = client.predict(token, api_name="/status")
    assert report["engine"]["mode"] == "tiny-test-fixture"
    client.predict(studio.upload("face"), api_name="/predict_image")
    after = client.predict(token, api_name="/status")["health"]
    # The health it shows is the serving engine's own: one more answer, one more served.
    assert after["served"] == report["health"]["served"] + 1 and after["latency_ms_p95"] > 0
    assert "studio.db" in report["database"]


def test_wrong_password_is_refused(studio):
    message = _app_error(lambda: studio.client().predict("ann", "wrong-password",
                                                         api_name="/login"))
    assert message.endswith("Unknown user name or wrong password.")


def test_viewer_cannot_annotate(studio):
    token = studio.token("vic")
    message = _app_error(lambda: studio.client().predict(token, "faces",
                                                         api_name="/next_record"))
    assert "annotator role" in message


def test_admin_runs_a_gemini_job_with_progress_and_cost(studio):
    text, summary = studio.client().predict(studio.token("ada"), "faces", 5, "",
                                            api_name="/generate_instructions")
    # The fake answers "happiness" for every face: the two happy records pass, the other
    # three contradict their ground truth and are stored as rejected.
    assert (summary["ok"], summary["rejected"], summary["failed"]) == (2, 3, 0)
    assert summary["rejected_by_reason"] == {"wrong_label": 3}
    assert summary["input_tokens"] > 0 and summary["estimated_cost_usd"] > 0
    assert "**2** suggestions stored" in text and "estimated cost" in text
    again = studio.client().predict(studio.token("ada"), "faces", 5, "",
                                    api_name="/generate_instructions")[1]
    assert again["skipped"] == 5 and again["requests"] == 0   # resumable: nothing paid twice


# ------------------------------------------------------------------------- annotation workflow

def test_annotate_submit_history_and_conflict_through_the_api(studio):
    client, token = studio.client(), studio.token("ann")
    record = client.predict(token, "faces", api_name="/next_record")
    assert record["dataset"] == "faces" and record["response"] is None
    sid = record["sample_id"]
    saved = client.predict(token, sid, "happiness", "Cheeks raised. " + XSS, "draft", 0,
                           api_name="/save_annotation")
    assert saved["version"] == 1
    # A second editor still on version 0 loses, and is told the newer text.
    message = _app_error(lambda: client.predict(token, sid, "sadness", "stale", "draft", 0,
                                                api_name="/save_annotation"))
    assert "saved meanwhile" in message and "version 1" in message
    submitted = client.predict(token, sid, "happiness", "Cheeks raised, lip corners up.",
                               "submitted", 1, api_name="/save_annotation")
    assert submitted["status"] == "submitted" and submitted["version"] == 2
    actions = [h["action"] for h in client.predict(token, sid, api_name="/record_history")]
    assert actions == ["draft", "conflict", "submitted"]

    reviewer = studio.token("rev")
    with pytest.raises(Exception, match="reviewer role"):
        client.predict(token, submitted["response_id"], "accepted", "",
                       api_name="/review_annotation")
    verdict = client.predict(reviewer, submitted["response_id"], "accepted", "good evidence", 2,
                             api_name="/review_annotation")
    assert verdict["decision"] == "accepted" and verdict["reviewer"] == "rev"


# ------------------------------------------------------------------------- in process

def test_admin_rolls_back_and_the_page_says_which_version_serves(studio, tiny_checkpoint):  # noqa: F811
    from annotation.versions import register_version
    from db.session import dispose_engine

    register_version("tiny-again", tiny_checkpoint, is_tiny=True, published=True, url=studio.db_url)
    dispose_engine(studio.db_url)
    client = studio.client()
    refused = _app_error(lambda: client.predict(None, "tiny-again", api_name="/rollback_version"))
    assert "sign in" in refused.lower() and "admin" in refused
    token = studio.token("ada")
    table, serving, banner = client.predict(token, "tiny-again", api_name="/rollback_version")
    assert serving == "Serving **tiny-again**."
    assert "tiny-again" in [row[0] for row in table["data"]]
    assert "Tiny test fixture" in banner
    assert "no model version named 'nothing-here'" in _app_error(
        lambda: client.predict(token, "nothing-here", api_name="/publish_version"))


def test_users_are_managed_through_the_api_by_admins_only(studio):
    client = studio.client()
    for token in (None, studio.token("ann")):
        message = _app_error(lambda: client.predict(token, "mallory", "admin", "mallory-pass",
                                                    api_name="/add_user"))
        assert "admin" in message
    admin = studio.token("ada")
    table, *_ = client.predict(admin, "newbie", "annotator", "newbie-first", api_name="/add_user")
    assert ["newbie", "annotator"] in [row[:2] for row in table["data"]]
    first_session = client.predict("newbie", "newbie-first", api_name="/login")
    table = client.predict(admin, "newbie", "reviewer", api_name="/set_role")
    assert ["newbie", "reviewer"] in [row[:2] for row in table["data"]]

    # Their own password: the current one is checked, and the page gets a fresh session.
    assert "current password is wrong" in _app_error(lambda: client.predict(
        first_session, "not-it-at-all", "newbie-second", "newbie-second",
        api_name="/change_password"))
    fresh, *_ = client.predict(first_session, "newbie-first", "newbie-second", "newbie-second",
                               api_name="/change_password")
    assert "no longer valid" in _app_error(lambda: client.predict(
        first_session, "newbie-second", "newbie-third", "newbie-third",
        api_name="/change_password"))
    # An admin reset signs them out everywhere, the fresh session included.
    client.predict(admin, "newbie", "newbie-by-admin", api_name="/reset_password")
    assert "no longer valid" in _app_error(lambda: client.predict(
        fresh, "newbie-second", "newbie-third", "newbie-third", api_name="/change_password"))
    assert client.predict("newbie", "newbie-by-admin", api_name="/login")


def test_webapp_does_not_import_torch():
    code = "import sys, webapp.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_videos_browsers_cannot_play_are_converted_for_the_player(tmp_path, monkeypatch):
    import av

    from webapp.components.video import playable_video

    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path / "data"))
    mp4 = write_video(tmp_path / "clip.mp4", face_frames(6))
    avi = write_video(tmp_path / "clip.avi", face_frames(6), codec="mpeg4")
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(face_frames(5)):
        write_image(folder / f"{i:03d}.jpg", frame)
    assert playable_video(str(mp4)) == str(mp4)                 # H.264 mp4: played as it is
    for source, frames in ((avi, 6), (folder, 5), (mp4, 6)):
        copy = playable_video(str(source), in_cache=True)
        assert copy.startswith(str(tmp_path / "data" / "cache")) and copy.endswith(".mp4")
        with av.open(copy) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert sum(1 for _ in container.decode(stream)) == frames
    assert playable_video(str(avi), in_cache=True) == playable_video(str(avi))  # cached


def test_compare_without_a_gemini_key_says_how_to_configure_it(monkeypatch, tmp_path):
    import gradio as gr

    from webapp.components.compare import gemini_side

    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    photo = write_image(tmp_path / "face.jpg", face_photo())
    with pytest.raises(gr.Error) as raised:
        gemini_side(str(photo))
    assert "set GEMINI_API_KEY (or GOOGLE_API_KEY)" in raised.value.message


def test_backups_to_persistent_storage_restore_a_lost_store(tmp_path, monkeypatch):
    from annotation.users import add_user, list_users
    from db.session import dispose_engine, init_db
    from webapp.app import BACKUPS_KEPT, backup_once, restore_latest_backup

    database = tmp_path / "local" / "emo_studio.db"
    url = f"sqlite:///{database}"
    monkeypatch.setenv("EMO_DB_URL", url)
    init_db(url)
    add_user("ana", "annotator", "ana-password", url=url)
    backups = tmp_path / "persistent"
    backup_once(backups)
    assert restore_latest_backup(backups) is None      # the store exists: left alone
    dispose_engine(url)
    for leftover in database.parent.iterdir():         # the Space restarted on empty disk
        leftover.unlink()
    assert restore_latest_backup(backups) is not None
    assert [u["name"] for u in list_users(url=url)] == ["ana"]
    for _ in range(BACKUPS_KEPT + 2):                  # old copies are pruned
        backup_once(backups)
    assert len(list(backups.glob("*.db"))) == BACKUPS_KEPT
    dispose_engine(url)


def test_model_and_user_text_is_escaped_in_html_outputs():
    import gradio as gr

    from core.errors import UserError
    from webapp.components.annotate import conflict_html
    from webapp.components.common import handle_errors
    from webapp.components.render import mode_banner, result_summary

    result = {"label": XSS, "scores": {XSS: 1.0}, "faces": [], "model_version": XSS,
              "mode": "checkpoint", "note": XSS}

    @handle_errors
    def failing():
        raise UserError(f"{XSS}.jpg: not an image")

    with pytest.raises(gr.Error) as raised:
        failing()
    for html in (result_summary(result), result_summary({**result, "label": None}),
                 mode_banner(result), raised.value.message,
                 conflict_html({"user": XSS, "label": XSS, "explanation": XSS, "version": 2,
                                "status": "draft"})):
        assert "<script" not in html and "<img" not in html and "&lt;script&gt;" in html




@pytest.fixture
def token_store(tmp_path, monkeypatch):
    from annotation.users import add_user
    from db.session import dispose_engine, init_db
    from webapp import auth

    url = f"sqlite:///{tmp_path / 'auth.db'}"
    monkeypatch.setenv("EMO_DB_URL", url)
    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("EMO_SECRET_KEY", raising=False)
    auth.reset_secret_cache()
    init_db(url)
    add_user("ana", "annotator", "ana-password", url=url)
    yield url
    auth.reset_secret_cache()
    dispose_engine(url)


def test_token_carries_identity_and_role_comes_from_the_database(token_store, tmp_path):
    from annotation.users import set_password, set_role
    from webapp import auth

    token = auth.login("ana", "ana-password")
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    assert auth.require(token, "annotator").name == "ana"
    with pytest.raises(auth.AuthError, match="needs the admin role"):
        auth.require(token, "admin")
    set_role("ana", "admin", url=token_store)       # promotion applies to the same token
    assert auth.require(token, "admin").role == "admin"
    set_password("ana", "a-new-password", url=token_store)   # ends existing sessions
    with pytest.raises(auth.AuthError, match="no longer valid"):
        auth.require(token, "viewer")


def test_expired_and_foreign_tokens_are_refused(token_store, monkeypatch):
    from webapp import auth

    user = auth.identify(auth.login("ana", "ana-password"))
    old = auth.issue_token(user.user_id, "ana", None, now=time.time() - 48 * 3600)
    with pytest.raises(auth.AuthError, match="expired"):
        auth.identify(old)
    token = auth.login("ana", "ana-password")
    monkeypatch.setenv("EMO_SECRET_KEY", "another-server")
    auth.reset_secret_cache()
    with pytest.raises(auth.AuthError, match="not valid"):
        auth.identify(token)
    assert auth.identify(None) is None and auth.identify("") is None


def test_example_answers_are_cached_per_serving_model_version(tmp_path, tiny_checkpoint):  # noqa: F811
    from core.engine import Engine, set_shared_engine
    from webapp.components import image

    photo = str(write_image(tmp_path / "astronaut.png", face_photo()))
    prior_only, tiny = Engine(None), Engine(tiny_checkpoint)
    image._example_answers.clear()
    try:
        set_shared_engine(prior_only)
        first = list(image.predict_example(photo))
        assert first[-1][0]["mode"] == "prior-only"
        again = list(image.predict_example(photo))
        assert len(again) == 1 and again[0] is first[-1]           # from the cache, no new run
        served = prior_only.health()["served"]
        set_shared_engine(tiny)                                    # a publish hot-swapped it
        swapped = list(image.predict_example(photo))
        assert swapped[-1][0]["model_version"] == tiny.info["model_version"] != \
            first[-1][0]["model_version"]
        assert tiny.health()["served"] == 1 and prior_only.health()["served"] == served
        assert {version for version, _ in image._example_answers} == {tiny.info["model_version"]}
    finally:
        set_shared_engine(None)
        prior_only.close()
        tiny.close()
        image._example_answers.clear()


def _hf_profile(username: str):
    import gradio as gr

    return gr.OAuthProfile({"name": username.title(), "preferred_username": username,
                            "profile": f"https://huggingface.co/{username}", "picture": ""})


def test_a_hugging_face_sign_in_becomes_its_own_user(token_store, monkeypatch):
    import gradio as gr

    from annotation.users import add_user
    from webapp import auth
    from webapp.components.login import hf_session

    add_user("octo", "admin", "local-admin-pass", url=token_store)   # a local namesake
    monkeypatch.setenv("EMO_HF_ADMINS", "owner, someone-else")
    token = hf_session(None, _hf_profile("octo"))
    who = auth.identify(token)
    assert (who.name, who.role) == ("octo@hf", "viewer")   # never the local admin "octo"
    assert hf_session(token, _hf_profile("octo")) == gr.skip()        # already signed in
    assert hf_session(token, None) == gr.skip()                       # no HF sign-in: as is
    assert auth.identify(hf_session(None, _hf_profile("owner"))).role == "admin"
    with pytest.raises(auth.AuthError):                    # no password sign-in for it
        auth.login("octo@hf", "anything-at-all")
    with pytest.raises(gr.Error, match="not one this app accepts"):
        hf_session(None, _hf_profile("../etc"))


def test_the_hugging_face_button_appears_only_on_a_space_with_oauth(token_store, monkeypatch):
    import gradio as gr
    import gradio.oauth

    from core.engine import set_shared_engine, shared_engine
    from webapp.app import build_app

    try:
        assert not build_app().expects_oauth        # locally Gradio would only mock it
        # What a Space with `hf_oauth: true` sets (Gradio reads the OAuth ones at import).
        monkeypatch.setenv("SYSTEM", "spaces")
        monkeypatch.setenv("SPACE_ID", "someone/emo-llama-studio")
        monkeypatch.setenv("OAUTH_CLIENT_ID", "client-id")
        for name, value in (("OAUTH_CLIENT_ID", "client-id"), ("OAUTH_CLIENT_SECRET", "secret"),
                            ("OAUTH_SCOPES", "openid profile"),
                            ("OPENID_PROVIDER_URL", "https://huggingface.co")):
            monkeypatch.setattr(gradio.oauth, name, value)
        demo = build_app()
        assert demo.expects_oauth
        routes = {getattr(route, "path", None) for route in gr.routes.App.create_app(demo).routes}
        assert {"/login/huggingface", "/login/callback"} <= routes
    finally:
        shared_engine().close()
        set_shared_engine(None)


def test_the_job_monitor_sends_a_finished_job_once_and_leaves_evaluate_results_alone(
        token_store, tmp_path, monkeypatch):
    import types

    import gradio as gr

    from annotation.users import add_user
    from core.engine import set_shared_engine, shared_engine
    from webapp import auth
    from webapp.components import finetune as tab

    add_user("ada", "admin", "ada-admin-pass", url=token_store)
    token = auth.login("ada", "ada-admin-pass")
    png = write_image(tmp_path / "confusion.png", np.zeros((8, 8, 3), np.uint8))
    log = {9001: [{"event": "step", "step": 1, "total_steps": 2, "loss": 1.0}],
           9002: [{"event": "step", "step": 2, "total_steps": 2, "loss": 0.5}]}
    states = {9001: "running", 9002: "succeeded"}

    def job_status(job_id):   # what annotation.finetune reports, scripted per tick
        return {"id": job_id, "status": states[job_id], "step": log[job_id][0]["step"],
                "total_steps": 2, "loss": None, "eta_s": None, "error": None, "version": None}

    monkeypatch.setattr(tab, "_finetune", lambda: types.SimpleNamespace(
        job_status=job_status, list_jobs=lambda: [],
        read_events=lambda job_id, since=0: log[job_id][since:]))
    tab._events.clear()
    try:
        first = tab.poll(token, 9001, None)
        assert first[3] == gr.skip() and first[4] == [9001, "running"]     # no evaluation yet
        log[9001].append({"event": "eval", "version": "v9", "uar": 0.5, "war": 0.5,
                          "parent_uar": 0.4, "confusion_png": str(png)})
        running = tab.poll(token, 9001, first[4])
        assert running[3] == gr.skip()      # the Evaluate button's matrix stays on screen
        assert "step 1/2" in running[0]
        states[9001] = "succeeded"
        done = tab.poll(token, 9001, running[4])
        assert done[3] is not None and done[3] != gr.skip()   # the matrix, once, at the end
        assert done[4] == [9001, "succeeded"] and "succeeded" in done[0]
        assert tab.poll(token, 9001, done[4]) == (gr.skip(),) * 11      # nothing new to send
        other = tab.poll(token, 9002, done[4])                        # another finished job
        assert other[4] == [9002, "succeeded"] and "step 2/2" in other[0]
        nothing = tab.poll(token, None, other[4])
        assert nothing[3] == gr.skip() and "No job yet" in nothing[0]
    finally:
        tab._events.clear()
        shared_engine().close()
        set_shared_engine(None)


# ------------------------------------------------------------------------- issue 14 (engineer D)

def _wait_for(check, timeout_s: float = 90.0, poll_s: float = 0.5):
    """Poll `check()` until it returns something truthy (bounded); its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll_s)


def test_the_serving_process_follows_a_rollback_made_by_the_cli(studio, tiny_checkpoint):  # noqa: F811
    """14.5: `versions rollback` in another process changes what /predict_image answers with,
    within a bounded wait, back to the base the app started with too."""
    import shutil

    from annotation.versions import register_version, serving_version
    from db.session import dispose_engine

    copy = shutil.copytree(tiny_checkpoint, studio.root / "models" / "cli-v1")
    register_version("cli-v1", copy, is_tiny=True, published=True, url=studio.db_url)
    register_version("cli-base", tiny_checkpoint, is_tiny=True, published=True,
                     url=studio.db_url)
    dispose_engine(studio.db_url)
    env = {**os.environ, "EMO_DB_URL": studio.db_url, "EMO_DATA_DIR": str(studio.root / "data")}
    client = studio.client()

    def answered_by():
        return client.predict(studio.upload("face"), api_name="/predict_image")[0]["model_version"]

    for name in ("cli-v1", "cli-base"):
        done = subprocess.run([sys.executable, "app.py", "versions", "rollback", name], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        want = f"tiny-test-fixture:{name}"
        assert _wait_for(lambda: answered_by() == want, timeout_s=60), \
            (answered_by(), studio.log.read_text()[-2000:])
        # The Fine-tune tab's "Serving ..." line reads the registry: the same version.
        assert serving_version(studio.db_url)["name"] == name
        dispose_engine(studio.db_url)
    assert "the registry now serves cli-base" in studio.log.read_text()


@pytest.fixture(scope="module")
def limited_studio(tmp_path_factory):
    """A prior-only app with a small Gemini budget (EMO_GEMINI_DAILY_LIMIT=4) and its own fake
    Gemini, so the limits are tested without spending the shared studio's buckets."""
    from annotation.users import add_user
    from db.session import dispose_engine, init_db
    from tests.fake_gemini import FakeGemini

    root = tmp_path_factory.mktemp("limited")
    data = root / "data"
    db_url = f"sqlite:///{data / 'studio.db'}"
    init_db(db_url)
    for name in ("ann", "flood"):
        add_user(name, "annotator", USERS["ann"][1], url=db_url)
    dispose_engine(db_url)
    photo = face_photo()
    files = {f"face{i}": write_image(root / f"face{i}.jpg",
                                     np.clip(photo.astype(int) + 7 * i, 0, 255).astype(np.uint8))
             for i in range(6)}
    with FakeGemini(api_key=GEMINI_KEY) as fake:
        env = {**os.environ, "EMO_DATA_DIR": str(data), "EMO_DB_URL": db_url,
               "EMO_SECRET_KEY": "test-secret-key", "GEMINI_API_KEY": GEMINI_KEY,
               "GEMINI_BASE_URL": fake.url, "GRADIO_TEMP_DIR": str(root / "gradio-tmp"),
               "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
               "EMO_GEMINI_DAILY_LIMIT": "4", "EMO_GEMINI_BURST": "3",
               "EMO_GEMINI_PER_MINUTE": "1"}
        for name in ("GOOGLE_API_KEY", "EMO_LLAMA_MODEL", "EMO_TRUST_FORWARDED"):
            env.pop(name, None)
        log = root / "server.log"
        with served_app(env, log) as url:
            yield Studio(url=url, root=root, db_url=db_url, log=log, files=files), fake


def test_gemini_is_rate_limited_per_visitor_within_a_daily_budget(limited_studio):
    """14.11: an anonymous visitor gets EMO_GEMINI_BURST paid answers, then "retry in N s";
    cached answers stay free; a signed-in user has their own bucket; the day's budget (counted
    in the store, so a restart keeps it) stops everyone."""
    from webapp.limits import paid_today

    app, fake = limited_studio
    client = app.client()
    answers = [client.predict(app.upload(f"face{i}"), api_name="/gemini_explain")[0]
               for i in range(3)]
    assert [a["cached"] for a in answers] == [False] * 3
    refused = _app_error(lambda: client.predict(app.upload("face3"), api_name="/gemini_explain"))
    assert "Too many Gemini requests" in refused and "retry in" in refused
    again = client.predict(app.upload("face0"), api_name="/gemini_explain")[0]   # free
    assert again["cached"] is True and again["explanation"] == answers[0]["explanation"]
    assert sum(fake.paid.values()) == 3

    token = client.predict("ann", USERS["ann"][1], api_name="/login")
    signed_in = client.predict(app.upload("face3"), token, api_name="/gemini_explain")[0]
    assert signed_in["cached"] is False                      # ann's own bucket
    assert paid_today(app.db_url) == 4 == sum(fake.paid.values())
    over = _app_error(lambda: client.predict(app.upload("face4"), token,
                                             api_name="/gemini_explain"))
    assert "Gemini budget of this server is used up" in over and "4 paid requests" in over
    assert client.predict(app.upload("face3"), api_name="/gemini_explain")[0]["cached"] is True
    assert sum(fake.paid.values()) == 4 and GEMINI_KEY not in over + refused


def test_a_login_flood_is_refused_at_once_and_a_real_sign_in_still_works(limited_studio):
    """14.11: 60 wrong passwords from one client: after a few, "too many attempts, retry in
    N s" (no password checked, not even a right one), while another name and the right
    password work again once the lock-out ends."""
    import re

    app, _ = limited_studio
    client = app.client()
    messages = [_app_error(lambda: client.predict("flood", f"wrong-guess-{i}", api_name="/login"))
                for i in range(60)]
    checked = [m for m in messages if m.endswith("Unknown user name or wrong password.")]
    locked = [m for m in messages if re.search(r"Too many attempts, retry in \d+ s\.$", m)]
    assert len(checked) + len(locked) == 60
    assert 5 <= len(checked) <= 12 and len(locked) >= 48
    # While the client is locked out even the right password is not checked.
    message = _app_error(lambda: client.predict("flood", USERS["ann"][1], api_name="/login"))
    assert "Too many attempts, retry in" in message

    def sign_in():
        try:
            return client.predict("flood", USERS["ann"][1], api_name="/login")
        except Exception as exc:  # still locked out: the message says for how long
            assert "Too many attempts" in str(exc)
            return None

    token = _wait_for(sign_in, timeout_s=120, poll_s=1.0)
    assert token and token.count(".") == 1
    assert client.predict("ann", USERS["ann"][1], api_name="/login")   # the lock is lifted


def test_blind_ab_needs_an_explanation_from_the_model(tmp_path, monkeypatch):
    """14.12: in prior-only mode the model has no explanation: A/B is disabled with the reason,
    a pair is refused before Gemini is paid, and a vote on such a pair stores nothing."""
    import gradio as gr

    from core.engine import Engine, set_shared_engine
    from db.session import dispose_engine, init_db
    from webapp.components import compare

    url = f"sqlite:///{tmp_path / 'ab.db'}"
    monkeypatch.setenv("EMO_DB_URL", url)
    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GEMINI_API_KEY", "not-used: refused before any Gemini call")
    monkeypatch.setenv("GEMINI_BASE_URL", "http://127.0.0.1:9")   # nothing listens there
    init_db(url)
    photo = str(write_image(tmp_path / "face.jpg", face_photo()))
    prior_only = Engine(None)
    set_shared_engine(prior_only)
    try:
        ok, why = compare.blind_available()
        assert not ok and "prior-only mode" in why
        button, note = compare.blind_controls(None)
        assert button["interactive"] is False and note["visible"] is True
        with pytest.raises(gr.Error) as raised:
            compare.blind_pair(photo, None)
        assert "gives none (prior-only mode)" in raised.value.message
        model = compare._model(photo)
        pair = {"path": photo, "record": None, "right": model,
                "left": {"label": "happiness", "explanation": "Cheeks raised.",
                         "source": "gemini:fake"}}
        with pytest.raises(gr.Error) as raised:
            compare.vote("A", pair, None)
        assert "No vote was stored" in raised.value.message
        from annotation.workflow import preference_stats

        assert preference_stats(url=url) == {}
    finally:
        set_shared_engine(None)
        prior_only.close()
        dispose_engine(url)


def test_the_loss_curve_shows_each_step_once_after_a_resume(token_store, tmp_path, monkeypatch):
    """14.13: a resumed job repeats (and logs again) the steps after its checkpoint; the
    Fine-tune tab's loss curve keeps one point per step, the later one."""
    import json

    from annotation import finetune
    from annotation.users import add_user
    from webapp import auth
    from webapp.components import finetune as tab

    add_user("ada", "admin", "ada-admin-pass", url=token_store)
    token = auth.login("ada", "ada-admin-pass")
    log = tmp_path / "events.jsonl"
    lines = [{"event": "start", "total_steps": 4, "resumed_from": None},
             *[{"event": "step", "step": s, "total_steps": 4, "loss": 2.0 - s / 10} for s in (1, 2, 3)],
             {"event": "checkpoint", "step": 2},
             {"event": "start", "total_steps": 4, "resumed_from": 2},
             *[{"event": "step", "step": s, "total_steps": 4, "loss": 1.0 - s / 10} for s in (3, 4)]]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setattr(finetune, "_log_path", lambda job_id, url=None: log)
    monkeypatch.setattr(finetune, "job_status", lambda job_id, url=None: {
        "id": job_id, "status": "running", "step": 4, "total_steps": 4, "loss": 0.6,
        "eta_s": None, "error": None, "version": None})
    tab._events.clear()
    try:
        curve = tab.poll(token, 9100, None)[1]
        assert list(curve["step"]) == [1, 2, 3, 4]
        assert list(curve["loss"]) == pytest.approx([1.9, 1.8, 0.7, 0.6])
    finally:
        tab._events.clear()


def test_a_submission_without_a_claim_on_a_filled_record_is_refused(studio):
    """14.7 through the API: /save_annotation needs no queue visit, so it claims on the way;
    on a record someone else has submitted, a second submission is refused (nothing stored)."""
    client, ann, ada = studio.client(), studio.token("ann"), studio.token("ada")
    record = client.predict(ann, "faces", api_name="/next_record")
    sid = record["sample_id"]
    client.predict(ann, sid, "happiness", "Cheeks raised.", "submitted",
                   (record["response"] or {}).get("version", 0), api_name="/save_annotation")
    message = _app_error(lambda: client.predict(ada, sid, "sadness", "Lip corners down.",
                                                "submitted", 0, api_name="/save_annotation"))
    assert f"record #{sid} is taken" in message and "not submitted" in message
    history = client.predict(ada, sid, api_name="/record_history")
    assert [h["user"] for h in history if h["action"] == "submitted"] == ["ann"]


# ------------------------------------------------------------------------- issue 14.1 (engineer A)

def test_web_imports_are_confined_to_the_import_folders_and_never_echo_secrets(studio):
    """/import_dataset reads only inside EMO_IMPORT_ROOTS (here the default: the data dir and
    ./imports), symlinks resolved, never the store's own files; and what it does read is never
    echoed (the server's environment holds GEMINI_API_KEY and EMO_ADMIN_PASSWORD)."""
    import shutil

    from sqlalchemy import select

    from db.models import Dataset, Sample
    from db.session import dispose_engine, session_scope

    secrets = (GEMINI_KEY, "boss-from-space-secret")
    ada, client = studio.token("ada"), studio.client()
    data = (studio.root / "data").resolve()

    def refused(fmt: str, path) -> str:
        message = _app_error(lambda: client.predict(ada, fmt, str(path), "x",
                                                    api_name="/import_dataset"))
        assert not any(secret in message for secret in secrets), message
        return message

    message = refused("folder", studio.root / "faces")
    assert "outside the import folders" in message and str(data) in message
    assert "EMO_IMPORT_ROOTS" in message
    assert "outside the import folders" in refused("csv", "/proc/self/environ")
    link = data / "linked-faces"                     # a link inside a root, pointing out of it
    link.symlink_to(studio.root / "faces", target_is_directory=True)
    assert "outside the import folders" in refused("folder", link)
    for private in (data / "secret_key", data / "studio.db", data):
        assert "store's own files" in refused("csv", private)

    # Inside a root: an environment dump (with a stray CR) is rows reported, never a secret.
    dump = data / "imports" / "environ.csv"
    dump.parent.mkdir(parents=True)
    dump.write_bytes(f"GEMINI_API_KEY={GEMINI_KEY}\nEMO_ADMIN_PASSWORD=boss-from-space-secret\n"
                     f"x,{GEMINI_KEY}\nimg.png,sa\rd\n".encode())
    text, by_label, by_split, broken = client.predict(ada, "csv", str(dump), "dump",
                                                      api_name="/import_dataset")
    shown = str((text, by_label, by_split, broken))
    assert "0 added" in text and "4 broken" in text, shown
    assert not any(secret in shown for secret in secrets), shown
    assert "carriage return" in shown

    # A dataset inside a root imports; the Split and Face-crop options reach the importer.
    flat = data / "imports" / "flat"
    shutil.copytree(studio.root / "faces" / "train", flat)
    text, *_ = client.predict(ada, "folder", str(flat), "flat", "test", "yes",
                              api_name="/import_dataset")
    assert "3 added" in text
    with session_scope(studio.db_url) as s:
        rows = s.scalars(select(Sample).join(Dataset).where(Dataset.name == "flat")).all()
        assert len(rows) == 3 and {(r.split, r.meta["aligned"]) for r in rows} == {("test", True)}
    dispose_engine(studio.db_url)


# ------------------------------------------------------------------------- issue 16 (helper jobs)

def _poll_until(poll, rendered: int, timeout_s: float = 180.0) -> tuple:
    """Tick a tab's timer handler (`poll(seen)`) until output `rendered` is sent; its outputs."""
    import gradio as gr

    seen, deadline = None, time.monotonic() + timeout_s
    while True:
        out = poll(seen)
        seen = out[-1]
        if not (isinstance(out[rendered], dict) and out[rendered] == gr.skip()):
            return out
        assert time.monotonic() < deadline, out
        time.sleep(0.3)


def test_the_data_and_finetune_buttons_start_jobs_that_a_reload_follows_again(token_store, tmp_path):
    """The Data tab's Import and the Fine-tune tab's Compare return a job number at once; the
    timer shows the result when done, once; after a reload the tab finds the job again and
    draws its result from the store."""
    import gradio as gr

    from annotation.users import add_user
    from webapp import auth
    from webapp.components import data as tab
    from webapp.components import finetune as ft_tab

    add_user("ada", "admin", "ada-admin-pass", url=token_store)
    token = auth.login("ada", "ada-admin-pass")
    folder = _face_dataset(tmp_path / "imports" / "tabbed")   # inside the data dir: allowed
    job_id, line, cleared = tab.start_import(token, "folder", str(folder), "tabbed", "auto", "auto")
    assert f"Import job **#{job_id}**" in line and cleared == ""
    out = _poll_until(lambda seen: tab.poll(token, job_id, None, None, seen), rendered=1)
    assert "**done**" in out[0] and "5 added" in out[1]
    assert dict(zip(out[3]["split"], out[3]["samples"])) == {"train": 3, "test": 2}
    assert out[5:10] == (gr.skip(),) * 5                      # no generate / export job yet
    assert tab.poll(token, job_id, None, None, out[-1]) == (gr.skip(),) * 10 + (out[-1],)

    restored = tab.restore(token)                             # a reload of the page
    assert restored == (job_id, None, None, {})
    again = tab.poll(token, *restored)
    assert again[1] == out[1] and "**done**" in again[0]
    assert tab.poll(None, job_id, None, None, None) == (gr.skip(),) * 11   # visitors: nothing
    with pytest.raises(gr.Error, match="admin"):
        tab.start_import(None, "folder", str(folder), "x")

    table_job, line, _ = ft_tab.start_compare(token, ["prior-only", "nope"], ["tabbed"], "test")
    assert f"Comparison job **#{table_job}**" in line
    out = _poll_until(lambda seen: ft_tab.poll_jobs(token, None, table_job, seen), rendered=6)
    assert out[6].startswith("| Model | tabbed UAR | tabbed WAR | Note |")
    assert "| nope | — | — | error: " in out[6] and out[:5] == (gr.skip(),) * 5
    assert ft_tab.restore_jobs(token) == (None, table_job, {})
    with pytest.raises(gr.Error, match="at least one dataset"):
        ft_tab.start_compare(token, ["prior-only"], [], "test")


def test_the_video_strip_times_come_from_the_result_without_decoding(tmp_path):
    """The Video tab draws on the engine's own frames; the captions' times are computed from
    the result's media info, the same numbers core.media gives when it decodes."""
    from core.media import load_video, probe_video
    from webapp.components.video import frame_strip, frame_times

    clip = write_video(tmp_path / "clip.mp4", face_frames(12), fps=6)
    for n in (4, 8, 12, 20):
        media = load_video(clip, num_frames=n)
        info = {k: v for k, v in probe_video(clip).items() if k in ("frame_count", "fps")}
        assert frame_times(info, len(media.frames)) == pytest.approx(media.meta["timestamps_s"])
    strip = frame_strip(media.frames, frame_times(info, len(media.frames)),
                        [{"frame": 1, "box": [1, 1, 20, 20], "landmarks": []}])
    assert [c for _, c in strip[:3]] == ["frame 1 · 0.0 s · no face", "frame 2 · 0.2 s",
                                         "frame 3 · 0.3 s · no face"]
