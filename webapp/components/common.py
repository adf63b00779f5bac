"""What every tab shares: the error boundary, the engine adapter, and the concurrency groups.

Nothing here imports torch: the engine and the data store are imported inside functions, so
`import webapp.app` stays light and the UI process only loads the model when it serves.
"""
from __future__ import annotations

import contextlib
import functools
import html
import inspect
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from core.errors import UserError

log = logging.getLogger("webapp")

# Every event that runs the model joins this group, so all tabs together never hold more
# requests than the engine batches at once; other events (DB, Gemini) never wait on it.
MODEL_GROUP = "model"


@dataclass
class Page:
    """What every tab is built with (webapp/app.py TABS): the visitor's session token, the model
    concurrency group's size, the page's model banner and where example files are written."""
    token: Any            # gr.BrowserState holding the signed session token
    concurrency: int      # events that may use the model at once
    banner: Any           # gr.HTML: the "which model answers" strip, re-rendered after a swap
    examples_dir: Path


def _as_gradio_error(exc: BaseException) -> gr.Error:
    """A user's mistake shows its own message; anything else a reference into the server log.

    gr.Error renders its message as HTML, and messages can carry file names or another
    annotator's text, so they are escaped here, once, for every handler.
    """
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, UserError):
        return gr.Error(html.escape(str(exc), quote=False), print_exception=False)
    ref = secrets.token_hex(3)
    log.exception("unexpected error (ref %s)", ref)
    return gr.Error(f"Something went wrong on the server (reference {ref}). The details are in "
                    "the server log; please try again or report the reference.",
                    print_exception=False)


def handle_errors(fn: Callable) -> Callable:
    """Decorate an event handler (plain or generator) so errors reach the user as gr.Error."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise _as_gradio_error(exc) from None
        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _as_gradio_error(exc) from None
    return wrapper


def engine():
    """The process's shared inference engine (created from the environment on first use)."""
    from core.engine import shared_engine

    return shared_engine()


def model_concurrency() -> int:
    """How many model-bound events may run at once: the engine's batch size."""
    return engine().config.max_batch


def explanation_text(result: dict, streamed: str = "") -> str:
    """The final explanation, or, when there is none, the engine's note saying why."""
    text = result.get("explanation") or streamed
    if text:
        return text
    note = result.get("note")
    return f"(No explanation. {note})" if note else ""


def stream_outputs(path: str, render: Callable[[dict, list], tuple], n_outputs: int,
                   **request: Any) -> Iterator[tuple]:
    """Engine events for one file -> tuples of output values, the explanation last.

    On the analysis and on the final result every output is rendered (`render(result, frames)`
    gives the `n_outputs` values before the explanation; `frames` are the engine's own decoded
    frames, so nothing decodes the upload a second time to draw); between them each text piece updates only
    the explanation. Closing this generator (the browser went away) closes the engine stream,
    which frees the request's slot. `request`: keywords for Engine.stream (e.g. aligned=True).
    """
    streamed = ""
    with contextlib.closing(engine().stream(path, **request)) as events:
        for event in events:
            if event["event"] == "text":
                streamed += event["text"]
                yield (*[gr.skip()] * n_outputs, streamed)
            elif event["event"] == "analysis":
                yield (*render(event["result"], event["frames"]), "")
            elif event["event"] == "done":
                yield (*render(event["result"], event["frames"]), explanation_text(event["result"], streamed))


def server_choices(label: str, **kwargs) -> gr.Dropdown:
    """A dropdown whose choices the server fills after sign-in (datasets, snapshots, jobs).

    Any value is accepted on the way in, because API callers name a dataset or job the page
    has not listed for them; the handler (and the workflow behind it) validates it.
    """
    return gr.Dropdown(label=label, choices=kwargs.pop("choices", []), allow_custom_value=True,
                       **kwargs)


def require_file(path: str | None, what: str = "an image") -> str:
    if not path:
        raise UserError(f"Please add {what} first.")
    return path
