"""Saving a correction: a compare-and-swap on `Response.version` (UPDATE ... WHERE version =
:expected). A save from a stale editor raises `ConflictError` carrying the newer text, and the
losing text is kept in the history (action "conflict"), so nothing typed is lost. Every change
appends a `ResponseHistory` row in the same transaction.
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from annotation.workflow.queue import CLAIM_SECONDS, ClaimRefused, claim, full_message
from annotation.workflow.records import (iso, require_role, response_view, sample_row, state_view,
                                         user_row)
from core.errors import UserError
from core.labels import normalize_label
from db.models import Claim, Dataset, Response, ResponseHistory, User, utcnow
from db.session import session_scope


STATUSES = {"draft": "draft", "submitted": "submitted", "submit": "submitted",
            "discarded": "discarded", "discard": "discarded"}


class ConflictError(UserError):
    """A save based on an old version: `current` holds the newer response (text, version, who)."""

    def __init__(self, message: str, current: dict | None):
        super().__init__(message)
        self.current = current or {}


def _conflict(session: Session, response: Response, user: User, attempted: dict,
              expected: int) -> ConflictError:
    """Keep the losing text in the history, then describe the newer version to the caller."""
    session.add(ResponseHistory(response_id=response.id, user_id=user.id, action="conflict",
                                before=state_view(response), after={**attempted, "version": expected}))
    session.commit()
    current = response_view(session, response)
    return ConflictError(f"record #{response.sample_id} was saved meanwhile (now version "
                         f"{response.version}, you edited version {expected}); your text is "
                         "kept in the history: compare and save again", current)


def save(user: str | int, sample_id: int, label: str | None, explanation: str | None,
         status: str = "draft", expected_version: int | None = None,
         url: str | None = None) -> dict:
    """Save a draft, submit or discard the user's correction of a record.

    `expected_version`: the version the editor loaded (0 when it showed no saved response).
    Raises ConflictError when the stored response moved on since then.
    """
    status = STATUSES.get(status or "", "")
    if not status:
        raise UserError("status must be draft, submitted or discarded")
    if expected_version is None or int(expected_version) < 0:
        raise UserError("expected_version is required: the version you loaded (0 for new)")
    expected = int(expected_version)
    explanation = (explanation or "").strip() or None
    with session_scope(url) as session:
        who = user_row(session, user)
        require_role(who, "annotator", "saving corrections")
        sample = sample_row(session, sample_id)
        label_set = session.get(Dataset, sample.dataset_id).label_set
        if label:
            canonical = normalize_label(label)
            if canonical not in label_set:
                raise UserError(f"{label!r} is not a label of this dataset "
                                f"({', '.join(label_set)})")
            label = canonical
        if status == "submitted" and not (label and explanation):
            raise UserError("a submitted correction needs a label and an explanation")
        attempted = {"status": status, "label": label or None, "explanation": explanation}
        now = utcnow()
        mine = and_(Response.sample_id == sample.id, Response.user_id == who.id)
        if status != "discarded":
            # A submission fills one of the record's `min_submitted` slots, so it needs a live
            # claim; a save without one (an API caller that never asked the queue, a claim that
            # expired) claims first when the record has room, else a submission is refused. A
            # draft fills no slot: it takes a claim when it can and is never refused (refusing
            # it would only lose text). Discarding needs no claim.
            capacity = session.get(Dataset, sample.dataset_id).min_submitted
            claimed = claim(session, sample.id, who.id, capacity, now, CLAIM_SECONDS)
            if not claimed and status == "submitted":
                stored = session.scalars(select(Response).where(mine)).first()
                if stored is not None:  # keep the refused text in the history: nothing is lost
                    session.add(ResponseHistory(response_id=stored.id, user_id=who.id,
                                                action="refused", before=state_view(stored),
                                                after={**attempted, "version": expected}, at=now))
                    session.commit()
                raise ClaimRefused(full_message(sample.id, capacity) + "; your text was not "
                                   "submitted (it stays in your editor"
                                   + (" and in the record's history)" if stored else ")"))

        if expected == 0:  # a first save: INSERT, and the unique key catches a twin
            response = Response(sample_id=sample.id, user_id=who.id, version=1,
                                created_at=now, updated_at=now, **attempted)
            session.add(response)
            try:
                session.flush()
            except IntegrityError:
                session.rollback()
                stored = session.scalars(select(Response).where(mine)).one()
                raise _conflict(session, stored, who, attempted, expected) from None
            before = None
        else:
            stored = session.scalars(select(Response).where(mine)).first()
            if stored is None:
                raise UserError(f"you have no saved version {expected} of record #{sample.id}; "
                                "save with expected_version=0")
            swapped = session.execute(
                update(Response).where(Response.id == stored.id, Response.version == expected)
                .values(**attempted, version=Response.version + 1, updated_at=now)
                .execution_options(synchronize_session=False))
            session.expire(stored)
            if swapped.rowcount != 1:
                raise _conflict(session, stored, who, attempted, expected) from None
            response = stored
            # The state we replaced is the last saved state in the history; we hold the write
            # lock, so nothing can slip in between.
            before = session.scalars(
                select(ResponseHistory.after)
                .where(ResponseHistory.response_id == stored.id,
                       ResponseHistory.action.in_(("draft", "submitted", "discarded")))
                .order_by(ResponseHistory.id.desc()).limit(1)).first()
        session.add(ResponseHistory(response_id=response.id, user_id=who.id, action=status,
                                    before=before, after={**attempted, "version": expected + 1},
                                    at=now))
        if status == "draft":
            session.execute(update(Claim).where(Claim.sample_id == sample.id,
                                                Claim.user_id == who.id)
                            .values(expires_at=now + timedelta(seconds=CLAIM_SECONDS)))
        else:
            session.execute(delete(Claim).where(Claim.sample_id == sample.id,
                                                Claim.user_id == who.id))
        session.flush()
        return {"response_id": response.id, "sample_id": sample.id, "user": who.name,
                **attempted, "version": expected + 1, "updated_at": iso(now)}


def history(sample_id: int, url: str | None = None) -> list[dict]:
    """Every change to the record's responses, oldest first: saves, conflicts and reviews."""
    with session_scope(url) as session:
        rows = session.execute(
            select(ResponseHistory, User.name, Response.user_id)
            .join(Response, Response.id == ResponseHistory.response_id)
            .join(User, User.id == ResponseHistory.user_id)
            .where(Response.sample_id == int(sample_id))
            .order_by(ResponseHistory.at, ResponseHistory.id)).all()
        owners = {uid: session.get(User, uid).name for _, _, uid in rows}
        return [{"id": h.id, "response_id": h.response_id, "user": name,
                 "author": owners[owner], "action": h.action, "before": h.before,
                 "after": h.after, "at": iso(h.at)} for h, name, owner in rows]
