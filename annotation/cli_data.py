"""Data commands: import a dataset, annotate from a terminal, export a snapshot, manage users,
back up the store.

    python app.py import --format rafdb /data/RAF-DB/basic --name rafdb
    python app.py annotate next --dataset rafdb --user ana          # claim a record, show it
    python app.py annotate save 17 --user ana --label happiness \
        --explanation "Cheeks raised, lip corners pulled up." --submit --version 0
    python app.py annotate review 5 --user rita --accept --comment "good evidence"
    python app.py annotate progress --dataset rafdb
    python app.py export --dataset rafdb --out exports/
    python app.py users add ana --role annotator          # asks for a password
    python app.py users list
    python app.py backup backups/

Each command upgrades the schema first (the store may be new) and takes `--json`. `annotate`
acts as the named user without a password: whoever runs commands on the server's store is
trusted (the web app is where passwords are checked). A save from a stale `--version` exits 2
and prints the newer text; the text you typed is kept in the record's history.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys

from annotation.formats import FORMATS
from core.errors import UserError
from db.models import ROLES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import", help="import a FER dataset (re-running adds only new files)")
    p.add_argument("path", help="the dataset's folder (a CSV file for --format csv or fer2013)")
    p.add_argument("--format", required=True, choices=list(FORMATS), dest="fmt")
    p.add_argument("--name", help="dataset name (default: the format, or the folder/CSV name)")
    p.add_argument("--fold", type=int, default=1,
                   help="DFEW/MAFW: the fold whose test list becomes split 'test' (default 1)")
    p.add_argument("--label-set", choices=("affectnet8", "basic7"),
                   help="AffectNet: 8 classes with contempt (default) or the basic 7")
    p.add_argument("--min-submitted", type=int,
                   help="annotators wanted per record (default 1; 2+ to measure agreement)")
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="the split of samples whose layout names none (a folder without "
                        "train/ val/ test/ sub-folders, CSV rows without a split); where the "
                        "layout names splits, import only this one")
    p.add_argument("--aligned", action=argparse.BooleanOptionalAction, default=None,
                   help="the images are face crops (detection is skipped); default: on for "
                        "fer2013, ferplus and RAF-DB's aligned/ images, off otherwise")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=import_command)

    _register_annotate(subparsers)

    p = subparsers.add_parser("export", help="snapshot of accepted corrections (JSONL + HF datasets)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", help="folder for snapshots (default: <EMO_DATA_DIR>/exports)")
    p.add_argument("--include-suggestions", action="store_true",
                   help="records without an accepted correction use their best suggestion")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=export_command)

    p = subparsers.add_parser("users", help="annotators and their roles")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of stdin (for scripts)")
    add.add_argument("--json", action="store_true")
    listing = actions.add_parser("list", help="list users")
    listing.add_argument("--json", action="store_true")
    role = actions.add_parser("set-role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    role.add_argument("--json", action="store_true")
    passwd = actions.add_parser("passwd", help="change a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    p.set_defaults(handler=users_command)

    p = subparsers.add_parser("backup", help="online copy of the SQLite store (safe while serving)")
    p.add_argument("out", help="backup file, or an existing folder for a time-stamped file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=backup_command)


def _register_annotate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("annotate", help="the annotation queue from a terminal: next, save, "
                                               "history, review, progress")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("next", help="claim your next record and show it")
    a.add_argument("--dataset", required=True)
    a.add_argument("--user", required=True)
    a = actions.add_parser("save", help="save a draft, submit or discard your correction")
    a.add_argument("sample_id", type=int)
    a.add_argument("--user", required=True)
    a.add_argument("--label")
    a.add_argument("--explanation")
    a.add_argument("--version", type=int, required=True,
                   help="the version you loaded (0 when the record showed no saved correction)")
    state = a.add_mutually_exclusive_group()
    state.add_argument("--submit", dest="status", action="store_const", const="submitted")
    state.add_argument("--discard", dest="status", action="store_const", const="discarded")
    a.set_defaults(status="draft")
    a = actions.add_parser("history", help="every change to a record's corrections")
    a.add_argument("sample_id", type=int)
    a = actions.add_parser("review", help="accept or reject a submitted correction (reviewers)")
    a.add_argument("response_id", nargs="?", type=int,
                   help="the correction to judge; without it, show the next one waiting")
    a.add_argument("--user", required=True)
    a.add_argument("--dataset", help="with no RESPONSE_ID: the dataset to take the next one from")
    decision = a.add_mutually_exclusive_group()
    decision.add_argument("--accept", dest="decision", action="store_const", const="accepted")
    decision.add_argument("--reject", dest="decision", action="store_const", const="rejected")
    a.add_argument("--comment", default="")
    a = actions.add_parser("progress", help="records complete, per annotator, and agreement")
    a.add_argument("--dataset", required=True)
    for action in actions.choices.values():
        action.add_argument("--json", action="store_true")
    p.set_defaults(handler=annotate_command)


def _print(args: argparse.Namespace, payload, text: str) -> None:
    try:
        print(json.dumps(payload, indent=2, ensure_ascii=False) if args.json else text, flush=True)
    except BrokenPipeError:
        # `import ... | head`: the reader has all it wanted. Point stdout at /dev/null so the
        # interpreter's final flush does not print a traceback either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def import_command(args: argparse.Namespace) -> int:
    from annotation.ingest import format_summary, import_dataset
    from db.session import init_db

    init_db()
    summary = import_dataset(args.fmt, args.path, args.name, progress=not (args.quiet or args.json),
                             fold=args.fold, label_set=args.label_set,
                             min_submitted=args.min_submitted, split=args.split,
                             aligned=args.aligned)
    _print(args, summary.to_dict(), format_summary(summary))
    return 0


def _format_record(rec: dict) -> str:
    lines = [f"record #{rec['sample_id']} of {rec['dataset']} ({rec['modality']}, {rec['split']})",
             f"  media:        {rec['media_path']}",
             f"  ground truth: {rec['label'] or '-'}",
             f"  labels:       {', '.join(rec['label_set'])}"]
    for s in rec["suggestions"]:
        lines.append(f"  suggestion [{s['source']}, {s['status']}]: {s['label'] or '-'}: "
                     f"{s['explanation'] or s['reject_reason'] or ''}")
    response = rec["response"]
    if response:
        lines.append(f"  your {response['status']} (version {response['version']}): "
                     f"{response['label'] or '-'}: {response['explanation'] or ''}")
    version = response["version"] if response else 0
    lines.append(f"  save with: python app.py annotate save {rec['sample_id']} --user USER "
                 f"--label L --explanation TEXT [--submit] --version {version}")
    return "\n".join(lines)


def _format_change(h: dict) -> str:
    after = h["after"] or {}
    text = after.get("explanation") or after.get("comment") or ""
    return (f"{h['at'][:19]}  {h['user']:<12} {h['action']:<10} v{after.get('version', '-')}  "
            f"{after.get('label') or ''}  {text}").rstrip()


def annotate_command(args: argparse.Namespace) -> int:
    from annotation import workflow
    from db.session import init_db

    init_db()
    if args.action == "next":
        rec = workflow.next_record(args.user, args.dataset)
        _print(args, rec, _format_record(rec) if rec else
               f"nothing left for {args.user} in {args.dataset}")
    elif args.action == "save":
        try:
            saved = workflow.save(args.user, args.sample_id, args.label, args.explanation,
                                  args.status, args.version)
        except workflow.ConflictError as exc:
            # The one-line error for scripts, and the newer text so nobody retypes blindly.
            print(f"error: {exc}", file=sys.stderr)
            now = exc.current
            _print(args, {"conflict": now},
                   f"newer version {now.get('version')} by {now.get('user')} "
                   f"({now.get('status')}): {now.get('label') or '-'}: {now.get('explanation') or ''}")
            return 2
        _print(args, saved, f"record #{saved['sample_id']}: {saved['status']} as version "
                            f"{saved['version']} (correction #{saved['response_id']})")
    elif args.action == "history":
        rows = workflow.history(args.sample_id)
        _print(args, rows, "\n".join(_format_change(h) for h in rows)
               or f"record #{args.sample_id} has no history yet")
    elif args.action == "review":
        if args.response_id is None:
            if args.dataset is None:
                raise UserError("give a RESPONSE_ID to judge, or --dataset to see the next one")
            item = workflow.next_review(args.user, args.dataset)
            _print(args, item, "nothing waiting for review" if item is None else
                   f"correction #{item['response_id']} by {item['user']} (version {item['version']}) "
                   f"of record #{item['sample_id']}\n  media: {item['media_path']}\n"
                   f"  ground truth: {item['ground_truth'] or '-'}\n"
                   f"  {item['label']}: {item['explanation']}\n"
                   f"  judge with: python app.py annotate review {item['response_id']} "
                   f"--user {args.user} --accept|--reject [--comment TEXT]")
            return 0
        if args.decision is None:
            raise UserError("say --accept or --reject")
        done = workflow.review(args.user, args.response_id, args.decision, args.comment)
        _print(args, done, f"correction #{done['response_id']} {done['decision']} by {done['reviewer']}")
    elif args.action == "progress":
        stats = workflow.progress(args.dataset)
        stats["agreement"] = workflow.agreement(args.dataset)
        lines = [f"{stats['dataset']}: {stats['complete']}/{stats['total']} records complete "
                 f"({stats['min_submitted']} submission(s) each); {stats['submitted']} submitted, "
                 f"{stats['drafts']} drafts, {stats['accepted']} accepted, {stats['rejected']} rejected"]
        for name, counts in stats["per_user"].items():
            lines.append(f"  {name:<16} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        kappa = stats["agreement"]["fleiss_kappa"]
        if kappa is not None:
            lines.append(f"  agreement: Fleiss' kappa {kappa:.3f} over {stats['agreement']['items']} "
                         "shared records")
        _print(args, stats, "\n".join(lines))
    return 0


def export_command(args: argparse.Namespace) -> int:
    from annotation.export import export_dataset
    from db.session import init_db

    init_db()
    snap = export_dataset(args.dataset, args.out, include_suggestions=args.include_suggestions)
    counts = ", ".join(f"{k} {v}" for k, v in snap.counts.items())
    state = "unchanged since" if snap.reused else "written as"
    where = f"  {snap.path}"
    if snap.copied_from:   # nothing new to write: the files asked for are a copy of the snapshot
        where += f"\n  (copied from {snap.copied_from})"
    elif snap.reused:
        where += "\n  (nothing new written: the existing snapshot)"
    _print(args, snap.to_dict(),
           f"{snap.dataset}: {snap.n_samples} samples ({counts}) {state} snapshot #{snap.id}\n"
           f"{where}\n  hash {snap.content_hash}")
    return 0


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise UserError("no terminal to ask for a password: pipe it in with --password-stdin")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise UserError("the passwords differ")
    return first


def users_command(args: argparse.Namespace) -> int:
    from annotation import users
    from db.session import init_db

    init_db()
    if args.action == "add":
        user = users.add_user(args.name, args.role, _password(args))
        _print(args, user, f"added {user['name']} ({user['role']})")
    elif args.action == "list":
        rows = users.list_users()
        _print(args, rows, "\n".join(f"{u['name']:<24} {u['role']}" for u in rows) or "no users yet")
    elif args.action == "set-role":
        user = users.set_role(args.name, args.role)
        _print(args, user, f"{user['name']} is now a {user['role']}")
    elif args.action == "passwd":
        users.set_password(args.name, _password(args))
        print(f"password of {args.name} changed")
    return 0


def backup_command(args: argparse.Namespace) -> int:
    from db.session import backup, init_db

    init_db()
    path = backup(args.out)
    _print(args, {"path": str(path), "bytes": path.stat().st_size},
           f"backup written to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0
