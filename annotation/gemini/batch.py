"""Gemini's Batch API for whole datasets: the online pipeline's requests, at about half the price.

    GEMINI_API_KEY=... python app.py generate --dataset affectnet --batch          # submit + wait
    python app.py generate --dataset affectnet --batch --no-wait                   # submit only
    python app.py generate --dataset affectnet --batch-status                      # poll, ingest
    python app.py generate --dataset affectnet --batch-cancel

    from annotation.gemini.batch import run_batch, batch_status, cancel_batch, list_batches

The requests are the online mode's (annotation/gemini/: the same prompt, system instruction,
schema, media and output budget), one JSONL line each, `{"key": "s<sample id>", "request":
<GenerateContentRequest>}`, uploaded with the Files API (resumable upload) and submitted with
`client.batches.create(model=..., src="files/...")`. Google answers within 24 h with a JSONL of
`{"key", "response" | "error"}` lines (`batch.dest.file_name`, read with `client.files.download`),
which go through the same `validate` and `store_outcome` as online answers.

Never twice: a `GeminiBatch` row is written (state PREPARING, a unique `display_name`) before
the upload, marked SUBMITTING before `batches.create`, and given the job's name right after it.
A restart re-attaches to the row's job; a row left in SUBMITTING (killed while create was in
flight) is first looked up by display name in `batches.list`, so a create that reached Google
is never sent again. While a batch is open, its samples are left out of online runs. Ingesting
is idempotent (the suggestions' unique key; counts are recomputed from the whole result file),
so a kill during ingest costs nothing either.

Per-request errors, and every request of a job that FAILED, EXPIRED or was CANCELLED without
results, store nothing and are listed in the row's `failures`: the next run (online by default,
or `--batch`) asks for them again.
"""
from __future__ import annotations

import base64
import json
import logging
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from annotation.gemini.client import (CallError, GeminiError, GenAIClient, TransientError,
                                      http_errors)
from annotation.gemini.job import Item, Outcome, Summary, samples_to_ask, store_outcome
from annotation.gemini.media import estimate_tokens, sample_images
from annotation.gemini.prompts import SYSTEM_INSTRUCTION, generation_prompt, response_schema
from annotation.gemini.settings import (MAX_OUTPUT_TOKENS, PROMPT_VERSION, estimate_cost,
                                        gemini_settings)
from annotation.gemini.validation import validate
from core.errors import MediaError, UserError

log = logging.getLogger(__name__)

