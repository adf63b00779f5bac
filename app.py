"""EMO-LLaMA Studio: one entry point for the web app and every command-line job.

    python app.py                       # start the Gradio app (same as `serve`)
    python app.py faces photo.jpg --json
    python app.py --help                # all commands

Each command lives in the package that owns it; this file only collects them. Command modules
keep heavy imports (torch, gradio) inside their handlers so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from core.errors import UserError

# Modules that define `register(subparsers)`; each sets `handler` on the parsers it adds.
COMMAND_MODULES = [
    "webapp.cli",          # serve
    "core.cli",            # faces
    "core.model.cli",      # build-model, predict
    "annotation.cli_data",  # import, annotate, export, users, backup
    "annotation.cli_gemini",  # generate
    "annotation.cli_training",  # finetune, evaluate
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.handler(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
