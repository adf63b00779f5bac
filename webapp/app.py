"""The Gradio app: builds the page from one component file per tab and launches it.

    python app.py                                  # http://127.0.0.1:7860, embedded defaults
    python app.py serve --port 7861 --model runs/v3

Tabs: Image, Video, Compare (public); Annotate (annotator+, reviewer+ for reviews); Data and
Fine-tune and Jobs (admin); Users (own password for everyone signed in, user management for admins). Gradio 6 takes theme, CSS and JS at `launch()`; the HTTP API lives under
/gradio_api, and the public endpoints are /predict_image, /predict_video and /gemini_explain.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from pathlib import Path

import gradio as gr

from core.errors import UserError
from db.session import data_dir
from webapp.components.common import Page, engine, model_concurrency

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_FILE_SIZE = "200mb"        # the same bound as core.media's default file limit
QUEUE_SIZE = 64                # waiting events beyond this get "the queue is full"
DEFAULT_CONCURRENCY = 4        # events outside the model group (DB, Gemini, polling)


# The tabs, in page order: (label, id, "module:create function"). A create function takes the
# Page (webapp/components/common.py) and returns a dict that may hold "gates" (panels opened by
# role) and "on_access" (fn, outputs) run on sign-in and when the tab is opened. A new tab is
# its module under webapp/components/ plus one line here.
TABS = [
    ("Image", "image", "webapp.components.image:create_image_tab"),
    ("Video", "video", "webapp.components.video:create_video_tab"),
    ("Compare", "compare", "webapp.components.compare:create_compare_tab"),
    ("Annotate", "annotate", "webapp.components.annotate:create_annotate_tab"),
    ("Data", "data", "webapp.components.data:create_data_tab"),
    ("Fine-tune", "finetune", "webapp.components.finetune:create_finetune_tab"),
    ("Jobs", "jobs", "webapp.components.jobs:create_jobs_tab"),
    ("Users", "users", "webapp.components.users:create_users_tab"),
]


def build_app() -> gr.Blocks:
    """The whole page. Creating it starts the shared engine (to size the model group)."""
    from webapp.components.login import (browser_state, create_login_bar, hf_oauth_enabled,
                                         hf_session)
    from webapp.components.status import create_status_panel, make_access_refresher

    with gr.Blocks(title="EMO-LLaMA Studio", fill_width=True, analytics_enabled=False) as demo:
        token = browser_state()
        with gr.Row(elem_id="header"):
            gr.HTML("<div class='emo-title'><span>EMO-LLaMA Studio</span>"
                    "<small>facial expressions, explained</small></div>")
        banner = gr.HTML(elem_id="mode-banner")
        login = create_login_bar(token)
        page = Page(token=token, concurrency=model_concurrency(), banner=banner,
                    examples_dir=data_dir() / "examples")
        built = []  # (the gr.Tab, what its create function returned)
        with gr.Tabs(elem_id="main-tabs"):
            for label, tab_id, where in TABS:
                module, _, create = where.partition(":")
                with gr.Tab(label, id=tab_id) as tab:
                    built.append((tab, getattr(importlib.import_module(module), create)(page)))
        status = create_status_panel(token)

        # Who is signed in decides which panels open; every handler checks again itself.
        gates = [*login["gates"], *(g for _, parts in built for g in parts.get("gates", [])),
                 *status["gates"]]
        access = dict(fn=make_access_refresher(gates), inputs=token,
                      outputs=[login["status"], banner, *[g[0] for g in gates]],
                      api_visibility="private")
        if hf_oauth_enabled():  # a Hugging Face sign-in becomes a session token (then `access`)
            demo.load(hf_session, inputs=token, outputs=token, api_visibility="private")
        # A tab with `on_access` fills in on sign-in and when opened (the Data and Fine-tune tabs
        # follow their latest jobs again; Compare's Blind A/B button follows the serving model).
        on_load, on_change = demo.load(**access), token.change(**access)
        for tab, parts in built:
            if "on_access" in parts:
                fill_fn, fill_outputs = parts["on_access"]
                fill = dict(fn=fill_fn, inputs=token, outputs=fill_outputs, api_visibility="private")
                on_load, on_change = on_load.then(**fill), on_change.then(**fill)
                tab.select(**fill)
    return demo


def _read_static(name: str) -> str:
    return (STATIC / name).read_text()


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           serve_published: bool = True) -> None:
    """Upgrade the schema, start the engine, build the page and serve it (blocks).

    `serve_published`: load the model version the registry marks as serving (what a publish
    or rollback chose before a restart) instead of the start-up model.
    """
    from db.session import check_store_writable, init_db
    from webapp.cli import check_port_free, port_message

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call otherwise
    # What can make the start fail is checked before anything slow (the model loads for
    # seconds to minutes): each problem is one UserError line (`error: ...`, exit 2).
    check_port_free(host, port)
    check_store_writable()
    backups = os.environ.get("EMO_BACKUP_DIR")
    if backups:
        restore_latest_backup(Path(backups))
    init_db()
    _ensure_admin()
    started_with = _registry_serving()
    _restore_training_state(serve_published)
    if backups:
        start_backups(Path(backups), float(os.environ.get("EMO_BACKUP_MINUTES", "30")))
    demo = build_app()
    follow_registry(started_with, float(os.environ.get("EMO_REGISTRY_POLL_S", "2")))
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=DEFAULT_CONCURRENCY)
    try:
        demo.launch(server_name=host, server_port=port, share=share,
                    max_file_size=MAX_FILE_SIZE, show_error=False,
                    allowed_paths=[str(data_dir() / "examples"), str(data_dir() / "cache")],
                    theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="pink"),
                    css=_read_static("app.css"), js=_read_static("shortcuts.js"),
                    footer_links=["api", "gradio"])
    except OSError as exc:  # taken in the moment between our check and Gradio's own bind
        if "port" not in str(exc).lower():
            raise
        raise UserError(port_message(host, port)) from None


# ----------------------------------------------------------------------------- the registry
# A publish or rollback made in another process (`python app.py versions rollback v1`, a
# fine-tune job publishing its version, another replica's Fine-tune tab) changes only the
# registry. The web process polls the registry's serving row (one small query every few
# seconds) and hot-swaps its engine when it changes, so what answers is what the Fine-tune tab
# says is serving. Polling rather than an admin endpoint the CLI calls: the CLI would need the
# server's address and a credential, and a job or a second replica would not reach every
# process; the registry is already the one place all of them write.

def _registry_serving() -> str | None:
    from annotation.versions import serving_version

    version = serving_version()
    return version["name"] if version else None


def follow_registry(started_with: str | None, interval_s: float = 2.0,
                    stop: threading.Event | None = None) -> threading.Thread | None:
    """A daemon thread that swaps the engine to the registry's serving version when it changes.

    `started_with`: the serving version when the process started. With an explicit `--model`
    the start-up model serves until the registry changes; from then on the registry decides.
    A version that fails to load is logged once and the engine keeps serving (and naming) the
    version it had; it is tried again only when the registry changes again. This is the one
    path by which a publish made elsewhere (a fine-tune job, the CLI) reaches this process:
    reading a job's status changes nothing. `stop` (set it) ends the watcher.
    """
    if interval_s <= 0:
        return None
    from annotation.versions import activate_in_engine, serving_version

    stop = stop or threading.Event()

    def loop() -> None:
        seen = started_with
        while not stop.wait(interval_s):
            try:
                version = serving_version()
                if version is None or version["name"] == seen:
                    continue
                seen = version["name"]
                activate_in_engine(version)
                log.info("the registry now serves %s: the engine follows", version["name"])
            except (UserError, OSError) as exc:
                log.warning("cannot serve %s, which the registry names: %s; still serving %s",
                            seen, exc, engine().serving.name)
            except Exception:  # a database hiccup must not end the watcher
                log.exception("following the model registry failed; will try again")

    thread = threading.Thread(target=loop, name="registry-watcher", daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------- backups
# SQLite lives on local disk (a network mount is not safe for it). Where local disk does not
# survive a restart, as on a Hugging Face Space, EMO_BACKUP_DIR names persistent storage
# (e.g. /data/backups): the app copies the store there every EMO_BACKUP_MINUTES with SQLite's
# online backup API, and a fresh start with no database restores the newest copy.

BACKUPS_KEPT = 48


def _backup_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.db"), key=lambda p: p.stat().st_mtime)


def restore_latest_backup(folder: Path) -> Path | None:
    """Copy the newest backup into place when the database file does not exist yet."""
    import shutil

    from db.session import sqlite_path

    database = sqlite_path()
    copies = _backup_files(folder) if folder.is_dir() else []
    if database is None or database.exists() or not copies:
        return None
    database.parent.mkdir(parents=True, exist_ok=True)
    partial = database.with_name(f".{database.name}.restoring")
    shutil.copyfile(copies[-1], partial)
    partial.replace(database)
    log.info("restored the store from the backup %s", copies[-1])
    return copies[-1]


def backup_once(folder: Path) -> Path:
    """One online copy into `folder`, keeping the newest BACKUPS_KEPT."""
    from datetime import datetime, timezone

    from db.session import backup

    folder.mkdir(parents=True, exist_ok=True)
    copy = backup(folder / datetime.now(timezone.utc).strftime("emo_studio-%Y%m%d-%H%M%S-%f.db"))
    for old in _backup_files(folder)[:-BACKUPS_KEPT]:
        old.unlink()
    return copy


def start_backups(folder: Path, minutes: float) -> threading.Thread:
    """A daemon thread that backs the store up every `minutes` (failures are logged, not fatal)."""
    def loop() -> None:
        while True:
            time.sleep(minutes * 60)
            try:
                log.info("backed up the store to %s", backup_once(folder))
            except Exception:
                log.exception("backup to %s failed; will try again", folder)

    thread = threading.Thread(target=loop, name="store-backup", daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------- start-up state

def _ensure_admin() -> None:
    """On a fresh store, EMO_ADMIN_USER / EMO_ADMIN_PASSWORD (Space secrets) create the admin.

    A Hugging Face Space has no shell for `python app.py users add`; an existing user of that
    name is left exactly as it is.
    """
    password = os.environ.get("EMO_ADMIN_PASSWORD")
    if not password:
        return
    from annotation.users import add_user, list_users

    name = os.environ.get("EMO_ADMIN_USER", "admin")
    if all(user["name"] != name for user in list_users()):
        add_user(name, "admin", password)
        log.info("created the admin user %s from EMO_ADMIN_USER/EMO_ADMIN_PASSWORD", name)


def _restore_training_state(serve_published: bool) -> None:
    """Settle jobs a crash left "running" (so the UI never waits on them) and, if asked, serve
    the version the registry says is serving."""
    from annotation.finetune import recover_jobs
    from annotation.jobs import recover_jobs as recover_other_jobs
    from annotation.versions import activate_in_engine, serving_version

    recover_jobs()        # fine-tunes
    recover_other_jobs()  # imports, evaluations, exports a crash left "running"
    version = serving_version() if serve_published else None
    if version is not None:
        engine()  # activate_in_engine swaps the running engine; start it first
        try:
            activate_in_engine(version)
        except (UserError, OSError) as exc:  # e.g. its folder is gone: keep the start-up model
            log.warning("cannot serve the published version %s: %s", version["name"], exc)
            return
        log.info("serving the published version %s", version["name"])
