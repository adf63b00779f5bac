"""Data commands: import a dataset, export a snapshot, manage users, back up the store.

    python app.py import --format rafdb /data/RAF-DB/basic --name rafdb
    python app.py export --dataset rafdb --out exports/
    python app.py users add ana --role annotator          # asks for a password
    python app.py users list
    python app.py backup backups/

Each command upgrades the schema first (the store may be new) and takes `--json`.
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys

from core.errors import UserError

FORMATS = ("rafdb", "affectnet", "ferplus", "dfew", "ferv39k", "mafw", "folder", "csv")
ROLES = ("viewer", "annotator", "reviewer", "admin")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import", help="import a FER dataset (re-running adds only new files)")
    p.add_argument("path", help="the dataset's folder (a CSV file for --format csv)")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--name", help="dataset name (default: the format, or the folder/CSV name)")
    p.add_argument("--fold", type=int, default=1,
                   help="DFEW/MAFW: the fold whose test list becomes split 'test' (default 1)")
    p.add_argument("--label-set", choices=("affectnet8", "basic7"),
                   help="AffectNet: 8 classes with contempt (default) or the basic 7")
    p.add_argument("--min-submitted", type=int,
                   help="annotators wanted per record (default 1; 2+ to measure agreement)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=import_command)

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


def _print(args: argparse.Namespace, payload, text: str) -> None:
    print(json.dumps(payload, indent=2, ensure_ascii=False) if args.json else text)


def import_command(args: argparse.Namespace) -> int:
    from annotation.importers import format_summary, import_dataset
    from db.session import init_db

    init_db()
    summary = import_dataset(args.fmt, args.path, args.name, progress=not (args.quiet or args.json),
                             fold=args.fold, label_set=args.label_set,
                             min_submitted=args.min_submitted)
    _print(args, summary.to_dict(), format_summary(summary))
    return 0


def export_command(args: argparse.Namespace) -> int:
    from annotation.export import export_dataset
    from db.session import init_db

    init_db()
    snap = export_dataset(args.dataset, args.out, include_suggestions=args.include_suggestions)
    counts = ", ".join(f"{k} {v}" for k, v in snap.counts.items())
    state = "unchanged since" if snap.reused else "written as"
    _print(args, snap.to_dict(),
           f"{snap.dataset}: {snap.n_samples} samples ({counts}) {state} snapshot #{snap.id}\n"
           f"  {snap.path}\n  hash {snap.content_hash}")
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
