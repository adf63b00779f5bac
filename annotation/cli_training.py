"""`python app.py finetune ...`, `python app.py evaluate ...`, `python app.py versions ...`."""
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
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--replay-ratio", type=float)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--gate-margin", type=float, help="allowed UAR drop against the parent (default 0)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="name of the new version (default v<job id>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=finetune_command)

    p = subparsers.add_parser("evaluate", help="UAR/WAR, per-class recall and confusion matrix")
    p.add_argument("--version", required=True, help="a model version name, or a checkpoint folder")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=evaluate_command)

    p = subparsers.add_parser("versions", help="list, publish or roll back model versions")
    p.add_argument("action", choices=["list", "publish", "rollback", "register"])
    p.add_argument("name", nargs="?", help="version name (register: a checkpoint folder)")
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=versions_command)


OPTION_FLAGS = ("epochs", "lr", "batch_size", "grad_accum", "max_steps", "replay_ratio",
                "checkpoint_every", "gate_margin", "gradient_checkpointing", "seed", "name")


def finetune_command(args: argparse.Namespace) -> int:
    from annotation import finetune
    from core.errors import UserError
    from db.session import init_db

    init_db()
    if args.job_id is not None:  # the runner's subprocess
        return finetune.train_job(args.job_id, resume=args.resume_checkpoint)
    if args.resume is not None:
        job_id = finetune.resume_job(args.resume, background=False)
        resume = True
    else:
        if not args.snapshot:
            raise UserError("finetune needs --snapshot (or --resume JOB)")
        options = {k: getattr(args, k) for k in OPTION_FLAGS if getattr(args, k) is not None}
        job_id = finetune.create_job(args.snapshot, args.from_version, options)
        resume = False
    print(f"fine-tune job {job_id}: log {finetune.job_dir(job_id) / 'events.jsonl'}", file=sys.stderr)
    code = finetune.train_job(job_id, resume=resume)
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
    result = evaluate_version(args.version, args.dataset, args.split, num_frames=args.frames)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['version']} on {args.dataset}/{args.split}: UAR {result['uar']:.4f}  WAR {result['war']:.4f}"
          f"  (n={result['n']})")
    for label, recall in result["per_class_recall"].items():
        print(f"  {label:15s} {'-' if recall is None else f'{recall:.3f}'}")
    if result["rouge_l"] is not None:
        print(f"ROUGE-L vs corrected explanations: {result['rouge_l']:.3f} (n={result['rouge_l_n']})")
    print(f"confusion matrix: {result['confusion_png']}")
    return 0


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
