"""`python app.py serve [--host H] [--port P] [--model DIR_OR_ID] [--share]`: start the web app.

With no arguments (and no EMO_LLAMA_MODEL) it serves the embedded defaults on
http://127.0.0.1:7860: a SQLite store under ./data and the prior-only engine. On a Hugging Face
Space the Dockerfile passes --host 0.0.0.0 --port 7860.
"""
from __future__ import annotations

import argparse
import os


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
    from webapp.app import launch

    # An explicit --model wins over the version the registry last published.
    launch(host=args.host, port=args.port, share=args.share, serve_published=not args.model)
    return 0
