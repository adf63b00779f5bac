"""The `generate` command: Gemini instruction data for a dataset (resumable, see annotation/gemini/).

    GEMINI_API_KEY=... python app.py generate --dataset rafdb --limit 50
    GEMINI_BASE_URL=http://127.0.0.1:8765 python app.py generate --dataset rafdb --workers 8 --json
    python app.py generate --dataset rafdb --retry-rejected     # ask again for rejected answers

Running it again continues where the last run stopped: samples that already have a suggestion
for (Gemini model, prompt version) are skipped, so nothing is paid for twice.

Whole datasets through Gemini's Batch API (half the price, answers within 24 h; see
annotation/gemini/batch.py):

    python app.py generate --dataset affectnet --batch            # submit, poll, ingest
    python app.py generate --dataset affectnet --batch --no-wait  # submit and return
    python app.py generate --dataset affectnet --batch-status     # poll once; ingest when done
    python app.py generate --dataset affectnet --batch-cancel

A dataset has at most one open batch per (model, prompt version): `--batch` again re-attaches
to it (never submits it twice). Requests the batch could not answer store nothing, so the next
run, online or --batch, asks for them again.
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
    batch = p.add_argument_group("Batch API (whole datasets at half the price)")
    modes = batch.add_mutually_exclusive_group()
    modes.add_argument("--batch", action="store_true",
                       help="submit one Batch API job (or re-attach to the open one) and wait")
    modes.add_argument("--batch-status", action="store_true",
                       help="poll the open batch once; ingest its answers when it is done")
    modes.add_argument("--batch-cancel", action="store_true", help="cancel the open batch")
    batch.add_argument("--no-wait", action="store_true",
                       help="with --batch: return after submitting (poll with --batch-status)")
    batch.add_argument("--poll", type=positive_float, default=30.0, dest="poll_s",
                       help="with --batch: seconds between status checks (default 30)")
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


def format_batch(view: dict) -> str:
    """A batch job's view as a few lines of text."""
    if view.get("batch") is None and view.get("state") is None:
        return (f"{view['dataset']}: nothing to submit (already done {view['skipped']}, "
                f"without a label {view['unlabelled']})")
    lines = [f"{view['dataset']} batch {view['batch'] or view['display_name']} with "
             f"{view['source']} ({view['prompt_version']}): {view['state']}"
             + (" (re-attached)" if view.get("attached") else ""),
             f"  requests {view['requests']}"]
    if view["ingested"]:
        lines[1] += (f": ok {view['ok']} · rejected {view['rejected']} · failed "
                     f"{view['failed']}")
        if view["rejected_by_reason"]:
            lines.append("  rejected: " + ", ".join(f"{r} {n}" for r, n
                                                    in view["rejected_by_reason"].items()))
        if view["failed_by_reason"]:
            lines.append("  failed: " + ", ".join(f"{r} {n}" for r, n
                                                  in view["failed_by_reason"].items())
                         + " (nothing stored: the next run asks again, online or --batch)")
        cost = view["estimated_cost_usd"]
        lines.append(f"  tokens {view['input_tokens']:,} in / {view['output_tokens']:,} out, "
                     + (f"estimated cost ${cost:.4f} at batch prices (ESTIMATE, not a bill)"
                        if cost is not None else view["cost_note"]))
    else:
        estimate = view.get("estimated_input_cost_usd")
        if estimate is not None:
            lines[1] += f", input about ${estimate:.4f} at batch prices (answers extra)"
        lines.append("  not done yet: `--batch-status` polls it, `--batch` waits for it")
    return "\n".join(lines)


def batch_command(args: argparse.Namespace) -> int:
    from annotation.gemini import batch as gemini_batch

    if args.batch_status:
        view = gemini_batch.batch_status(args.dataset, args.model, timeout_s=args.timeout_s)
    elif args.batch_cancel:
        view = gemini_batch.cancel_batch(args.dataset, args.model, timeout_s=args.timeout_s)
    else:
        def progress(state: str, view: dict) -> None:
            if not args.quiet and not args.json:
                print(f"batch {view['batch'] or view['display_name']}: {state}",
                      file=sys.stderr, flush=True)

        try:
            view = gemini_batch.run_batch(
                args.dataset, limit=args.limit, model=args.model,
                retry_rejected=args.retry_rejected, frames=args.frames,
                wait=not args.no_wait, poll_s=args.poll_s, timeout_s=args.timeout_s,
                progress=progress)
        except KeyboardInterrupt:
            print("interrupted: the batch goes on at Google; run the same command (or "
                  "--batch-status) to pick it up", file=sys.stderr)
            return 130
    print(json.dumps(view, indent=2) if args.json else format_batch(view))
    # Non-zero when requests failed, so scripts notice they should run again.
    return 1 if view.get("failed") else 0


def generate_command(args: argparse.Namespace) -> int:
    if args.batch or args.batch_status or args.batch_cancel:
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
        return batch_command(args)
    if args.no_wait:
        from core.errors import UserError

        raise UserError("--no-wait goes with --batch")
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
