"""Annotators and their roles, with argon2 password hashes; the web app's login checks here.

    python app.py users add ana --role annotator          # asks for the password twice
    echo 's3cret-pass' | python app.py users add ana --role annotator --password-stdin
    python app.py users list --json

    from annotation.users import add_user, authenticate
    user = authenticate("ana", "s3cret-pass")             # a User (detached) or None

Roles, least to most: viewer (reads), annotator (corrects), reviewer (accepts/rejects),
admin (imports, exports, fine-tunes, manages users).
"""
from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from core.errors import UserError
from db.models import ROLES, User
from db.session import session_scope

MIN_PASSWORD = 8
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,79}")
_hasher = PasswordHasher()
# Verifying against this when the name is unknown keeps both answers equally slow.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


def hash_password(password: str) -> str:
    if len(password or "") < MIN_PASSWORD:
        raise UserError(f"the password needs at least {MIN_PASSWORD} characters")
    return _hasher.hash(password)


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    return role


def _view(user: User) -> dict:
    return {"id": user.id, "name": user.name, "role": user.role,
            "created_at": user.created_at.isoformat() if user.created_at else None}


def add_user(name: str, role: str, password: str, url: str | None = None) -> dict:
    """Create a user; the name must be new."""
    name = (name or "").strip()
    if not NAME_PATTERN.fullmatch(name):
        raise UserError(f"user name {name!r}: 1-80 letters, digits, '_', '.', '-'")
    row = User(name=name, role=_check_role(role), password_hash=hash_password(password))
    try:
        with session_scope(url) as session:
            session.add(row)
            session.flush()
            return _view(row)
    except IntegrityError:
        raise UserError(f"user {name} already exists") from None


def list_users(url: str | None = None) -> list[dict]:
    with session_scope(url) as session:
        return [_view(u) for u in session.scalars(select(User).order_by(User.name))]


def _get(session, name: str) -> User:
    user = session.scalars(select(User).where(User.name == name)).first()
    if user is None:
        raise UserError(f"no user {name}")
    return user


def set_role(name: str, role: str, url: str | None = None) -> dict:
    """Change a role; the last admin cannot be demoted (a Space has no shell to undo that)."""
    role = _check_role(role)
    with session_scope(url) as session:
        user = _get(session, name)
        if user.role == "admin" and role != "admin":
            admins = session.scalars(select(User).where(User.role == "admin")).all()
            if len(admins) == 1:
                raise UserError(f"{name} is the only admin; make another user admin first")
        user.role = role
        return _view(user)


def set_password(name: str, password: str, url: str | None = None) -> None:
    """Change a password (this also ends the user's web sessions, which carry its fingerprint)."""
    with session_scope(url) as session:
        _get(session, name).password_hash = hash_password(password)


HF_SUFFIX = "@hf"  # local names cannot contain "@", so no HF account can take a local user's
HF_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,75}")


def hf_account(username: str, default_role: str = "viewer", admins: tuple[str, ...] = (),
               url: str | None = None) -> dict:
    """The user of a Hugging Face account ("<username>@hf"), created at its first sign-in.

    It has no password (it signs in through Hugging Face only) and starts as `default_role`,
    or admin when its username is in `admins`; an admin changes roles later in the Users tab.
    """
    if not HF_USERNAME.fullmatch(username or ""):
        raise UserError(f"Hugging Face user name {username!r} is not one this app accepts")
    name = username + HF_SUFFIX
    role = _check_role("admin" if username in admins else default_role)
    for _ in range(2):  # two first sign-ins at once: the loser reads the winner's row
        try:
            with session_scope(url) as session:
                user = session.scalars(select(User).where(User.name == name)).first()
                if user is None:
                    user = User(name=name, role=role, password_hash=None)
                    session.add(user)
                    session.flush()
                return _view(user)
        except IntegrityError:
            continue
    raise UserError(f"could not create the user {name}; please sign in again")


def authenticate(name: str, password: str, url: str | None = None) -> User | None:
    """The user if the password matches, else None (unknown names take as long as wrong passwords)."""
    with session_scope(url) as session:
        user = session.scalars(select(User).where(User.name == (name or "").strip())).first()
        try:
            _hasher.verify(user.password_hash if user and user.password_hash else _DUMMY_HASH,
                           password or "")
        except (VerificationError, InvalidHashError):
            return None
        if user is None or not user.password_hash:
            return None
        if _hasher.check_needs_rehash(user.password_hash):  # parameters were raised since
            user.password_hash = _hasher.hash(password)
        session.flush()
        session.expunge(user)
        return user
