"""`python app.py finetune ...`, `python app.py evaluate ...`, `python app.py table ...`,
`python app.py versions ...`."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="incremental LoRA fine-tune on an export snapshot")
    p.add_argument("--snapshot", help="export snapshot id, folder or content hash")
    p.add_argument("--from-version", help="start from this version's adapter (default: the serving one)")
    p.add_argument("--resume", type=int, metavar="JOB", help="continue a killed job from its checkpoint")
    p.add_argument("--job-id", type=int, help=argparse.SUPPRESS)             # set by the job runner
    p.add_argument("--resume-checkpoint", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, help="default 2")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=int, help="samples per micro-batch and process (default 4)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-steps", type=int, help="optimizer steps, instead of --epochs")
    p.add_argument("--scheduler", help="a transformers LR schedule name (default cosine)")
    p.add_argument("--warmup-ratio", type=float, help="default 0.05")
    p.add_argument("--replay-ratio", type=float,
                   help="earlier training samples replayed per new sample, each epoch (default 0.2)")
    p.add_argument("--checkpoint-every", type=int, help="optimizer steps (default 50)")
    p.add_argument("--frames", type=int, dest="num_frames",
                   help="frames per video (default: the model's config.json num_frames)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU (default)")
    p.add_argument("--eval-split", choices=["train", "val", "test"], help="split the gate measures (test)")
    p.add_argument("--gate-margin", type=float, help="allowed UAR drop against the parent (default 0)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--num-workers", type=int, help="processes preparing samples ahead (default 0)")
    p.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                   help="prepare every sample and run the vision tower every epoch")
    p.add_argument("--name", help="name of the new version (default v<job id>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=finetune_command)

    p = subparsers.add_parser("evaluate", help="UAR/WAR, per-class recall and confusion matrix")
    p.add_argument("--version", required=True,
                   help="prior-only (the embedded default: no checkpoint), a model version name, "
                        "or a checkpoint folder")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per video (default: the model's config.json num_frames)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=evaluate_command)

    p = subparsers.add_parser("table", help="versions side by side: UAR/WAR per dataset, as "
                                            "papers print them")
    p.add_argument("--versions", required=True,
                   help="comma-separated: prior-only, version names, checkpoint folders, zero-shot:ID")
    p.add_argument("--dataset", required=True, help="comma-separated dataset names")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--frames", type=int, default=None,
                   help="frames per video (default: each model's config.json num_frames)")
    p.add_argument("--out", help="folder for table.md, table.png, table.json "
                                 "(default <data dir>/reports/tables/<time>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=table_command)

    p = subparsers.add_parser("versions", help="list, publish or roll back model versions")
    p.add_argument("action", choices=["list", "publish", "rollback", "register"])
    p.add_argument("name", nargs="?", help="version name (register: a checkpoint folder)")
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=versions_command)


OPTION_FLAGS = ("epochs", "lr", "batch_size", "grad_accum", "max_steps", "scheduler", "warmup_ratio",
                "replay_ratio", "checkpoint_every", "num_frames", "precision", "eval_split", "gate_margin",
                "gradient_checkpointing", "seed", "name", "num_workers", "feature_cache")


def finetune_command(args: argparse.Namespace) -> int:
    """Create (or requeue) the job, then train it in this process. Under `accelerate launch`
    every rank runs this: the main one does the bookkeeping and tells the others the job id."""
    import os

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from annotation import finetune
    from annotation.train import train_job
    from core.errors import UserError
    from db.session import init_db

    if args.job_id is not None:  # the runner's subprocess
        init_db()
        return train_job(args.job_id, resume=args.resume_checkpoint)
    if args.resume is None and not args.snapshot:
        raise UserError("finetune needs --snapshot (or --resume JOB)")
    import torch

    ranks = PartialState(cpu=not torch.cuda.is_available())  # CPU ranks (torchrun, tests) use gloo
    outcome: list = [None]
    if ranks.is_main_process:
        try:
            init_db()
            if args.resume is not None:
                outcome[0] = ("ok", finetune.resume_job(args.resume, background=False))
            else:
                options = {k: getattr(args, k) for k in OPTION_FLAGS if getattr(args, k) is not None}
                outcome[0] = ("ok", finetune.create_job(args.snapshot, args.from_version, options,
                                                        pid=os.getpid()))
        except UserError as exc:
            outcome[0] = ("error", str(exc))
    if ranks.num_processes > 1:
        broadcast_object_list(outcome)  # the other ranks must not wait forever on a bad argument
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    job_id = value
    if ranks.is_main_process:
        print(f"fine-tune job {job_id}: events in {finetune.job_dir(job_id) / 'events.jsonl'}", file=sys.stderr)
    code = train_job(job_id, resume=args.resume is not None)
    if not ranks.is_main_process:
        return code
    status = finetune.job_status(job_id)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        print(f"job {job_id}: {status['status']}" + (f", version {status['version']}"
              f" ({'published' if status['published'] else 'not published'})" if status["version"] else ""))
    return code


def evaluate_command(args: argparse.Namespace) -> int:
    from annotation.evaluate import evaluate_version
    from db.session import init_db

    init_db()
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # stderr, so that --json output stays one clean document
            from tqdm import tqdm

            bar = tqdm(total=total, desc=f"evaluate {args.version}", unit="sample", file=sys.stderr,
                       mininterval=0.5, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        result = evaluate_version(args.version, args.dataset, args.split, num_frames=args.frames,
                                  progress=None if args.no_progress else progress)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['version']} on {args.dataset}/{args.split}: UAR {result['uar']:.4f}  WAR {result['war']:.4f}"
          f"  (n={result['n']})")
    if result.get("no_face"):
        how = ("no label: counted as misses" if result.get("unanswered")
               else "the model answered from the whole frame")
        print(f"no face found in {result['no_face']} of {result['n']} samples ({how})")
    for label, recall in result["per_class_recall"].items():
        print(f"  {label:15s} {'-' if recall is None else f'{recall:.3f}'}")
    labels = result["labels"]
    width = max(len(x) for x in labels)
    print("confusion (rows: true, columns: predicted" + (", last: no face)" if result.get("unanswered") else ")"))
    for label, row in zip(labels, result["confusion"]):
        extra = f" {result['unanswered_by_class'][label]:5d}" if result.get("unanswered") else ""
        print(f"  {label:{width}s} " + " ".join(f"{v:5d}" for v in row) + extra)
    if result["rouge_l"] is not None:
        print(f"ROUGE-L vs corrected explanations: {result['rouge_l']:.3f} (n={result['rouge_l_n']})")
    print(f"confusion matrix: {result['confusion_png']}")
    if result.get("ece") is not None:
        print(f"calibration: ECE {result['ece']:.4f} at label temperature T={result['temperature']:.3g} "
              f"(ECE {result['ece_before_temperature']:.4f} at T=1); T {result['temperature_note']}"
              + ("; written to the checkpoint's config.json" if result.get("temperature_saved") else ""))
    if result.get("reliability_png"):
        print(f"reliability diagram: {result['reliability_png']}")
    if result.get("skipped"):
        print(f"skipped: {len(result['skipped'])} (unreadable or off-label; in --json)")
    return 0


def table_command(args: argparse.Namespace) -> int:
    from annotation.table import table_command as run

    return run(args)


def versions_command(args: argparse.Namespace) -> int:
    from annotation import versions
    from core.errors import UserError
    from db.session import init_db

    init_db()
    if args.action != "list" and not args.name:
        raise UserError(f"versions {args.action} needs a name")
    if args.action == "publish":
        result = versions.publish(args.name, margin=args.margin)
    elif args.action == "rollback":
        result = versions.rollback(args.name)
    elif args.action == "register":
        result = versions.ensure_registered(args.name)
    else:
        result = versions.list_versions()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif args.action == "list":
        for v in result:
            flags = ("serving " if v["is_serving"] else "") + ("published" if v["published"] else "")
            uars = ", ".join(f"{k} UAR {m.get('uar', 0):.3f}" for k, m in v["metrics"].items())
            print(f"{v['name']:12s} parent {v['parent'] or '-':10s} {flags:18s} {uars}")
    else:
        print(f"{result['name']}: {'serving' if result['is_serving'] else 'registered'} ({result['folder']})")
    return 0
