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
import os

import gradio as gr

from webapp.auth import AuthError, Identity, identify, issue_token, login, server_secret
from webapp.components.common import handle_errors

STORAGE_KEY = "emo_studio_session"


def hf_oauth_enabled() -> bool:
    """True on a Space (SYSTEM=spaces, as Gradio checks) whose README front matter says
    `hf_oauth: true` (Hugging Face then sets OAUTH_CLIENT_ID). Elsewhere Gradio would only mock
    the button with the machine's own HF token, so it is not shown."""
    return (os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("SPACE_ID"))
            and bool(os.environ.get("OAUTH_CLIENT_ID")))


@handle_errors
def hf_session(token: str | None, profile: gr.OAuthProfile | None):
    """On page load: a Hugging Face sign-in becomes a session of its "<username>@hf" user.

    The role comes from the users table (EMO_HF_ROLE for a new account, default viewer; admin
    for the usernames in EMO_HF_ADMINS), so the same server-side checks apply as for passwords.
    """
    from annotation.users import HF_SUFFIX, hf_account

    if profile is None:
        return gr.skip()
    try:
        who = identify(token)
    except AuthError:
        who = None
    if who is not None and who.name == profile.username + HF_SUFFIX:
        return gr.skip()
    admins = tuple(n.strip() for n in os.environ.get("EMO_HF_ADMINS", "").split(",") if n.strip())
    user = hf_account(profile.username, os.environ.get("EMO_HF_ROLE", "viewer"), admins)
    return issue_token(user["id"], user["name"], None)


def browser_state() -> gr.BrowserState:
    # A fixed key and a secret derived from the server's keep the stored session readable
    # across server restarts.
    secret = hmac.new(server_secret(), b"browser-state", hashlib.sha256).hexdigest()
    return gr.BrowserState(None, storage_key=STORAGE_KEY, secret=secret)


LOGIN_GROUP = "login"
# Sign-ins have their own slots: password hashing (argon2 runs outside the GIL, in Gradio's
# worker threads, never on the event loop) must not take the slots of the store and polling
# events, and a flood of refused attempts (answered at once) cannot hold those either.
LOGIN_CONCURRENCY = 2


@handle_errors
def sign_in(name: str, password: str, request: gr.Request = None) -> str:
    """/login: user name + password -> a session token."""
    from webapp.limits import client_key

    return login(name, password, client=client_key(request))


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
        if hf_oauth_enabled():
            gr.LoginButton("Sign in with Hugging Face", scale=0, min_width=220)
    slots = dict(concurrency_id=LOGIN_GROUP, concurrency_limit=LOGIN_CONCURRENCY)
    submit.click(sign_in, inputs=[name, password], outputs=token, api_name="login", **slots) \
        .then(lambda: "", outputs=password, api_visibility="private")
    password.submit(sign_in, inputs=[name, password], outputs=token, api_visibility="private",
                    **slots) \
        .then(lambda: "", outputs=password, api_visibility="private")
    sign_out.click(lambda: None, outputs=token, api_visibility="private")
    # Signed out: the form shows; signed in (any role): the sign-out button does.
    return {"status": status, "gates": [(box, "viewer", "locked"), (sign_out, "viewer", "content")]}