# ESTIMATE ONLY: the Batch API is billed at 50% of the interactive price (ai.google.dev/gemini-api/
# docs/batch-mode, "Pricing"); PRICES_USD_PER_MTOK in annotation/gemini/settings.py holds the full prices.
BATCH_PRICE_FACTOR = 0.5
DEFAULT_POLL_S = 30.0
SUCCEEDED = "JOB_STATE_SUCCEEDED"
FINAL_STATES = {SUCCEEDED, "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
LOCAL_STATES = ("PREPARING", "SUBMITTING")  # ours, before Google knows the job
MAX_INPUT_BYTES = 2_000_000_000              # the Files API's per-file limit (2 GB)


def estimate_batch_cost(model: str, input_tokens: int, output_tokens: int) -> float | None:
    """Estimated USD at batch prices (half the list price), None for an unknown model."""
    full = estimate_cost(model, input_tokens, output_tokens)
    return None if full is None else round(full * BATCH_PRICE_FACTOR, 6)


# ------------------------------------------------------------------------------ requests

def request_body(images: list[bytes], prompt: str, schema: dict) -> dict:
    """The REST GenerateContentRequest online mode sends (GenAIClient.generate), as a dict."""
    parts = [{"inlineData": {"mimeType": "image/jpeg", "data": base64.b64encode(image).decode()}}
             for image in images]
    return {"contents": [{"role": "user", "parts": [*parts, {"text": prompt}]}],
            "systemInstruction": {"role": "user", "parts": [{"text": SYSTEM_INSTRUCTION}]},
            "generationConfig": {"temperature": 0.4, "maxOutputTokens": MAX_OUTPUT_TOKENS,
                                 "responseMimeType": "application/json",
                                 "responseSchema": schema}}


def item_key(sample_id: int) -> str:
    return f"s{sample_id}"


# ------------------------------------------------------------------------------ the SDK

class BatchClient:
    """Files + Batches API calls over google-genai, errors classified like online calls
    (TransientError: try again at the next poll; GeminiError: stop; CallError: refused)."""

    def __init__(self, client: GenAIClient):
        self.model = client.model
        self._online = client
        self._sdk = client._client

    def _call(self, what: str, fn: Callable):
        from google.genai import errors

        timeouts, transport_errors = http_errors()
        try:
            return fn()
        except errors.APIError as exc:
            raise self._online._classify(exc) from None
        except timeouts:
            raise TransientError("timeout", f"{what}: no answer within the timeout") from None
        except transport_errors as exc:
            raise TransientError("connection", f"{what}: {type(exc).__name__}") from None

    def upload(self, path: Path, display_name: str) -> str:
        file = self._call("upload", lambda: self._sdk.files.upload(
            file=str(path), config={"mime_type": "application/jsonl",
                                    "display_name": display_name}))
        return file.name

    def create(self, file_name: str, display_name: str):
        return self._call("create", lambda: self._sdk.batches.create(
            model=self.model, src=file_name, config={"display_name": display_name}))

    def get(self, name: str):
        return self._call("get", lambda: self._sdk.batches.get(name=name))

    def cancel(self, name: str) -> None:
        self._call("cancel", lambda: self._sdk.batches.cancel(name=name))

    def find(self, display_name: str):
        """The job with this display name (a create that reached Google), or None."""
        def search():
            for job in self._sdk.batches.list(config={"page_size": 100}):
                if job.display_name == display_name:
                    return job
            return None
        return self._call("list", search)

    def download(self, file_name: str) -> bytes:
        return self._call("download", lambda: self._sdk.files.download(file=file_name))


def _state(job) -> str:
    state = getattr(job, "state", None)
    return str(getattr(state, "value", state) or "JOB_STATE_UNSPECIFIED")


# ------------------------------------------------------------------------------ the store

def _now():
    from db.models import utcnow

    return utcnow()


def _open_batch(session, dataset_id: int, source: str):
    """The dataset's batch still in flight or not yet ingested, for this source and prompt."""
    from sqlalchemy import select

    from db.models import GeminiBatch

    return session.scalars(select(GeminiBatch).where(
        GeminiBatch.dataset_id == dataset_id, GeminiBatch.source == source,
        GeminiBatch.prompt_version == PROMPT_VERSION, GeminiBatch.ingested_at.is_(None))
        .order_by(GeminiBatch.id)).first()


def open_batch_samples(session, dataset_id: int, source: str) -> set[int]:
    """Sample ids in an open batch: online runs leave them out (they would be paid twice)."""
    from sqlalchemy import select

    from db.models import GeminiBatch

    ids: set[int] = set()
    for items in session.scalars(select(GeminiBatch.items).where(
            GeminiBatch.dataset_id == dataset_id, GeminiBatch.source == source,
            GeminiBatch.prompt_version == PROMPT_VERSION, GeminiBatch.ingested_at.is_(None))):
        ids.update(int(i["sample_id"]) for i in items or [])
    return ids


def _update(url: str | None, batch_id: int, **values) -> None:
    from sqlalchemy import update

    from db.models import GeminiBatch
    from db.session import session_scope

    with session_scope(url) as session:
        session.execute(update(GeminiBatch).where(GeminiBatch.id == batch_id)
                        .values(updated_at=_now(), **values))


def batch_view(row, dataset: str | None = None) -> dict:
    """A batch row as the CLI, the Data tab and the tests see it."""
    done = row.ingested_at is not None
    tokens = (row.input_tokens, row.output_tokens)
    cost = estimate_batch_cost(row.model, *tokens) if done else None
    estimate = estimate_batch_cost(row.model, row.estimated_tokens, 0)
    return {"id": row.id, "dataset": dataset, "batch": row.name, "display_name": row.display_name,
            "state": row.state, "ingested": done, "model": row.model, "source": row.source,
            "prompt_version": row.prompt_version, "requests": row.requests, "ok": row.ok,
            "rejected": row.rejected, "failed": row.failed,
            "rejected_by_reason": dict(row.rejected_by_reason or {}),
            "failed_by_reason": dict(Counter((row.failures or {}).values()).most_common()),
            "input_tokens": row.input_tokens, "output_tokens": row.output_tokens,
            "estimated_cost_usd": cost,
            # Before the answers: prompt + image tokens at batch prices (the answers add more).
            "estimated_input_cost_usd": estimate, "error": row.error,
            "created_at": row.created_at.isoformat() if row.created_at else None,
            "finished_at": row.finished_at.isoformat() if row.finished_at else None}


def list_batches(dataset: str | None = None, url: str | None = None, limit: int = 20) -> list[dict]:
    """The newest batch jobs (of one dataset), from the store only: no call to Google."""
    from sqlalchemy import select

    from db.models import Dataset, GeminiBatch
    from db.session import init_db, session_scope

    init_db(url)
    with session_scope(url) as session:
        query = (select(GeminiBatch, Dataset.name).join(Dataset, Dataset.id == GeminiBatch.dataset_id)
                 .order_by(GeminiBatch.id.desc()).limit(limit))
        if dataset:
            query = query.where(Dataset.name == dataset)
        return [batch_view(row, name) for row, name in session.execute(query)]


# ------------------------------------------------------------------------------ submitting

def _write_requests(items: list[Item], label_set: list[str], frames: int, path: Path,
                    failures: dict[str, str]) -> tuple[list[dict], int]:
    """The JSONL of requests; returns (the items sent, estimated tokens). Media that cannot be
    read is left out and listed in `failures` (as online mode fails such a sample)."""
    schema = response_schema(label_set)
    sent, tokens, size = [], 0, 0
    with path.open("w", encoding="utf-8") as out:
        for item in items:
            try:
                images = sample_images(item.media_path, item.modality, frames)
            except MediaError as exc:
                log.warning("sample %d: %s", item.sample_id, exc)
                failures[str(item.sample_id)] = "media"
                continue
            prompt = generation_prompt(item.label, label_set, item.modality, len(images),
                                       item.description)
            line = json.dumps({"key": item_key(item.sample_id),
                               "request": request_body(images, prompt, schema)}) + "\n"
            size += len(line)
            if size > MAX_INPUT_BYTES:
                raise UserError(f"the batch input would pass the Files API's 2 GB limit after "
                                f"{len(sent)} samples: run with --limit {len(sent)}")
            out.write(line)
            tokens += estimate_tokens(images, prompt)
            sent.append({"key": item_key(item.sample_id), "sample_id": item.sample_id,
                         "replaces": item.replaces})
    return sent, tokens


def _new_batch(url: str | None, dataset: str, limit: int | None, retry_rejected: bool,
               frames: int, source: str, model: str, summary: Summary) -> int | None:
    """Select the samples, write the row (PREPARING). None when nothing is left to ask."""
    from sqlalchemy import select

    from db.models import Dataset, GeminiBatch
    from db.session import session_scope

    with session_scope(url) as session:
        ds = session.scalars(select(Dataset).where(Dataset.name == dataset)).first()
        items = samples_to_ask(session, ds, source, retry_rejected, limit, summary)
        if not items:
            return None
        display_name = f"emo-{ds.name[:40]}-{uuid.uuid4().hex[:12]}"
        row = GeminiBatch(dataset_id=ds.id, model=model, source=source,
                          prompt_version=PROMPT_VERSION, display_name=display_name,
                          state="PREPARING", frames=frames, failures={}, rejected_by_reason={},
                          items=[{"key": item_key(i.sample_id), "sample_id": i.sample_id,
                                  "replaces": i.replaces} for i in items])
        session.add(row)
        session.flush()
        batch_id = row.id
    with session_scope(url) as session:
        # Two processes starting at once: the older row wins, the newer one steps aside.
        first = _open_batch(session, ds.id, source)
        if first.id != batch_id:
            session.delete(session.get(GeminiBatch, batch_id))
            return first.id
    return batch_id


def _submit(url: str | None, batch_id: int, api: BatchClient) -> None:
    """PREPARING -> upload -> SUBMITTING -> create -> the job's name, each step recorded first."""
    from sqlalchemy import select

    from db.models import Dataset, GeminiBatch, Sample
    from db.session import session_scope

    with session_scope(url) as session:
        row = session.get(GeminiBatch, batch_id)
        state, display_name, file_name = row.state, row.display_name, row.input_file
        frames, planned = row.frames, list(row.items)
        label_set = list(session.get(Dataset, row.dataset_id).label_set)
        samples = {s.id: s for s in session.scalars(select(Sample).where(
            Sample.id.in_([i["sample_id"] for i in planned])))}
        items = [Item(s.id, s.media_path, s.modality, s.label, (s.meta or {}).get("description"),
                      replaces=i.get("replaces"))
                 for i in planned if (s := samples.get(i["sample_id"])) is not None]
    if state == "SUBMITTING":
        # Killed while create was in flight: did it reach Google? Then that job is ours.
        job = api.find(display_name)
        if job is not None:
            log.info("batch %s: found %s, submitted before the restart", display_name, job.name)
            _update(url, batch_id, name=job.name, state=_state(job), submitted_at=_now())
            return
    if file_name is None:
        failures: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="emo-batch-") as tmp:
            path = Path(tmp) / f"{display_name}.jsonl"
            sent, tokens = _write_requests(items, label_set, frames, path, failures)
            if not sent:
                _update(url, batch_id, state="JOB_STATE_FAILED", failures=failures,
                        failed=len(failures), error="no request could be built",
                        finished_at=_now(), ingested_at=_now())
                return
            file_name = api.upload(path, display_name)
        _update(url, batch_id, input_file=file_name, items=sent, requests=len(sent),
                failures=failures, estimated_tokens=tokens)
    _update(url, batch_id, state="SUBMITTING")
    job = api.create(file_name, display_name)
    _update(url, batch_id, name=job.name, state=_state(job), submitted_at=_now())
    log.info("batch %s submitted as %s (%s)", display_name, job.name, _state(job))


