"""How fast and how often: a requests- and tokens-per-minute limiter shared by the workers, and
retries with full-jitter backoff that honour Retry-After.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from annotation.gemini.client import Cancelled, Reply, TransientError

log = logging.getLogger(__name__)


class RateLimiter:
    """Requests and tokens per minute over a sliding window, shared by all workers.

    `acquire(estimate)` blocks until one more request of about `estimate` tokens fits both
    budgets and returns a ticket; `settle(ticket, actual)` swaps in the real usage once the
    reply says it. A single request larger than the token budget still goes when the window
    is empty (otherwise it could never go).
    """

    def __init__(self, rpm: int | None, tpm: int | None, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep):
        self.rpm, self.tpm, self.window_s = rpm, tpm, window_s
        self._clock, self._sleep = clock, sleep
        self._sent: deque[list] = deque()  # [time, tokens] per request in the window
        self._lock = threading.Lock()

    def _wait_needed(self, now: float, tokens: int) -> float:
        """Seconds until a request of `tokens` fits both budgets (0: it fits now)."""
        while self._sent and self._sent[0][0] <= now - self.window_s:
            self._sent.popleft()
        waits = [0.0]
        if self.rpm and len(self._sent) >= self.rpm:
            waits.append(self._sent[-self.rpm][0] + self.window_s - now)
        if self.tpm and self._sent:
            excess = sum(t for _, t in self._sent) + tokens - self.tpm
            for sent_at, sent_tokens in self._sent:  # oldest first: wait for enough to expire
                if excess <= 0:
                    break
                excess -= sent_tokens
                waits.append(sent_at + self.window_s - now)
        return max(waits)

    def acquire(self, tokens: int = 0, stop: threading.Event | None = None) -> list:
        while True:
            with self._lock:
                now = self._clock()
                delay = self._wait_needed(now, tokens)
                if delay <= 0:
                    ticket = [now, tokens]
                    self._sent.append(ticket)
                    return ticket
            if stop is None:
                self._sleep(delay)
            elif stop.wait(delay):
                raise Cancelled()

    def settle(self, ticket: list, tokens: int) -> None:
        with self._lock:
            ticket[1] = tokens


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter; a server's Retry-After is a floor on the wait."""
    attempts: int = 6
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    max_retry_after_s: float = 600.0  # asked to wait longer (a daily quota): give up instead

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = rng.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** attempt))
        return max(backoff, retry_after or 0.0)


@dataclass
class CallResult:
    reply: Reply
    attempts: int


def call_with_retry(call: Callable[[], Reply], policy: RetryPolicy,
                    limiter: RateLimiter | None = None, estimate: int = 0,
                    stop: threading.Event | None = None, rng: random.Random | None = None,
                    what: str = "request") -> CallResult:
    """Run `call` until it answers; TransientError is retried, anything else goes up.

    Raises the last TransientError when the attempts run out, Cancelled when `stop` is set.
    """
    stop = stop or threading.Event()
    rng = rng or random.Random()
    for attempt in range(policy.attempts):
        if stop.is_set():
            raise Cancelled()
        ticket = limiter.acquire(estimate, stop) if limiter else None
        try:
            reply = call()
        except Exception as exc:
            if limiter:
                limiter.settle(ticket, 0)  # refused requests are not billed
            if not isinstance(exc, TransientError):
                raise
            if attempt + 1 == policy.attempts:
                raise
            if exc.retry_after and exc.retry_after > policy.max_retry_after_s:
                raise TransientError(exc.code, f"server asks to wait {exc.retry_after:.0f}s; "
                                     "try again later") from None
            delay = policy.delay(attempt, exc.retry_after, rng)
            log.info("%s: %s; retry %d/%d in %.1fs", what, exc, attempt + 1,
                     policy.attempts - 1, delay)
            if stop.wait(delay):
                raise Cancelled() from None
            continue
        if limiter:
            limiter.settle(ticket, reply.input_tokens + reply.output_tokens)
        return CallResult(reply, attempt + 1)
    raise AssertionError("unreachable")
