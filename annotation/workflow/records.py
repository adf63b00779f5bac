"""A record as an annotator sees it (the sample, its suggestions, their own response), and who
may act on it (viewers read, annotators save, reviewers review: `PermissionDenied` otherwise).
"""
from __future__ import annotations

import random
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from annotation.ingest import is_aligned
from core.errors import UserError
from db.models import ROLE_RANK, Dataset, Response, Sample, Suggestion, User
from db.session import session_scope


class PermissionDenied(UserError):
    """The user's role does not allow this action."""


def user_row(session: Session, user: str | int | User) -> User:
    if isinstance(user, User):
        user = user.id
    found = session.get(User, user) if isinstance(user, int) else \
        session.scalars(select(User).where(User.name == str(user))).first()
    if found is None:
        raise UserError(f"unknown user {user!r}")
    return found


def require_role(user: User, role: str, doing: str) -> None:
    if ROLE_RANK.get(user.role, -1) < ROLE_RANK[role]:
        raise PermissionDenied(f"{user.name} has the {user.role} role: {doing} needs the "
                               f"{role} role or higher")


def dataset_row(session: Session, dataset: str | int | Dataset) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    found = session.get(Dataset, dataset) if isinstance(dataset, int) else \
        session.scalars(select(Dataset).where(Dataset.name == str(dataset))).first()
    if found is None:
        raise UserError(f"unknown dataset {dataset!r}: import it first (python app.py import)")
    return found


def sample_row(session: Session, sample_id: int) -> Sample:
    sample = session.get(Sample, int(sample_id))
    if sample is None:
        raise UserError(f"no record #{sample_id}")
    return sample


def iso(moment: datetime | None) -> str | None:
    """UTC ISO time; SQLite hands datetimes back without their zone, so add it."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def state_view(response: Response | None) -> dict | None:
    if response is None:
        return None
    return {"status": response.status, "label": response.label,
            "explanation": response.explanation, "version": response.version}


def response_view(session: Session, response: Response) -> dict:
    return {"response_id": response.id, "sample_id": response.sample_id,
            "user": session.get(User, response.user_id).name, **state_view(response),
            "updated_at": iso(response.updated_at)}


def _suggestion_view(s: Suggestion) -> dict:
    return {"id": s.id, "source": s.source, "prompt_version": s.prompt_version,
            "status": s.status, "reject_reason": s.reject_reason, "label": s.label,
            "category_answer": s.category_answer, "explanation": s.explanation,
            "input_tokens": s.input_tokens, "output_tokens": s.output_tokens,
            "created_at": iso(s.created_at)}


def record_view(session: Session, sample: Sample, user: User | None) -> dict:
    suggestions = session.scalars(select(Suggestion).where(Suggestion.sample_id == sample.id)
                                  .order_by(Suggestion.created_at, Suggestion.id))
    response = None
    if user is not None:
        response = session.scalars(select(Response).where(Response.sample_id == sample.id,
                                                          Response.user_id == user.id)).first()
    dataset = session.get(Dataset, sample.dataset_id)
    return {"sample_id": sample.id, "dataset": dataset.name, "media_path": sample.media_path,
            "content_hash": sample.content_hash, "modality": sample.modality,
            "label": sample.label, "split": sample.split, "meta": sample.meta or {},
            "label_set": list(dataset.label_set),
            "suggestions": [_suggestion_view(s) for s in suggestions],
            "response": response_view(session, response) if response else None}


def get_record(sample_id: int, user: str | int | None = None, url: str | None = None) -> dict:
    """One record as `next_record` shows it (media, ground truth, suggestions, your response)."""
    with session_scope(url) as session:
        who = user_row(session, user) if user is not None else None
        return record_view(session, sample_row(session, sample_id), who)


def sample_media(sample_id: int, url: str | None = None) -> tuple[str, bool]:
    """The media path of a record and whether it is a face crop (the model skips detection)."""
    with session_scope(url) as session:
        sample = sample_row(session, sample_id)
        return sample.media_path, is_aligned(sample.meta)


def random_sample(dataset: str | int, url: str | None = None,
                  rng: random.Random | None = None) -> dict | None:
    """A random record of a dataset (for blind comparisons), or None when it is empty."""
    rng = rng or random.Random()
    with session_scope(url) as session:
        ds = dataset_row(session, dataset)
        count = session.scalar(select(func.count()).where(Sample.dataset_id == ds.id))
        if not count:
            return None
        sample = session.scalars(select(Sample).where(Sample.dataset_id == ds.id)
                                 .order_by(Sample.id).offset(rng.randrange(count)).limit(1)).one()
        return {"id": sample.id, "media_path": sample.media_path, "modality": sample.modality,
                "aligned": is_aligned(sample.meta),
                "content_hash": sample.content_hash, "label": sample.label, "split": sample.split}
