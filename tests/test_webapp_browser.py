"""The web app in a real browser: Debian's chromium driven by Playwright, against
`python app.py serve` in a subprocess (the `studio` fixture of tests/test_webapp_api.py).

Chromium comes from apt (`apt-get install chromium chromium-driver`; never `playwright
install`). With EMO_SCREENSHOTS=DIR set, the tests also save a screenshot of each tab there
(how docs/screenshots/ is made):

    EMO_SCREENSHOTS=docs/screenshots python -m pytest tests/test_webapp_browser.py
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixtures)
from tests.test_webapp_api import USERS, XSS, fake_gemini_url, studio  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update",
                 "--disable-sync"]
TIMEOUT_MS = 30_000
SCREENSHOTS = os.environ.get("EMO_SCREENSHOTS")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is missing: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, studio):  # noqa: F811
    """A fresh browser profile on the app; fails the test if any script ran alert()."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(studio.url)
    page.locator("#login-status").get_by_text("Not signed in").wait_for()
    yield page
    context.close()
    assert not dialogs, f"a script ran in the page: alert({dialogs})"


def sign_in(page, name: str) -> None:
    from playwright.sync_api import expect

    page.locator("#login-box").get_by_text("Sign in").first.click()
    page.locator("#login-name input").fill(name)
    page.locator("#login-password input").fill(USERS[name][1])
    page.locator("#login-submit").click()
    expect(page.locator("#login-status")).to_contain_text(f"Signed in as {name}")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def preferences(db_url: str) -> int:
    """Blind votes stored so far (read straight from the app's SQLite file)."""
    from sqlalchemy import func, select

    from db.models import Preference
    from db.session import session_scope

    with session_scope(db_url) as session:
        return session.scalar(select(func.count()).select_from(Preference))


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def test_predict_an_image_shows_label_and_chart(page, studio):  # noqa: F811
    from playwright.sync_api import expect

    page.locator("#image-input input[type=file]").set_input_files(str(studio.files["face"]))
    page.locator("#image-run").click()
    summary = page.locator("#image-summary .emo-label")
    expect(summary).to_have_text(re.compile(r"^[a-z]+$"))
    label = summary.text_content()
    expect(page.locator("#image-summary")).to_contain_text("tiny test fixture")
    expect(page.locator("#image-label")).to_contain_text(label)
    # The bar chart is drawn (Vega renders into a canvas or an SVG) with the label on its axis.
    expect(page.locator("#image-chart").locator("canvas, svg").first).to_be_visible()
    expect(page.locator("#image-chart")).to_contain_text(label)
    expect(page.locator("#image-drawn img")).to_be_visible()
    screenshot(page, "image")


def test_an_example_answers_with_the_serving_version(page, studio):  # noqa: F811
    from playwright.sync_api import expect

    page.locator("#image-examples button").first.click()       # the astronaut
    expect(page.locator("#image-summary .emo-label")).to_have_text(re.compile(r"^[a-z]+$"))
    expect(page.locator("#image-summary")).to_contain_text("tiny-test-fixture:")


def test_predict_a_video_shows_the_frames_strip(page, studio):  # noqa: F811
    from playwright.sync_api import expect

    open_tab(page, "Video")
    page.locator("#video-input input[type=file]").set_input_files(str(studio.files["video"]))
    page.locator("#video-run").click()
    expect(page.locator("#video-strip")).to_contain_text("frame 1")
    expect(page.locator("#video-summary .emo-label")).to_have_text(re.compile(r"^[a-z]+$"))
    screenshot(page, "video")


def test_compare_side_by_side_then_a_blind_vote(page, studio):  # noqa: F811
    from playwright.sync_api import expect

    open_tab(page, "Compare")
    page.locator("#compare-input input[type=file]").set_input_files(str(studio.files["face"]))
    page.locator("#compare-run").click()
    expect(page.locator("#compare-gemini-text textarea")).not_to_have_value("")
    expect(page.locator("#compare-model-text textarea")).not_to_have_value("")
    screenshot(page, "compare")
    page.locator("#compare-blind").click()
    page.locator("#compare-vote-a").click()
    expect(page.locator("#compare-verdict")).to_contain_text("vote stored")
    assert preferences(studio.db_url) == 1


