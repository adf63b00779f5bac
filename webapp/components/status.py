"""Who may see what (run on page load and on every sign-in change) and the Admin/Status panel."""
from __future__ import annotations

import json
import platform
from typing import Callable

import gradio as gr

from webapp.auth import AuthError, identify, require
from webapp.components.common import engine, handle_errors
from webapp.components.login import identity_text
from webapp.components.render import mode_banner

# What a gated component does with the viewer's role: "content" shows when the role is enough,
# "locked" (the "please sign in" note) shows when it is not, "timer" ticks only for those
# allowed, "datasets" is a dataset dropdown filled only for them.
Gate = tuple[gr.components.Component, str, str]


def dataset_names() -> list[str]:
    from sqlalchemy import select

    from db.models import Dataset
    from db.session import session_scope

    with session_scope() as session:
        return list(session.scalars(select(Dataset.name).order_by(Dataset.name)))


def make_access_refresher(gates: list[Gate]) -> Callable:
    """A handler token -> (identity line, model banner, one update per gate)."""
    def refresh_access(token: str | None):
        try:
            who, problem = identify(token), None
        except AuthError as exc:  # an expired or revoked session: signed out, and told why
            who, problem = None, str(exc)
        names = dataset_names() if who else []
        updates = []
        for _, role, kind in gates:
            allowed = who is not None and who.has(role)
            if kind == "content":
                updates.append(gr.update(visible=allowed))
            elif kind == "locked":
                updates.append(gr.update(visible=not allowed))
            elif kind == "timer":
                updates.append(gr.update(active=allowed))
            else:
                choices = names if allowed else []
                updates.append(gr.update(choices=choices, value=choices[0] if choices else None,
                                         interactive=allowed))
        return identity_text(who, problem), mode_banner(engine().info), *updates
    return refresh_access


def _safe_db_url() -> str:
    from sqlalchemy.engine import make_url

    from db.session import database_url

    return make_url(database_url()).render_as_string(hide_password=True)


@handle_errors
def status_report(token: str | None) -> dict:
    """Engine health and where things live (admin only: it names paths and queue sizes)."""
    require(token, "admin")
    eng = engine()
    report = {"engine": eng.info, "health": eng.health(), "database": _safe_db_url(),
              "gradio": gr.__version__, "python": platform.python_version()}
    # gr.JSON wants string keys (the batch-size histogram has ints) and plain values.
    return json.loads(json.dumps(report, default=str))


def create_status_panel(token: gr.BrowserState) -> dict:
    with gr.Accordion("Admin · status", open=False, elem_id="status-panel") as panel:
        gr.Markdown("Engine health (queue, batches, latency), the serving model and the store.")
        refresh = gr.Button("Refresh", size="sm")
        report = gr.JSON(label="Status")
    refresh.click(status_report, inputs=token, outputs=report, api_name="status")
    return {"panel": panel, "gates": [(panel, "admin", "content")]}