# ------------------------------------------------------------------------------ answers

def _reply(response: dict):
    """A result line's GenerateContentResponse (REST JSON) -> the online pipeline's Reply."""
    from google.genai import types

    return GenAIClient._reply(types.GenerateContentResponse.model_validate(response))


def _error_code(error: dict) -> str:
    """A result line's error (google.rpc.Status) as a short failure code."""
    code = error.get("code", "")
    status = error.get("status", "")
    return f"batch:{code} {status}".strip() if (code or status) else "batch:error"


def parse_results(data: bytes) -> Iterator[tuple[str, dict | None, str | None]]:
    """(key, response or None, error code or None) per result line; unreadable lines skipped."""
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = str(entry["key"])
        except (ValueError, KeyError, TypeError):
            log.warning("result line %d is not a batch answer; skipped", number)
            continue
        if isinstance(entry.get("response"), dict):
            yield key, entry["response"], None
        else:
            yield key, None, _error_code(entry.get("error") or {})


def _ingest(url: str | None, batch_id: int, api: BatchClient, output_file: str | None) -> None:
    """Store every answer of a finished job (idempotent: safe to run again after a kill)."""
    from sqlalchemy import select

    from db.models import Dataset, GeminiBatch, Sample
    from db.session import session_scope

    with session_scope(url) as session:
        row = session.get(GeminiBatch, batch_id)
        source, state, planned = row.source, row.state, list(row.items)
        failures = {k: v for k, v in (row.failures or {}).items() if v == "media"}
        label_set = list(session.get(Dataset, row.dataset_id).label_set)
        truth = dict(session.execute(select(Sample.id, Sample.label).where(
            Sample.id.in_([i["sample_id"] for i in planned]))).all())
    by_key = {i["key"]: i for i in planned}
    answered: set[str] = set()
    ok, rejected, tokens = 0, Counter(), [0, 0]
    if output_file:
        for key, response, error in parse_results(api.download(output_file)):
            item = by_key.get(key)
            if item is None or key in answered:
                continue  # not ours, or a duplicate line: never stored or counted twice
            answered.add(key)
            sample_id = item["sample_id"]
            if error is not None:
                failures[str(sample_id)] = error
                continue
            try:
                reply = _reply(response)
            except (ValueError, TypeError) as exc:
                log.warning("sample %d: unreadable answer (%s)", sample_id, type(exc).__name__)
                failures[str(sample_id)] = "bad_response"
                continue
            tokens[0] += reply.input_tokens
            tokens[1] += reply.output_tokens
            verdict = validate(reply, label_set, truth.get(sample_id))
            outcome = Outcome(Item(sample_id, "", "", truth.get(sample_id) or "", None,
                                   replaces=item.get("replaces")), "answered", reply, verdict)
            store_outcome(url, source, outcome)  # False: stored by the run killed mid-ingest; fine
            if verdict.status == "ok":
                ok += 1
            else:
                rejected[verdict.code] += 1
    missing = "missing" if state == SUCCEEDED else state.removeprefix("JOB_STATE_").lower()
    for item in planned:
        if item["key"] not in answered and str(item["sample_id"]) not in failures:
            failures[str(item["sample_id"])] = missing  # nothing stored: the next run asks again
    _update(url, batch_id, ok=ok, rejected=sum(rejected.values()),
            rejected_by_reason=dict(rejected.most_common()), failed=len(failures),
            failures=failures, input_tokens=tokens[0], output_tokens=tokens[1],
            finished_at=_now(), ingested_at=_now())
    log.info("batch %d ingested: ok %d, rejected %d, failed %d", batch_id, ok,
             sum(rejected.values()), len(failures))


