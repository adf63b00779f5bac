"""The `generate` command: Gemini instruction data for a dataset (resumable, see annotation/gemini.py).

    GEMINI_API_KEY=... python app.py generate --dataset rafdb --limit 50
    GEMINI_BASE_URL=http://127.0.0.1:8765 python app.py generate --dataset rafdb --workers 8 --json
    python app.py generate --dataset rafdb --retry-rejected     # ask again for rejected answers

Running it again continues where the last run stopped: samples that already have a suggestion
for (Gemini model, prompt version) are skipped, so nothing is paid for twice.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive number")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from annotation.gemini import DEFAULT_MODEL, DEFAULT_RPM, DEFAULT_TPM

    p = subparsers.add_parser("generate", help="Gemini labels + explanations for a dataset "
                                               "(resumable; GEMINI_API_KEY)")
    p.add_argument("--dataset", required=True, help="an imported dataset's name")
    p.add_argument("--limit", type=positive_int,
                   help="at most N samples this run (default: all still to do)")
    p.add_argument("--gemini-model", dest="model",
                   help=f"model id (default: GEMINI_MODEL or {DEFAULT_MODEL})")
    p.add_argument("--workers", type=positive_int, default=4, help="requests in flight (default 4)")
    p.add_argument("--rpm", type=positive_int, default=DEFAULT_RPM,
                   help=f"client-side requests per minute (default {DEFAULT_RPM})")
    p.add_argument("--tpm", type=positive_int, default=DEFAULT_TPM,
                   help=f"client-side tokens per minute (default {DEFAULT_TPM})")
    p.add_argument("--frames", type=positive_int, default=1,
                   help="video samples: frames sent (default 1, the centre frame)")
    p.add_argument("--timeout", type=positive_float, default=120.0, dest="timeout_s",
                   help="seconds to wait for one answer before retrying (default 120)")
    p.add_argument("--retry-rejected", action="store_true",
                   help="ask again for samples whose stored answer was rejected")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=generate_command)


def format_summary(summary: dict) -> str:
    """The job summary as a few lines of text."""
    lines = [f"{summary['dataset']} with {summary['source']} ({summary['prompt_version']}): "
             f"ok {summary['ok']} · rejected {summary['rejected']} · failed to call "
             f"{summary['failed']} · already done {summary['skipped']}"
             + (f" · without a label {summary['unlabelled']}" if summary["unlabelled"] else "")]
    if summary["rejected_by_reason"]:
        lines.append("  rejected: " + ", ".join(f"{reason} {count}" for reason, count
                                                in summary["rejected_by_reason"].items()))
    if summary["failed_by_reason"]:
        # Failed calls store nothing, so the same command asks for them again.
        lines.append("  failed: " + ", ".join(f"{reason} {count}" for reason, count
                                              in summary["failed_by_reason"].items())
                     + " (run again to retry them)")
    cost = summary["estimated_cost_usd"]
    lines.append(f"  requests {summary['requests']}, tokens {summary['input_tokens']:,} in / "
                 f"{summary['output_tokens']:,} out, "
                 + (f"estimated cost ${cost:.4f} (ESTIMATE from list prices, not a bill)"
                    if cost is not None else summary["cost_note"]))
    if summary["interrupted"]:
        lines.append("  interrupted: run the same command again to continue")
    return "\n".join(lines)


def generate_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from annotation.gemini import run_generation

    bar = None

    def progress(done: int, total: int, summary: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="sample", desc="gemini", disable=args.quiet,
                       file=sys.stderr)
        bar.n = done
        bar.set_postfix(ok=summary["ok"], rejected=summary["rejected"], failed=summary["failed"],
                        refresh=False)
        bar.refresh()

    for name in ("httpx", "httpx2"):  # an INFO line per request would shred the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with logging_redirect_tqdm():  # our retry/rejection lines print above the bar
            summary = run_generation(args.dataset, limit=args.limit, model=args.model,
                                     workers=args.workers, rpm=args.rpm, tpm=args.tpm,
                                     retry_rejected=args.retry_rejected, frames=args.frames,
                                     timeout_s=args.timeout_s, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    # Non-zero when some calls failed, so scripts notice they should run it again.
    return 1 if summary["failed"] else 0
