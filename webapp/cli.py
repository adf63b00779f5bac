"""`python app.py serve [--host H] [--port P] [--model DIR_OR_ID] [--share]`: start the web app.

With no arguments (and no EMO_LLAMA_MODEL) it serves the embedded defaults on
http://127.0.0.1:7860: a SQLite store under ./data and the prior-only engine. On a Hugging Face
Space the Dockerfile passes --host 0.0.0.0 --port 7860.
"""
from __future__ import annotations

import argparse
import errno
import os
import socket

from core.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="start the Gradio app (the default command)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 for everyone)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                   help="port (default 7860)")
    p.add_argument("--model", metavar="DIR_OR_ID",
                   help="EMO-LLaMA checkpoint folder or hub id (default: EMO_LLAMA_MODEL, else "
                        "prior-only mode)")
    p.add_argument("--quantize", choices=["8bit", "4bit"],
                   help="load the frozen LLM in 8/4 bit through bitsandbytes, for a smaller GPU "
                        "(default: EMO_QUANTIZATION)")
    p.add_argument("--share", action="store_true",
                   help="also open a temporary public gradio.live link")
    p.set_defaults(handler=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    if args.model:
        # The engine reads the environment when it is first created, inside launch().
        os.environ["EMO_LLAMA_MODEL"] = args.model
    if args.quantize:
        os.environ["EMO_QUANTIZATION"] = args.quantize
    # Checked before `import gradio` and the model (seconds to minutes): a taken port or a
    # read-only store is one `error:` line at once, not a traceback after the wait.
    from db.session import check_store_writable

    check_port_free(args.host, args.port)
    check_store_writable()
    from webapp.app import launch

    # An explicit --model wins over the version the registry last published.
    launch(host=args.host, port=args.port, share=args.share, serve_published=not args.model)
    return 0


def port_message(host: str, port: int) -> str:
    return (f"port {port} on {host} is already in use (another copy of the app?): stop that "
            f"process or choose another port with `python app.py serve --port {port + 1}`")


def check_port_free(host: str, port: int) -> None:
    """Refuse to start when the port is taken, before the model spends seconds loading.

    SO_REUSEADDR as uvicorn binds: only a listening socket counts as taken, not connections
    of an earlier run still in TIME_WAIT.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on host {host!r} ({exc.strerror}): use an address of "
                        "this machine, e.g. --host 127.0.0.1 or --host 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except PermissionError:
            raise UserError(f"port {port} needs privileges this user does not have: choose a "
                            "port above 1023 with --port") from None
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise UserError(port_message(host, port)) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"{host} is not an address of this machine: use --host "
                                "127.0.0.1 or --host 0.0.0.0") from None
            raise
