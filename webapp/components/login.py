"""The sign-in strip at the top of the page and the session token it keeps in the browser.

The token lives in gr.BrowserState (the browser's localStorage, encrypted), so a reload keeps
the sign-in. It is only a signed claim "this is user N": every protected handler passes it to
`webapp.auth.require`, which reads the role from the database. API clients get one the same way:

    token = Client(url).predict("ada", "s3cret-pass", api_name="/login")
"""
from __future__ import annotations

import hashlib
import html
import hmac

import gradio as gr

from webapp.auth import Identity, login, server_secret
from webapp.components.common import handle_errors

STORAGE_KEY = "emo_studio_session"


def browser_state() -> gr.BrowserState:
    # A fixed key and a secret derived from the server's keep the stored session readable
    # across server restarts.
    secret = hmac.new(server_secret(), b"browser-state", hashlib.sha256).hexdigest()
    return gr.BrowserState(None, storage_key=STORAGE_KEY, secret=secret)


@handle_errors
def sign_in(name: str, password: str) -> str:
    """/login: user name + password -> a session token."""
    return login(name, password)


def identity_text(who: Identity | None, problem: str | None = None) -> str:
    """The line beside the sign-in form: who is signed in, or why nobody is."""
    if problem:
        return f"⚠️ {html.escape(problem)}"
    if who is None:
        return "Not signed in: the Image, Video and Compare tabs are open to everyone."
    return f"Signed in as **{html.escape(who.name)}** · role **{who.role}**"


def create_login_bar(token: gr.BrowserState) -> dict:
    with gr.Row(equal_height=True, elem_id="login-bar"):
        status = gr.Markdown(elem_id="login-status")
        with gr.Accordion("Sign in (annotators, reviewers, admins)", open=False,
                          elem_id="login-box") as box:
            with gr.Row(equal_height=True):
                name = gr.Textbox(label="User name", max_lines=1, elem_id="login-name")
                password = gr.Textbox(label="Password", type="password", max_lines=1,
                                      elem_id="login-password")
                submit = gr.Button("Sign in", variant="primary", elem_id="login-submit",
                                   scale=0, min_width=110)
        sign_out = gr.Button("Sign out", elem_id="logout", scale=0, min_width=110,
                             visible=False)
    submit.click(sign_in, inputs=[name, password], outputs=token, api_name="login") \
        .then(lambda: "", outputs=password, api_visibility="private")
    password.submit(sign_in, inputs=[name, password], outputs=token, api_visibility="private") \
        .then(lambda: "", outputs=password, api_visibility="private")
    sign_out.click(lambda: None, outputs=token, api_visibility="private")
    # Signed out: the form shows; signed in (any role): the sign-out button does.
    return {"status": status, "gates": [(box, "viewer", "locked"), (sign_out, "viewer", "content")]}
