"""The queue: which record a user gets next, claimed with one conditional INSERT.

A record is offered to a user who has not submitted or discarded it, while fewer than the
dataset's `min_submitted` annotators have submitted it or hold a live claim on it; claims last
`CLAIM_SECONDS`, so two annotators racing for the last slot cannot both get it. Users resume
their own claimed or drafted record first.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import DateTime, delete, exists, func, insert, literal, select, union
from sqlalchemy.orm import Session

from annotation.workflow.records import dataset_row, record_view, require_role, user_row
from core.errors import UserError
from db.models import Claim, Response, Sample, utcnow
from db.session import session_scope


CLAIM_SECONDS = 30 * 60
QUEUE_PAGE = 20  # candidates fetched per try; a claim lost to a race just moves to the next


class ClaimRefused(UserError):
    """A submission to a record whose overlap is already filled by other annotators."""


def _others_holding(sample_id, user_id: int, now: datetime):
    """How many other annotators have submitted the record or hold a live claim on it."""
    submitted = (select(func.count()).select_from(Response)
                 .where(Response.sample_id == sample_id, Response.user_id != user_id,
                        Response.status == "submitted").scalar_subquery())
    claimed = (select(func.count()).select_from(Claim)
               .where(Claim.sample_id == sample_id, Claim.user_id != user_id,
                      Claim.expires_at > now).scalar_subquery())
    return submitted + claimed


def claim(session: Session, sample_id: int, user_id: int, capacity: int, now: datetime,
           seconds: float) -> bool:
    """Take (or renew) a claim if the record still has room; atomic against other claimers."""
    if session.bind.dialect.name != "sqlite":
        # Row lock: concurrent claimers of this record queue here (SQLite locks the whole file
        # at the first write below instead).
        session.execute(select(Sample.id).where(Sample.id == sample_id).with_for_update())
    session.execute(delete(Claim).where(Claim.sample_id == sample_id, Claim.user_id == user_id))
    expires = literal(now + timedelta(seconds=seconds), DateTime(timezone=True))
    row = select(literal(sample_id), literal(user_id), expires).where(
        _others_holding(sample_id, user_id, now) < capacity)
    # psycopg reports INSERT ... SELECT's rowcount only when asked (-1 otherwise).
    result = session.execute(insert(Claim).from_select(["sample_id", "user_id", "expires_at"], row)
                             .execution_options(preserve_rowcount=True))
    return result.rowcount == 1


def next_record(user: str | int, dataset: str | int, url: str | None = None,
                claim_seconds: float = CLAIM_SECONDS) -> dict | None:
    """Claim the user's next record: their own open one first, then the first free one."""
    with session_scope(url) as session:
        who = user_row(session, user)
        require_role(who, "annotator", "annotating")
        ds = dataset_row(session, dataset)
        now = utcnow()
        session.execute(delete(Claim).where(Claim.expires_at <= now))
        done_by_me = exists().where(Response.sample_id == Sample.id, Response.user_id == who.id,
                                    Response.status.in_(("submitted", "discarded")))
        # Read from the user's few claims and drafts, not by scanning the dataset.
        mine = union(select(Claim.sample_id).where(Claim.user_id == who.id),
                     select(Response.sample_id).where(Response.user_id == who.id,
                                                      Response.status == "draft"))
        base = select(Sample.id).where(Sample.dataset_id == ds.id, ~done_by_me)
        queries = [base.where(Sample.id.in_(mine)).order_by(Sample.id).limit(QUEUE_PAGE),
                   base.where(_others_holding(Sample.id, who.id, now) < ds.min_submitted)
                   .order_by(Sample.id).limit(QUEUE_PAGE)]
        own_drafts = select(Response.sample_id).where(Response.user_id == who.id,
                                                      Response.status == "draft")
        for query in queries:
            for sample_id in session.scalars(query).all():
                if claim(session, sample_id, who.id, ds.min_submitted, now, claim_seconds):
                    return {**record_view(session, session.get(Sample, sample_id), who),
                            "claimed": True, "notice": None}
                if query is queries[0] and session.scalar(
                        select(func.count()).where(Sample.id == sample_id,
                                                   Sample.id.in_(own_drafts))):
                    # The user's own draft on a record others have filled since: still theirs to
                    # read and discard (never stranded), but a submission would exceed the
                    # record's overlap, so save() refuses one until a slot frees up.
                    return {**record_view(session, session.get(Sample, sample_id), who),
                            "claimed": False, "notice": full_message(sample_id, ds.min_submitted)}
        return None


def full_message(sample_id: int, capacity: int) -> str:
    who = "annotator has" if capacity == 1 else "annotators have"
    return (f"record #{sample_id} is taken: its {capacity} {who} submitted it or are working on "
            "it, so it cannot take another submission now. Your draft is kept: discard it to "
            "move on, or submit later if a claim frees up")


def release(user: str | int, sample_id: int, url: str | None = None) -> None:
    """Give a claimed record back to the queue before its claim expires."""
    with session_scope(url) as session:
        who = user_row(session, user)
        session.execute(delete(Claim).where(Claim.sample_id == int(sample_id),
                                            Claim.user_id == who.id))