# ------------------------------------------------------------------------------ polling

def _poll_once(url: str | None, batch_id: int, api: BatchClient) -> str:
    """Ask Google for the job's state, record it, ingest a finished job; returns the state."""
    from db.models import GeminiBatch
    from db.session import session_scope

    with session_scope(url) as session:
        row = session.get(GeminiBatch, batch_id)
        name, state, ingested, output = row.name, row.state, row.ingested_at, row.output_file
    if ingested is not None:
        return state
    if name is None:  # PREPARING or SUBMITTING: finish submitting first
        _submit(url, batch_id, api)
        with session_scope(url) as session:
            row = session.get(GeminiBatch, batch_id)
            name, state = row.name, row.state
        if name is None:
            return state
    if state not in FINAL_STATES or output is None:
        try:
            job = api.get(name)
        except TransientError as exc:
            log.warning("batch %s: %s; asking again at the next poll", name, exc)
            return state
        state = _state(job)
        dest = getattr(job, "dest", None)
        output = getattr(dest, "file_name", None) if dest is not None else None
        _update(url, batch_id, state=state, output_file=output)
    if state in FINAL_STATES:
        _ingest(url, batch_id, api, output)
    return state


def _client(model: str | None, client: GenAIClient | None, timeout_s: float) -> BatchClient:
    return BatchClient(client or GenAIClient(gemini_settings(model), timeout_s=timeout_s))


