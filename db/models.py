"""The annotation store's tables (SQLAlchemy 2.x ORM), after Argilla's record/suggestion/response split.

    Dataset 1─* Sample 1─* Suggestion        machine text, never edited
                       1─* Response 1─* ResponseHistory, Review     one annotator's correction
    User, Claim (queue leases), ExportSnapshot, FinetuneJob, ModelVersion, Preference, ExplainCache,
    GeminiBatch (a Gemini Batch API job: its id, state, requests and what it cost),
    Job (import / generate / evaluate / export run as a subprocess, annotation/jobs.py)

Schema changes go through Alembic (db/migrations); `db.session.init_db()` upgrades on start.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


# The one list of roles; each may do everything the roles before it may.
ROLES = ("viewer", "annotator", "reviewer", "admin")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    password_hash: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    modality: Mapped[str] = mapped_column(String(8))                # image | video
    label_set: Mapped[list] = mapped_column(JSON)                   # canonical names, in order
    source_format: Mapped[str] = mapped_column(String(32))
    root: Mapped[str] = mapped_column(Text)
    min_submitted: Mapped[int] = mapped_column(Integer, default=1)  # annotators per record
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    samples: Mapped[list["Sample"]] = relationship(back_populates="dataset")


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("dataset_id", "content_hash"),
                      Index("ix_samples_dataset_split", "dataset_id", "split"))
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    media_path: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(8))
    label: Mapped[str | None] = mapped_column(String(32))
    split: Mapped[str] = mapped_column(String(8), default="train")  # train | val | test
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    dataset: Mapped[Dataset] = relationship(back_populates="samples")
    suggestions: Mapped[list["Suggestion"]] = relationship(back_populates="sample")


class Suggestion(Base):
    __tablename__ = "suggestions"
    __table_args__ = (UniqueConstraint("sample_id", "source", "prompt_version"),
                      Index("ix_suggestions_source_prompt", "source", "prompt_version"))
    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(80))                 # gemini:<model> | model:<version>
    prompt_version: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="ok")   # ok | rejected
    reject_reason: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    label: Mapped[str | None] = mapped_column(String(32))
    category_answer: Mapped[str | None] = mapped_column(Text)
    explanation: Mapped[str | None] = mapped_column(Text)
    raw: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sample: Mapped[Sample] = relationship(back_populates="suggestions")


class ExplainCache(Base):
    """Gemini's on-demand explanations of uploaded images (no ground truth), by content hash."""
    __tablename__ = "explain_cache"
    __table_args__ = (UniqueConstraint("content_hash", "source", "prompt_version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(80))
    prompt_version: Mapped[str] = mapped_column(String(32))
    label: Mapped[str | None] = mapped_column(String(32))
    explanation: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Response(Base):
    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("sample_id", "user_id"),
                      Index("ix_responses_status", "status"))
    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="draft")  # draft | submitted | discarded
    label: Mapped[str | None] = mapped_column(String(32))
    explanation: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=1)        # optimistic concurrency
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ResponseHistory(Base):
    __tablename__ = "response_history"
    id: Mapped[int] = mapped_column(primary_key=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(16))
    before: Mapped[dict | None] = mapped_column(JSON)
    after: Mapped[dict | None] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Claim(Base):
    """A lease on a record in someone's queue; expired leases are free again."""
    __tablename__ = "claims"
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Review(Base):
    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    decision: Mapped[str] = mapped_column(String(16))               # accepted | rejected
    comment: Mapped[str | None] = mapped_column(Text)
    # The response version the reviewer saw: an edit after the review makes the review stale.
    response_version: Mapped[int | None] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExportSnapshot(Base):
    __tablename__ = "export_snapshots"
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    n_samples: Mapped[int] = mapped_column(Integer, default=0)
    include_suggestions: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FinetuneJob(Base):
    __tablename__ = "finetune_jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("export_snapshots.id"))
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    pid: Mapped[int | None] = mapped_column(Integer)
    log_path: Mapped[str | None] = mapped_column(Text)
    out_dir: Mapped[str | None] = mapped_column(Text)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """A long job other than fine-tuning (annotation/jobs.py): import, generate, evaluate,
    export. Its subprocess writes JSONL progress to `log_path`; `result` is the final summary."""
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status", "status"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))                  # import|generate|evaluate|export
    args: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed|cancelled
    pid: Mapped[int | None] = mapped_column(Integer)
    log_path: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ModelVersion(Base):
    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    folder: Mapped[str] = mapped_column(Text)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("export_snapshots.id"))
    job_id: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    published: Mapped[bool] = mapped_column(Boolean, default=False)
    is_serving: Mapped[bool] = mapped_column(Boolean, default=False)
    is_tiny: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Preference(Base):
    """A blind A/B vote between two explanations of the same media."""
    __tablename__ = "preferences"
    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int | None] = mapped_column(ForeignKey("samples.id", ondelete="SET NULL"))
    content_hash: Mapped[str] = mapped_column(String(64))
    left_source: Mapped[str] = mapped_column(String(80))
    right_source: Mapped[str] = mapped_column(String(80))
    winner: Mapped[str] = mapped_column(String(8))                  # left | right | tie
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class GeminiBatch(Base):
    """One Gemini Batch API job over a dataset (annotation/gemini_batch.py).

    The row is written before anything is uploaded or submitted, so a restart finds it: with
    `name` set it re-attaches to the job; without, it looks the job up by `display_name` (a
    create that succeeded just before a kill) before it would ever submit again.
    """
    __tablename__ = "gemini_batches"
    __table_args__ = (Index("ix_gemini_batches_dataset_state", "dataset_id", "state"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(80))
    source: Mapped[str] = mapped_column(String(80))                 # gemini:<model>
    prompt_version: Mapped[str] = mapped_column(String(32))
    display_name: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str | None] = mapped_column(String(128), unique=True)  # batches/<id> at Google
    # PREPARING -> SUBMITTING -> JOB_STATE_PENDING/RUNNING -> JOB_STATE_SUCCEEDED/FAILED/
    # CANCELLED/EXPIRED (Google's); `ingested_at` is set once the answers are stored.
    state: Mapped[str] = mapped_column(String(32), default="PREPARING")
    input_file: Mapped[str | None] = mapped_column(String(128))     # files/<id> (the JSONL)
    output_file: Mapped[str | None] = mapped_column(String(128))    # dest.file_name
    items: Mapped[list] = mapped_column(JSON, default=list)         # [{key, sample_id, replaces}]
    frames: Mapped[int] = mapped_column(Integer, default=1)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    ok: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[dict] = mapped_column(JSON, default=dict)      # sample id -> error code
    rejected_by_reason: Mapped[dict] = mapped_column(JSON, default=dict)
    estimated_tokens: Mapped[int] = mapped_column(Integer, default=0)  # before the answers
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ingested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
