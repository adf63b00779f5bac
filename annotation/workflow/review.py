"""Review: a reviewer accepts or rejects a submitted response (what export ships).
"""
from __future__ import annotations

from sqlalchemy import and_, exists, select

from annotation.workflow.records import (PermissionDenied, dataset_row, require_role, response_view,
                                         user_row)
from annotation.workflow.saves import ConflictError
from core.errors import UserError
from db.models import Response, ResponseHistory, Review, Sample, utcnow
from db.session import session_scope


DECISIONS = {"accepted": "accepted", "accept": "accepted", "rejected": "rejected",
             "reject": "rejected"}


def _current_review():
    """Reviews that judged the response's present version (an edit makes a review stale)."""
    return and_(Review.response_id == Response.id, Review.response_version == Response.version)


def next_review(reviewer: str | int, dataset: str | int, url: str | None = None) -> dict | None:
    """The oldest submitted correction with no review of its present version (not the reviewer's own)."""
    with session_scope(url) as session:
        who = user_row(session, reviewer)
        require_role(who, "reviewer", "reviewing")
        ds = dataset_row(session, dataset)
        row = session.execute(
            select(Response, Sample).join(Sample, Sample.id == Response.sample_id)
            .where(Sample.dataset_id == ds.id, Response.status == "submitted",
                   Response.user_id != who.id, ~exists().where(_current_review()))
            .order_by(Response.updated_at, Response.id).limit(1)).first()
        if row is None:
            return None
        response, sample = row
        return {**response_view(session, response), "media_path": sample.media_path,
                "modality": sample.modality, "ground_truth": sample.label,
                "split": sample.split, "label_set": list(ds.label_set)}


def review(reviewer: str | int, response_id: int, decision: str, comment: str | None = "",
           expected_version: int | None = None, url: str | None = None) -> dict:
    """Accept or reject a submitted correction (reviewer or admin; not one's own)."""
    decision = DECISIONS.get((decision or "").lower(), "")
    if not decision:
        raise UserError("decision must be accepted or rejected")
    with session_scope(url) as session:
        who = user_row(session, reviewer)
        require_role(who, "reviewer", "reviewing")
        response = session.get(Response, int(response_id))
        if response is None:
            raise UserError(f"no correction #{response_id}")
        if response.status != "submitted":
            raise UserError(f"correction #{response_id} is a {response.status}, not submitted")
        if response.user_id == who.id:
            raise PermissionDenied("you cannot review your own correction")
        if expected_version is not None and int(expected_version) != response.version:
            raise ConflictError(f"correction #{response_id} changed since you opened it "
                                f"(version {response.version}); review it again",
                                response_view(session, response))
        now = utcnow()
        row = Review(response_id=response.id, reviewer_id=who.id, decision=decision,
                     comment=(comment or "").strip() or None, response_version=response.version,
                     at=now)
        session.add(row)
        session.add(ResponseHistory(response_id=response.id, user_id=who.id, action=decision,
                                    after={"comment": row.comment, "version": response.version},
                                    at=now))
        session.flush()
        return {"review_id": row.id, "response_id": response.id, "decision": decision,
                "reviewer": who.name, "response_version": response.version}
