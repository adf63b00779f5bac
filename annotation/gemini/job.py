"""The generation job: every labelled sample of a dataset without a suggestion -> a validated
`Suggestion`, by a bounded worker pool; resumable (idempotent per sample, model and prompt version).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from annotation.gemini.client import (CallError, Cancelled, GeminiClient, GenAIClient, Reply,
                                      TransientError)
from annotation.gemini.limits import RateLimiter, RetryPolicy, call_with_retry
from annotation.gemini.media import estimate_tokens, sample_images
from annotation.gemini.prompts import generation_prompt, response_schema
from annotation.gemini.settings import (DEFAULT_RPM, DEFAULT_TIMEOUT_S, DEFAULT_TPM, PROMPT_VERSION,
                                        estimate_cost, gemini_settings)
from annotation.gemini.validation import Verdict, validate
from core.errors import MediaError, UserError

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One sample to ask about, detached from its DB session."""
    sample_id: int
    media_path: str
    modality: str
    label: str
    description: str | None
    replaces: int | None = None  # a rejected suggestion this answer replaces (--retry-rejected)


@dataclass
class Outcome:
    item: Item
    kind: str                       # answered | failed | cancelled
    reply: Reply | None = None
    verdict: Verdict | None = None
    attempts: int = 0
    error: str | None = None        # failure code, counted in the summary


@dataclass
class Summary:
    dataset: str
    model: str
    source: str
    prompt_version: str = PROMPT_VERSION
    selected: int = 0
    skipped: int = 0                # already had a suggestion for (source, prompt version)
    unlabelled: int = 0             # no ground truth: nothing to generate from
    in_batch: int = 0               # left to an open Batch API job (annotation/gemini/batch.py)
    ok: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    failed_by_reason: Counter = field(default_factory=Counter)
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict:
        cost = estimate_cost(self.model, self.input_tokens, self.output_tokens)
        return {
            "dataset": self.dataset, "model": self.model, "source": self.source,
            "prompt_version": self.prompt_version, "selected": self.selected,
            "skipped": self.skipped, "unlabelled": self.unlabelled, "in_batch": self.in_batch,
            "ok": self.ok,
            "rejected": sum(self.rejected_by_reason.values()),
            "rejected_by_reason": dict(self.rejected_by_reason.most_common()),
            "failed": sum(self.failed_by_reason.values()),
            "failed_by_reason": dict(self.failed_by_reason.most_common()),
            "requests": self.requests, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "estimated_cost_usd": cost,
            "cost_note": ("an estimate from list prices (PRICES_USD_PER_MTOK in "
                          "annotation/gemini/settings.py), not a bill" if cost is not None else
                          f"no list price for {self.model}: add it to PRICES_USD_PER_MTOK"),
            "interrupted": self.interrupted,
            "elapsed_s": round(time.monotonic() - self.started, 2),
        }


def samples_to_ask(session, dataset, source: str, retry_rejected: bool, limit: int | None,
            summary: Summary, exclude: set[int] | frozenset = frozenset()) -> list[Item]:
    """The samples still to do, in id order; counts the ones already done. `exclude`: samples
    an open Batch API job is answering (asking them online too would pay twice)."""
    from sqlalchemy import select

    from db.models import Sample, Suggestion

    done = {sample_id: (sid, status) for sample_id, sid, status in session.execute(
        select(Suggestion.sample_id, Suggestion.id, Suggestion.status)
        .join(Sample, Sample.id == Suggestion.sample_id)
        .where(Sample.dataset_id == dataset.id, Suggestion.source == source,
               Suggestion.prompt_version == PROMPT_VERSION))}
    items = []
    for sample in session.scalars(select(Sample).where(Sample.dataset_id == dataset.id)
                                  .order_by(Sample.id)):
        if sample.id in exclude:
            summary.in_batch += 1
            continue
        previous = done.get(sample.id)
        if previous and not (retry_rejected and previous[1] == "rejected"):
            summary.skipped += 1
            continue
        if not sample.label:
            summary.unlabelled += 1
            continue
        if limit is not None and len(items) >= limit:
            continue
        items.append(Item(sample.id, sample.media_path, sample.modality, sample.label,
                          (sample.meta or {}).get("description"),
                          replaces=previous[0] if previous else None))
    return items


def store_outcome(url: str | None, source: str, outcome: Outcome) -> bool:
    """Write one answered sample; False when another job stored it first."""
    from sqlalchemy.exc import IntegrityError

    from db.models import Suggestion
    from db.session import session_scope

    reply, verdict, item = outcome.reply, outcome.verdict, outcome.item
    try:
        with session_scope(url) as session:
            if item.replaces is not None:  # --retry-rejected: the new answer takes its place
                old = session.get(Suggestion, item.replaces)
                if old is not None:
                    session.delete(old)
                    session.flush()
            session.add(Suggestion(
                sample_id=item.sample_id, source=source, prompt_version=PROMPT_VERSION,
                status=verdict.status, reject_reason=verdict.reason,
                finish_reason=reply.finish_reason, label=verdict.label,
                category_answer=verdict.label if verdict.status == "ok" else None,
                explanation=verdict.explanation, raw=(reply.text or "")[:20_000] or None,
                input_tokens=reply.input_tokens, output_tokens=reply.output_tokens))
    except IntegrityError:
        log.warning("sample %d: already stored by another job; keeping that one", item.sample_id)
        return False
    return True