def test_annotate_submit_then_see_it_in_history(page, studio):  # noqa: F811
    from playwright.sync_api import expect

    sign_in(page, "ann")
    open_tab(page, "Annotate")
    page.locator("#annotate-next").click()
    expect(page.locator("#annotate-info")).to_contain_text("Record #")
    record = re.search(r"Record #(\d+)", page.locator("#annotate-info").inner_text()).group(1)

    page.locator("#annotate-info").click()      # focus outside the text box: digits pick labels
    page.keyboard.press("2")
    second = page.locator("#annotate-label label").nth(1)
    expect(second.locator("input")).to_be_checked()
    text = f"Cheeks raised, lip corners pulled up. {XSS}"
    page.locator("#annotate-text textarea").fill(text)
    page.locator("#annotate-advance input").uncheck()

    # Meanwhile the same record is saved from another session: this editor's save must not
    # overwrite it silently, and must show what was saved.
    studio.client().predict(studio.token("ann"), int(record), "happiness",
                            "Saved elsewhere first.", "draft", 0, api_name="/save_annotation")
    page.locator("#annotate-text textarea").press("Control+Enter")
    expect(page.locator("#annotate-message")).to_contain_text("saved meanwhile")
    expect(page.locator("#annotate-message")).to_contain_text("Saved elsewhere first.")
    expect(page.locator("#annotate-text textarea")).to_have_value(text)   # nothing lost

    page.locator("#annotate-text textarea").press("Control+Enter")       # a deliberate overwrite
    expect(page.locator("#annotate-message")).to_contain_text(f"Submitted: record #{record}")
    history = page.locator("#annotate-history")
    expect(history).to_contain_text("submitted")
    expect(history).to_contain_text(XSS)            # shown as text...
    assert page.locator("img[src='x']").count() == 0   # ...never as HTML
    expect(page.locator("#annotate-progress")).to_contain_text("You: 1 submitted")
    screenshot(page, "annotate")

    page.reload()                                   # the session survives a reload
    expect(page.locator("#login-status")).to_contain_text("Signed in as ann")


def test_admin_tabs_are_locked_until_sign_in(page):
    from playwright.sync_api import expect

    open_tab(page, "Data")
    expect(page.get_by_text("Sign in as an admin")).to_be_visible()
    expect(page.locator("#data-panel")).to_be_hidden()
    sign_in(page, "ada")
    open_tab(page, "Data")
    expect(page.locator("#data-panel")).to_be_visible()
    screenshot(page, "data")


def test_an_admin_adds_an_annotator_in_the_users_tab(page):
    from playwright.sync_api import expect

    sign_in(page, "ada")
    open_tab(page, "Users")
    panel = page.locator("#users-panel")
    expect(panel.locator("table")).to_contain_text("boss")      # the table lists the users
    page.locator("#users-new-name input").fill("carla")
    page.locator("#users-new-password input").fill("carla-first-pass")
    page.locator("#users-add").click()
    expect(panel.locator("table")).to_contain_text("carla")
    screenshot(page, "users")


def test_tiny_finetune_runs_to_the_end(page, studio):  # noqa: F811
    from playwright.sync_api import expect

    # Training data: Gemini suggestions for the dataset (idempotent), exported below.
    studio.client().predict(studio.token("ada"), "faces", 0, "",
                            api_name="/generate_instructions")
    sign_in(page, "ada")
    open_tab(page, "Data")
    page.get_by_label("Fall back to the suggestion").check()
    page.locator("#data-export").click()
    expect(page.locator("#data-export-result")).to_contain_text("Snapshot #")

    open_tab(page, "Fine-tune")
    page.locator("#finetune-panel").get_by_role("button", name="Refresh").click()
    page.locator("#finetune-snapshot input").click()
    page.get_by_role("option").first.click()
    page.locator("#finetune-start").click()
    bar = page.locator("#finetune-progress-box progress")
    expect(bar).to_have_attribute("data-status", "running")
    expect(bar).to_have_attribute("data-total", re.compile(r"^[1-9]\d*$"))
    expect(bar).to_have_attribute("data-status", re.compile("succeeded|failed"), timeout=150_000)
    assert bar.get_attribute("data-status") == "succeeded", page.locator(
        "#finetune-progress").inner_text()
    assert bar.get_attribute("data-step") == bar.get_attribute("data-total")
    expect(page.locator("#finetune-progress")).to_contain_text("Evaluation of v")
    expect(page.locator("#finetune-curve").locator("canvas, svg").first).to_be_visible()
    expect(page.locator("#finetune-confusion img")).to_be_visible()
    screenshot(page, "finetune")
    open_tab(page, "Jobs")   # one screen follows every job: the fine-tune is listed there too
    row = page.locator("#jobs-table tr", has_text="finetune").first
    expect(row).to_contain_text("succeeded")
    expect(row).to_contain_text(re.compile(r"ft-\d+"))


