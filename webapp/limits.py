"""Abuse limits of the public web app: Gemini spending and password guessing.

Gemini (`/gemini_explain`, the Compare tab's blind A/B): each visitor (client IP; a signed-in
user by name) has a token bucket of paid requests (`EMO_GEMINI_BURST`, default 3, refilled at
`EMO_GEMINI_PER_MINUTE`, default 6), and the whole server has a budget of paid requests per UTC
day (`EMO_GEMINI_DAILY_LIMIT`, default 500; 0 turns Gemini off for visitors). The day's count
is read from the database (ExplainCache rows created since 00:00 UTC: one per paid answer), so
it survives restarts and is shared by replicas on one store. Answers already cached are free:
they neither need nor spend a token.

Sign-in (`/login`): failed attempts are counted per client and per user name. Past a few free
failures each one doubles a lock-out (1 s, 2 s, 4 s, ... up to 5 min); a locked-out attempt is
answered at once with "too many attempts, retry in N s" and checks no password (argon2 hashing
is what an attacker would make the server spend). Nothing sleeps while holding a worker: the old
fixed 0.5 s delay per failure held one of the shared slots and let a flood slow everyone.

Client addresses: the TCP peer, or, with `EMO_TRUST_FORWARDED=1` (behind a proxy such as a
Hugging Face Space's), the last `X-Forwarded-For` entry, the one the nearest proxy added.
The state is per process (a restart forgets lock-outs; the Gemini day count is in the store).
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from core.errors import UserError


class RateLimited(UserError):
    """A request refused by a limit; the message says when to retry."""


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def client_key(request, user: str | None = None) -> str:
    """Who a limit applies to: the signed-in user's name, else the client's address."""
    if user:
        return f"user:{user}"
    if request is None:
        return "client:local"  # an in-process call (tests, scripts): one shared key
    if os.environ.get("EMO_TRUST_FORWARDED") == "1":
        forwarded = (request.headers.get("x-forwarded-for") or "").split(",")
        if forwarded[-1].strip():
            return f"client:{forwarded[-1].strip()}"
    client = getattr(request, "client", None)
    return f"client:{getattr(client, 'host', None) or 'unknown'}"


def _retry_text(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))} s"


# ----------------------------------------------------------------------------- token buckets

@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """Per-key token buckets: `burst` requests at once, refilled at `per_minute`."""

    MAX_KEYS = 10_000  # beyond this, full (idle) buckets are forgotten

    def __init__(self, burst: float, per_minute: float):
        self.burst, self.rate = max(1.0, burst), max(per_minute, 1e-6) / 60.0
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def _get(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.MAX_KEYS:
                self._forget_full(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        return bucket

    def _forget_full(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items()
                    if b.tokens + (now - b.at) * self.rate >= self.burst]:
            del self._buckets[key]

    def take(self, key: str) -> float:
        """Spend one token: 0.0 when granted, else the seconds until one is there."""
        now = time.monotonic()
        with self._lock:
            bucket = self._get(key, now)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def give_back(self, key: str) -> None:
        with self._lock:
            bucket = self._get(key, time.monotonic())
            bucket.tokens = min(self.burst, bucket.tokens + 1.0)

    def charge(self, key: str) -> None:
        """Spend a token after the fact (a request thought free turned out paid); may go into
        debt down to -burst, which the refill pays off before the next paid request."""
        with self._lock:
            bucket = self._get(key, time.monotonic())
            bucket.tokens = max(-self.burst, bucket.tokens - 1.0)


# ----------------------------------------------------------------------------- Gemini

_gemini_buckets: TokenBuckets | None = None
_gemini_lock = threading.Lock()
_in_flight = 0  # paid requests started and not yet stored (they count against the day)


def _buckets() -> TokenBuckets:
    global _gemini_buckets
    with _gemini_lock:
        if _gemini_buckets is None:
            _gemini_buckets = TokenBuckets(_env_float("EMO_GEMINI_BURST", 3),
                                           _env_float("EMO_GEMINI_PER_MINUTE", 6))
        return _gemini_buckets


def daily_limit() -> int:
    return int(_env_float("EMO_GEMINI_DAILY_LIMIT", 500))


def _day_start(now: datetime | None = None) -> datetime:
    now = now or datetime.now(timezone.utc)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def paid_today(url: str | None = None) -> int:
    """Paid on-demand Gemini answers since 00:00 UTC: the ExplainCache rows created today."""
    from sqlalchemy import func, select

    from db.models import ExplainCache
    from db.session import session_scope

    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(ExplainCache)
                                  .where(ExplainCache.created_at >= _day_start())) or 0)


def is_cached(path: str, url: str | None = None) -> bool:
    """Whether Gemini has explained this picture before (then the answer costs nothing)."""
    from sqlalchemy import select

    from core.media import content_hash
    from db.models import ExplainCache
    from db.session import session_scope

    try:
        digest = content_hash(path)
    except (OSError, UserError):
        return False  # gemini_explain reports the unreadable file itself
    with session_scope(url) as session:
        return session.scalar(select(ExplainCache.id).where(
            ExplainCache.content_hash == digest).limit(1)) is not None


def _budget_message(limit: int) -> str:
    now = datetime.now(timezone.utc)
    left = (_day_start(now) + timedelta(days=1) - now).total_seconds()
    return (f"Today's Gemini budget of this server is used up ({limit} paid requests per UTC "
            f"day, EMO_GEMINI_DAILY_LIMIT); it renews at 00:00 UTC, in {int(left // 3600)} h "
            f"{int(left % 3600 // 60)} min. Pictures Gemini has explained before still answer "
            "from the cache.")


def limited_gemini(path: str, key: str, explain) -> dict:
    """`explain(path)` (the paid call) within the visitor's rate and the day's budget."""
    global _in_flight
    buckets = _buckets()
    if is_cached(path):
        answer = explain(path)
        if not answer.get("cached"):  # cached under another prompt version: it was paid
            buckets.charge(key)
        return answer
    limit = daily_limit()
    with _gemini_lock:  # in-flight requests count, so parallel requests cannot overshoot
        if paid_today() + _in_flight >= limit:
            raise RateLimited(_budget_message(limit))
        wait = buckets.take(key)
        if wait:
            raise RateLimited(
                f"Too many Gemini requests: {buckets.burst:g} at once and "
                f"{buckets.rate * 60:g} per minute per visitor; retry in {_retry_text(wait)}. "
                "Pictures Gemini has explained before answer from the cache at once.")
        _in_flight += 1
    try:
        answer = explain(path)
    except Exception:
        buckets.give_back(key)  # a failed call (bad file, Gemini down) costs the visitor nothing
        raise
    finally:
        with _gemini_lock:
            _in_flight -= 1
    if answer.get("cached"):  # another request cached it meanwhile
        buckets.give_back(key)
    return answer


# ----------------------------------------------------------------------------- sign-in

FREE_FAILURES_CLIENT = 5    # wrong passwords from one client before lock-outs start
FREE_FAILURES_NAME = 10     # from anywhere, for one user name (higher: others can lock it)
FIRST_LOCK_S = 1.0
MAX_LOCK_S = 300.0
FORGET_S = 15 * 60          # failures older than this (and no lock) are forgotten


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last: float = 0.0


class LoginGuard:
    """Back-off for failed sign-ins, per client and per user name; never sleeps."""

    def __init__(self):
        self._state: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def _entry(self, key: str, now: float) -> _Failures:
        entry = self._state.get(key)
        if entry is not None and entry.locked_until <= now and now - entry.last > FORGET_S:
            entry = None
        if entry is None:
            if len(self._state) > 50_000:  # a flood of made-up names: drop the stale ones
                for k in [k for k, e in self._state.items()
                          if e.locked_until <= now and now - e.last > 60]:
                    del self._state[k]
            entry = self._state[key] = _Failures()
        return entry

    def check(self, client: str, name: str) -> None:
        """Raise RateLimited (at once, no hashing) while the client or the name is locked out."""
        now = time.monotonic()
        with self._lock:
            wait = max(self._entry(client, now).locked_until,
                       self._entry(f"name:{name.lower()}", now).locked_until) - now
        if wait > 0:
            raise RateLimited(f"Too many attempts, retry in {_retry_text(wait)}.")

    def failed(self, client: str, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key, free in ((client, FREE_FAILURES_CLIENT),
                              (f"name:{name.lower()}", FREE_FAILURES_NAME)):
                entry = self._entry(key, now)
                entry.count += 1
                entry.last = now
                if entry.count >= free:
                    lock = min(MAX_LOCK_S, FIRST_LOCK_S * 2 ** (entry.count - free))
                    entry.locked_until = max(entry.locked_until, now + lock)

    def succeeded(self, client: str, name: str) -> None:
        with self._lock:
            self._state.pop(client, None)
            self._state.pop(f"name:{name.lower()}", None)

    def reset(self) -> None:
        with self._lock:
            self._state.clear()


login_guard = LoginGuard()
