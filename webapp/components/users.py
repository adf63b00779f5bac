"""The Users tab: everyone signed in changes their own password; admins add users and set roles.

On a Hugging Face Space there is no shell for `python app.py users add`, so this tab is how an
admin (created from the EMO_ADMIN_USER / EMO_ADMIN_PASSWORD secrets) brings annotators in. Each
action is also an API endpoint that takes the session token first, e.g.

    Client(url).predict(token, "ana", "annotator", "first-pass-123", api_name="/add_user")
"""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.errors import UserError
from db.models import ROLES
from webapp.auth import issue_token, require
from webapp.components.common import Page, handle_errors

USER_COLUMNS = ["name", "role", "created (UTC)"]


def users_frame() -> pd.DataFrame:
    from annotation.users import list_users

    rows = [[u["name"], u["role"], (u["created_at"] or "")[:19].replace("T", " ")]
            for u in list_users()]
    return pd.DataFrame(rows, columns=USER_COLUMNS)


@handle_errors
def change_own_password(token: str | None, current: str, new: str, again: str):
    """/change_password: your own password (needs the current one); returns a fresh session."""
    from annotation.users import HF_SUFFIX, authenticate, set_password

    who = require(token, "viewer")
    if who.name.endswith(HF_SUFFIX):
        raise UserError("You sign in with Hugging Face: there is no password here to change.")
    if new != again:
        raise UserError("The two new passwords differ.")
    if authenticate(who.name, current) is None:
        raise UserError("Your current password is wrong.")
    set_password(who.name, new)
    user = authenticate(who.name, new)
    gr.Info("Password changed. Your other sessions are signed out.")
    # The old token carried the old password's fingerprint: this page gets a new one.
    return issue_token(user.id, user.name, user.password_hash), "", "", ""


@handle_errors
def add(token: str | None, name: str, role: str, password: str):
    """/add_user: a new user with a role and a first password (admin)."""
    from annotation.users import add_user

    require(token, "admin")
    user = add_user(name, role, password)
    gr.Info(f"Added {user['name']} ({user['role']}).")
    table = users_frame()
    return table, gr.update(choices=table["name"].tolist()), "", ""


@handle_errors
def change_role(token: str | None, name: str | None, role: str):
    """/set_role: another role for a user; it applies to their open sessions at once (admin)."""
    from annotation.users import set_role

    require(token, "admin")
    if not name:
        raise UserError("Choose a user.")
    user = set_role(name, role)
    gr.Info(f"{user['name']} is now {user['role']}.")
    return users_frame()


@handle_errors
def reset_password(token: str | None, name: str | None, password: str):
    """/reset_password: set a user's password, signing them out everywhere (admin)."""
    from annotation.users import set_password

    require(token, "admin")
    if not name:
        raise UserError("Choose a user.")
    set_password(name, password)
    gr.Info(f"New password set for {name}; their sessions are signed out.")
    return ""


def fill_quietly(token: str | None):
    """The table and the name list for admins (on sign-in and when the tab opens); nothing at
    all for anybody else, who does not see them."""
    try:
        require(token, "admin")
    except UserError:
        return gr.skip(), gr.skip()
    table = users_frame()
    return table, gr.update(choices=table["name"].tolist(), value=None)


def _password(label: str, elem_id: str | None = None) -> gr.Textbox:
    return gr.Textbox(label=label, type="password", max_lines=1, elem_id=elem_id)


def create_users_tab(page: Page) -> dict:
    token = page.token
    locked = gr.Markdown("🔒 Sign in to change your password; admins manage users here.",
                         elem_classes=["emo-locked"])
    with gr.Column(visible=False) as own:
        with gr.Accordion("My password", open=True):
            with gr.Row(equal_height=True):
                current = _password("Current password")
                new = _password("New password (8+ characters)")
                again = _password("New password again")
                change = gr.Button("Change", variant="primary", scale=0, min_width=110)
    with gr.Column(visible=False, elem_id="users-panel") as admin:
        table = gr.Dataframe(headers=USER_COLUMNS, label="Users", interactive=False)
        with gr.Accordion("Add a user", open=True):
            with gr.Row(equal_height=True):
                name = gr.Textbox(label="User name", max_lines=1, elem_id="users-new-name")
                role = gr.Dropdown(list(ROLES), value="annotator", label="Role",
                                   elem_id="users-new-role")
                first = _password("First password (8+ characters)", "users-new-password")
                create = gr.Button("Add", variant="primary", scale=0, min_width=110,
                                   elem_id="users-add")
        with gr.Accordion("Change a user", open=True):
            with gr.Row(equal_height=True):
                who = gr.Dropdown([], label="User", allow_custom_value=True)
                new_role = gr.Dropdown(list(ROLES), value="annotator", label="Role")
                set_role = gr.Button("Set role", scale=0, min_width=110)
                reset = _password("New password")
                set_password = gr.Button("Set password", scale=0, min_width=120)

    change.click(change_own_password, inputs=[token, current, new, again],
                 outputs=[token, current, new, again], api_name="change_password")
    create.click(add, inputs=[token, name, role, first], outputs=[table, who, name, first],
                 api_name="add_user")
    set_role.click(change_role, inputs=[token, who, new_role], outputs=table,
                   api_name="set_role")
    set_password.click(reset_password, inputs=[token, who, reset], outputs=reset,
                       api_name="reset_password")
    return {"gates": [(locked, "viewer", "locked"), (own, "viewer", "content"),
                      (admin, "admin", "content")],
            "on_access": (fill_quietly, [table, who])}