def test_an_import_job_survives_a_page_reload(page, studio):  # noqa: F811
    from playwright.sync_api import expect

    from tests.media_files import face_photo, write_image

    folder = studio.root / "data" / "imports" / "reloaded"
    for i in range(6):
        (folder / ["happy", "sad"][i % 2]).mkdir(parents=True, exist_ok=True)
        write_image(folder / ["happy", "sad"][i % 2] / f"{i}.png", face_photo()[:300, 100 + i:400 + i])
    sign_in(page, "ada")
    open_tab(page, "Jobs")
    page.locator("#jobs-import-path input, #jobs-import-path textarea").first.fill(str(folder))
    page.locator("#jobs-import-name input, #jobs-import-name textarea").first.fill("reloaded")
    page.locator("#jobs-start-import").click()
    expect(page.locator("#jobs-followed")).to_contain_text("import")
    page.reload()   # the job goes on in its own process; the tab reads it back from the store
    # The session token lives in the browser's storage: the reloaded page is still signed in.
    expect(page.locator("#login-status")).to_contain_text("Signed in as ada")
    open_tab(page, "Jobs")
    table = page.locator("#jobs-table")
    expect(table).to_contain_text("reloaded")
    expect(table).to_contain_text("6 added", timeout=120_000)
    screenshot(page, "jobs")


def test_a_data_tab_import_returns_at_once_and_a_reload_shows_it_finish(page, studio):  # noqa: F811
    from playwright.sync_api import expect

    from tests.media_files import face_photo, write_image

    folder = studio.root / "data" / "imports" / "from-data-tab"
    for i in range(4):
        (folder / ["happy", "sad"][i % 2]).mkdir(parents=True, exist_ok=True)
        write_image(folder / ["happy", "sad"][i % 2] / f"{i}.png", face_photo()[:300, 90 + i:390 + i])
    sign_in(page, "ada")
    open_tab(page, "Data")
    page.locator("#data-import-path textarea, #data-import-path input").first.fill(str(folder))
    page.locator("#data-import-name textarea, #data-import-name input").first.fill("from-data-tab")
    page.locator("#data-import").click()
    # The button answers with the job's number; the job runs in its own process.
    expect(page.locator("#data-import-job")).to_contain_text(re.compile(r"Import job #\d+"))
    page.reload()
    expect(page.locator("#login-status")).to_contain_text("Signed in as ada")
    open_tab(page, "Data")
    expect(page.locator("#data-import-result")).to_contain_text("4 added", timeout=120_000)
    expect(page.locator("#data-import-job")).to_contain_text("done")


@pytest.fixture(scope="module")
def zero_shot_app(tmp_path_factory):
    """`python app.py serve --model zero-shot:FOLDER` on a tiny random LLaVA: a test fixture
    served as a released VLM would be, without any EMO-LLaMA checkpoint."""
    from core.model.vlm import build_tiny_vlm
    from tests.test_webapp_api import served_app

    root = tmp_path_factory.mktemp("zero-shot")
    base = build_tiny_vlm(root / "tiny-llava", "llava")
    env = {**os.environ, "EMO_DATA_DIR": str(root / "data"), "EMO_DB_URL": f"sqlite:///{root / 'z.db'}",
           "EMO_SECRET_KEY": "test-secret-key", "GRADIO_TEMP_DIR": str(root / "gradio-tmp"),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    from tests.media_files import face_photo, write_image

    face = write_image(root / "face.jpg", face_photo())
    with served_app(env, root / "server.log", "--model", f"zero-shot:{base}") as url:
        yield url, base, face


def test_a_zero_shot_vlm_answers_in_the_image_tab_under_its_name(browser, zero_shot_app):
    from playwright.sync_api import expect

    url, base, face = zero_shot_app
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        page.goto(url)
        # The banner names what answers: the zero-shot VLM, labelled a test fixture.
        expect(page.locator(".emo-banner")).to_contain_text(f"tiny-test-fixture:zero-shot:{base}")
        page.locator("#image-input input[type=file]").set_input_files(str(face))
        page.locator("#image-run").click()
        expect(page.locator("#image-summary .emo-label")).to_have_text(re.compile(r"^[a-z]+$"))
        expect(page.locator("#image-summary")).to_contain_text(f"zero-shot:{base}")
        expect(page.locator("#image-summary")).to_contain_text("tiny test fixture")
        expect(page.locator("#image-chart").locator("canvas, svg").first).to_be_visible()
    finally:
        context.close()