def _run_pool(items: list[Item], ask: Callable[[Item], Outcome],
              record: Callable[[Outcome], None], workers: int, stop: threading.Event) -> None:
    """Ask about items with at most `workers` requests in flight, recording each answer as it
    arrives (so a kill loses at most the answers in flight). On Ctrl-C or an abort: no new
    attempts, the answers already in flight are still recorded, then the exception goes up."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gemini")
    pending: dict[Future, Item] = {}
    queue = iter(items)

    def refill() -> None:
        while len(pending) < workers and not stop.is_set():
            item = next(queue, None)
            if item is None:
                return
            pending[pool.submit(ask, item)] = item

    try:
        refill()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                del pending[future]
                record(future.result())
            refill()
    except BaseException:
        stop.set()
        if pending:
            log.warning("stopping: saving the %d answer(s) in flight (Ctrl-C again to drop them)",
                        len(pending))
        for future in list(pending):
            if future.cancel():
                continue
            try:
                record(future.result())
            except Exception:
                pass  # an abort reason is already on its way up
        raise
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


def run_generation(dataset: str, limit: int | None = None, model: str | None = None, *,
                   workers: int = 4, rpm: int | None = DEFAULT_RPM,
                   tpm: int | None = DEFAULT_TPM, retry_rejected: bool = False,
                   frames: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S,
                   retry: RetryPolicy | None = None, url: str | None = None,
                   client: GeminiClient | None = None,
                   progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Gemini instruction data for the samples of `dataset` that have none yet (resumable).

        python app.py generate --dataset rafdb --limit 50 [--json]

    `progress(done, total, summary_dict)` is called as samples finish (the CLI drives tqdm
    with it, the web UI gr.Progress). Returns the summary dict: ok / rejected_by_reason /
    failed_by_reason counts, tokens and the estimated cost. Failed calls store nothing, so
    the next run retries them; rejected answers are kept (pass retry_rejected to redo them).
    """
    from sqlalchemy import select

    from db.models import Dataset
    from db.session import init_db, session_scope

    for name, value in (("limit", limit), ("workers", workers), ("rpm", rpm), ("tpm", tpm),
                        ("frames", frames)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1")
    if timeout_s <= 0:
        raise UserError("--timeout must be a positive number of seconds")
    if client is None:
        client = GenAIClient(gemini_settings(model), timeout_s=timeout_s)
    source = f"gemini:{client.model}"
    retry = retry or RetryPolicy()
    init_db(url)
    summary = Summary(dataset=dataset, model=client.model, source=source)
    with session_scope(url) as session:
        ds = session.scalars(select(Dataset).where(Dataset.name == dataset)).first()
        if ds is None:
            raise UserError(f"unknown dataset {dataset!r}: import it first (python app.py import)")
        label_set = list(ds.label_set)
        from annotation.gemini.batch import open_batch_samples

        items = samples_to_ask(session, ds, source, retry_rejected, limit, summary,
                        open_batch_samples(session, ds.id, source))
    summary.selected = len(items)
    schema = response_schema(label_set)
    limiter = RateLimiter(rpm, tpm)
    stop = threading.Event()
    tally = threading.Lock()
    done = 0

    def ask(item: Item) -> Outcome:
        what = f"sample {item.sample_id}"
        try:
            images = sample_images(item.media_path, item.modality, frames)
        except MediaError as exc:
            log.warning("%s: %s", what, exc)
            return Outcome(item, "failed", error="media")
        prompt = generation_prompt(item.label, label_set, item.modality, len(images),
                                   item.description)
        attempts = [0]

        def call() -> Reply:
            attempts[0] += 1
            return client.generate(images, prompt, schema)

        try:
            result = call_with_retry(call, retry, limiter, estimate_tokens(images, prompt),
                                     stop, what=what)
        except Cancelled:
            return Outcome(item, "cancelled", attempts=attempts[0])
        except (TransientError, CallError) as exc:
            log.warning("%s: failed after %d attempt(s): %s", what, attempts[0], exc)
            return Outcome(item, "failed", attempts=attempts[0], error=exc.code)
        finally:
            with tally:
                summary.requests += attempts[0]
        return Outcome(item, "answered", result.reply,
                       validate(result.reply, label_set, item.label), result.attempts)

    def record(outcome: Outcome) -> None:
        nonlocal done
        if outcome.kind == "cancelled":
            return
        done += 1
        if outcome.kind == "failed":
            summary.failed_by_reason[outcome.error] += 1
        else:
            summary.input_tokens += outcome.reply.input_tokens
            summary.output_tokens += outcome.reply.output_tokens
            if store_outcome(url, source, outcome):
                if outcome.verdict.status == "ok":
                    summary.ok += 1
                else:
                    summary.rejected_by_reason[outcome.verdict.code] += 1
                    log.info("sample %d: rejected (%s)", outcome.item.sample_id,
                             outcome.verdict.reason)
        if progress:
            progress(done, len(items), summary.to_dict())

    if progress:
        progress(0, len(items), summary.to_dict())
    log.info("generate %s with %s (%s): %d to do, %d already done", dataset, source,
             PROMPT_VERSION, len(items), summary.skipped)
    try:
        _run_pool(items, ask, record, workers, stop)
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("interrupted after %d of %d samples; run again to continue", done, len(items))
        raise
    return summary.to_dict()
