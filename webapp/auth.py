"""Sign-in, signed session tokens and role checks for the web app.

    token = login("ada", "s3cret-pass")   # "eyJ1...Ii.9f2c..." (kept in gr.BrowserState)
    who = require(token, "annotator")     # Identity(user_id=1, name="ada", role="reviewer")

A token is `base64url(JSON payload).signature`, signed by itsdangerous' Signer (HMAC-SHA256, its
key derived from a salt and the server secret: `EMO_SECRET_KEY`, or a random key written once to
`<EMO_DATA_DIR>/secret_key`). The payload holds the user id, name, issue time and a fingerprint
of the password hash, never the role:
every protected handler calls `require()`, which verifies the signature and the expiry and then
reads the *current* role from the users table. So a role change applies at once, a password
change signs out every session of that user, and a client cannot promote itself by editing
what it sends.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass

from itsdangerous import BadData, Signer
from itsdangerous.encoding import base64_decode, base64_encode

from core.errors import UserError
from db.models import ROLE_RANK, User
from db.session import data_dir, session_scope

log = logging.getLogger(__name__)

SESSION_HOURS = float(os.environ.get("EMO_SESSION_HOURS", "12"))
# Guessing passwords is slowed by webapp.limits.LoginGuard's back-off (refused at once, no
# hashing), not by sleeping: a sleep held a shared worker slot and slowed every sign-in.


class AuthError(UserError):
    """Not signed in, an expired/forged token, or a role below what the action needs."""


@dataclass(frozen=True)
class Identity:
    user_id: int
    name: str
    role: str

    def has(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


_secret_lock = threading.Lock()
_secret: bytes | None = None


def server_secret() -> bytes:
    """The HMAC key: EMO_SECRET_KEY, else a random key kept in <data dir>/secret_key (mode 600).

    Keeping the generated key on disk means a restart does not sign everybody out; several
    app processes behind one load balancer need EMO_SECRET_KEY (or the same data dir).
    """
    global _secret
    with _secret_lock:
        if _secret is None:
            env = os.environ.get("EMO_SECRET_KEY")
            if env:
                _secret = env.encode()
            else:
                path = data_dir() / "secret_key"
                if not path.exists():
                    # O_EXCL: two processes starting together must not both write a key.
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        with os.fdopen(fd, "w") as f:
                            f.write(secrets.token_hex(32))
                    except FileExistsError:
                        pass
                _secret = path.read_text().strip().encode()
        return _secret


def reset_secret_cache() -> None:
    """Forget the cached key (tests that switch EMO_DATA_DIR / EMO_SECRET_KEY)."""
    global _secret
    with _secret_lock:
        _secret = None


def _signer() -> Signer:
    return Signer(server_secret(), salt="emo-llama-session", digest_method=hashlib.sha256)


def _password_fingerprint(password_hash: str | None) -> str:
    return hashlib.sha256((password_hash or "").encode()).hexdigest()[:16]


def issue_token(user_id: int, name: str, password_hash: str | None,
                now: float | None = None) -> str:
    payload = {"uid": user_id, "name": name, "iat": int(now if now is not None else time.time()),
               "pwd": _password_fingerprint(password_hash), "nonce": secrets.token_hex(4)}
    body = base64_encode(json.dumps(payload, separators=(",", ":"), sort_keys=True))
    return _signer().sign(body).decode()


def _decode(token: str) -> dict:
    """Signature and expiry check; the claims inside, or AuthError."""
    try:
        payload = json.loads(base64_decode(_signer().unsign(token)))
    except (BadData, TypeError, ValueError):  # a forged signature, not base64, not JSON
        payload = None
    if not isinstance(payload, dict):
        raise AuthError("Your session is not valid; please sign in again.")
    age_s = time.time() - payload.get("iat", 0)
    if age_s > SESSION_HOURS * 3600:
        raise AuthError("Your session has expired; please sign in again.")
    return payload


def _load_user(user_id: int) -> User | None:
    with session_scope() as session:
        user = session.get(User, user_id)
        if user is not None:
            session.expunge(user)
        return user


def identify(token: str | None) -> Identity | None:
    """The signed-in user behind a token, with the role read from the database; None if absent.

    Raises AuthError for a token that is present but forged, expired, or whose user was
    deleted or changed password.
    """
    if not token:
        return None
    claims = _decode(token)
    user = _load_user(int(claims.get("uid", -1)))
    if user is None or user.name != claims.get("name") \
            or _password_fingerprint(user.password_hash) != claims.get("pwd"):
        raise AuthError("Your session is no longer valid; please sign in again.")
    if user.role not in ROLE_RANK:
        raise AuthError(f"Your account has an unknown role {user.role!r}; ask an admin.")
    return Identity(user_id=user.id, name=user.name, role=user.role)


def require(token: str | None, role: str) -> Identity:
    """The caller's identity if it holds `role` or a higher one; AuthError otherwise."""
    who = identify(token)
    if who is None:
        raise AuthError(f"Please sign in: this needs the {role} role or higher.")
    if not who.has(role):
        raise AuthError(f"Signed in as {who.name} ({who.role}); this needs the {role} role "
                        "or higher. Ask an admin to change your role.")
    return who


def login(name: str, password: str, client: str = "client:local") -> str:
    """Check a user name and password against the users table; a signed session token.

    `client` (webapp.limits.client_key): who is asking, for the back-off on failures. A client
    or name that is locked out is refused at once, before any password hashing.
    """
    from annotation.users import authenticate
    from webapp.limits import login_guard

    name = (name or "").strip()
    if not name or not password:
        raise AuthError("Enter your user name and password.")
    login_guard.check(client, name)
    user = authenticate(name, password)
    if user is None:
        login_guard.failed(client, name)
        log.info("failed sign-in for %r", name)
        raise AuthError("Unknown user name or wrong password.")
    login_guard.succeeded(client, name)
    log.info("%s signed in (%s)", user.name, user.role)
    return issue_token(user.id, user.name, user.password_hash)