def _dataset_id(session, dataset: str) -> int:
    from sqlalchemy import select

    from db.models import Dataset

    ds = session.scalars(select(Dataset).where(Dataset.name == dataset)).first()
    if ds is None:
        raise UserError(f"unknown dataset {dataset!r}: import it first (python app.py import)")
    return ds.id


def _view(url: str | None, batch_id: int, dataset: str, **extra) -> dict:
    """The CLI's summary: the online summary's keys (format_summary reads them) + the batch."""
    from db.models import GeminiBatch
    from db.session import session_scope

    with session_scope(url) as session:
        view = batch_view(session.get(GeminiBatch, batch_id), dataset)
    cost = view["estimated_cost_usd"]
    view.update({"mode": "batch", "selected": view["requests"],
                 "skipped": 0, "unlabelled": 0, "interrupted": False,
                 "cost_note": ("an estimate at batch prices (half of PRICES_USD_PER_MTOK in "
                               "annotation/gemini/settings.py), not a bill" if cost is not None else
                               "cost known once the answers are in" if not view["ingested"] else
                               f"no list price for {view['model']}"), **extra})
    return view


def run_batch(dataset: str, limit: int | None = None, model: str | None = None, *,
              retry_rejected: bool = False, frames: int = 1, wait: bool = True,
              poll_s: float = DEFAULT_POLL_S, timeout_s: float = 120.0, url: str | None = None,
              client: GenAIClient | None = None,
              progress: Callable[[str, dict], None] | None = None) -> dict:
    """Submit the dataset's remaining samples as one Batch API job, or re-attach to the open one;
    with `wait`, poll every `poll_s` seconds until it is done and ingest the answers.

    `progress(state, view)` is called after every poll. Returns the batch's view (batch_view
    plus the online summary's keys). Ctrl-C or a kill leaves the job running at Google: run the
    same command (or --batch-status) again to pick it up.
    """
    from db.session import init_db, session_scope

    for name, value in (("limit", limit), ("frames", frames)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1")
    if poll_s <= 0:
        raise UserError("--poll must be a positive number of seconds")
    api = _client(model, client, timeout_s)
    source = f"gemini:{api.model}"
    init_db(url)
    summary = Summary(dataset=dataset, model=api.model, source=source)
    with session_scope(url) as session:
        ds_id = _dataset_id(session, dataset)
        row = _open_batch(session, ds_id, source)
        batch_id = row.id if row is not None else None
    attached = batch_id is not None
    if attached:
        log.info("re-attaching to batch %d of %s (nothing is submitted again)", batch_id, dataset)
    else:
        batch_id = _new_batch(url, dataset, limit, retry_rejected, frames, source, api.model,
                              summary)
        if batch_id is None:
            log.info("%s: nothing to ask (%d done, %d without a label)", dataset,
                     summary.skipped, summary.unlabelled)
            return {**summary.to_dict(), "mode": "batch", "batch": None, "state": None,
                    "ingested": False, "attached": False,
                    "estimated_cost_usd": None, "cost_note": "nothing submitted"}
    while True:
        state = _poll_once(url, batch_id, api)
        view = _view(url, batch_id, dataset, attached=attached, skipped=summary.skipped,
                     unlabelled=summary.unlabelled)
        if progress:
            progress(state, view)
        if view["ingested"] or not wait:
            return view
        time.sleep(poll_s)


def _open_batch_of(dataset: str, model: str | None, url: str | None, client: GenAIClient | None,
                   timeout_s: float):
    """(client, source, the dataset's open batch row detached from its session, or None)."""
    from db.session import init_db, session_scope

    api = _client(model, client, timeout_s)
    source = f"gemini:{api.model}"
    init_db(url)
    with session_scope(url) as session:
        row = _open_batch(session, _dataset_id(session, dataset), source)
        if row is not None:
            session.expunge(row)
    return api, source, row


def batch_status(dataset: str, model: str | None = None, *, url: str | None = None,
                 client: GenAIClient | None = None, timeout_s: float = 120.0) -> dict:
    """Poll the dataset's open batch once (ingesting it when done); else its newest batch."""
    api, source, row = _open_batch_of(dataset, model, url, client, timeout_s)
    batch_id = row.id if row is not None else None
    if batch_id is None:
        latest = [b for b in list_batches(dataset, url) if b["source"] == source]
        if not latest:
            raise UserError(f"{dataset} has no Gemini batch for {source}: start one with "
                            f"`python app.py generate --dataset {dataset} --batch`")
        return _view(url, latest[0]["id"], dataset)
    _poll_once(url, batch_id, api)
    return _view(url, batch_id, dataset)


def cancel_batch(dataset: str, model: str | None = None, *, url: str | None = None,
                 client: GenAIClient | None = None, timeout_s: float = 120.0) -> dict:
    """Cancel the dataset's open batch at Google; answers it already has are still ingested."""
    api, _, row = _open_batch_of(dataset, model, url, client, timeout_s)
    if row is None:
        raise UserError(f"{dataset} has no open Gemini batch to cancel")
    batch_id, name, state, display_name = row.id, row.name, row.state, row.display_name
    if name is None and state == "SUBMITTING":
        job = api.find(display_name)  # a create that reached Google before a kill
        name = job.name if job is not None else None
        if name:
            _update(url, batch_id, name=name, state=_state(job))
    if name is None:  # never reached Google: nothing to cancel there, nothing was paid
        _update(url, batch_id, state="JOB_STATE_CANCELLED")
        _ingest(url, batch_id, api, None)
        return _view(url, batch_id, dataset)
    if state not in FINAL_STATES:
        try:
            api.cancel(name)
        except CallError as exc:  # e.g. it finished meanwhile: its state says what happened
            log.warning("batch %s: cancel refused (%s)", name, exc)
    for _ in range(10):  # cancelling takes a moment at Google
        state = _poll_once(url, batch_id, api)
        if state in FINAL_STATES:
            break
        time.sleep(0.5)
    return _view(url, batch_id, dataset)


__all__ = ["run_batch", "batch_status", "cancel_batch", "list_batches", "open_batch_samples",
           "estimate_batch_cost", "request_body", "parse_results", "BatchClient",
           "BATCH_PRICE_FACTOR", "FINAL_STATES", "GeminiError"]
