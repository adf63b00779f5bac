"""Progress of a dataset's annotation: records by state, per user.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from annotation.workflow.records import dataset_row, user_row
from db.models import Response, Review, Sample, User
from db.session import session_scope


def progress(dataset: str | int, user: str | int | None = None, url: str | None = None) -> dict:
    """Counts for a dataset: records complete (>= min_submitted submissions), per annotator."""
    with session_scope(url) as session:
        ds = dataset_row(session, dataset)
        total = session.scalar(select(func.count()).where(Sample.dataset_id == ds.id))
        per_sample = (select(Response.sample_id, func.count().label("n"))
                      .join(Sample, Sample.id == Response.sample_id)
                      .where(Sample.dataset_id == ds.id, Response.status == "submitted")
                      .group_by(Response.sample_id).subquery())
        complete = session.scalar(select(func.count()).select_from(per_sample)
                                  .where(per_sample.c.n >= ds.min_submitted))
        per_user: dict[str, Counter] = defaultdict(Counter)
        for name, status, n in session.execute(
                select(User.name, Response.status, func.count())
                .join(Response, Response.user_id == User.id)
                .join(Sample, Sample.id == Response.sample_id)
                .where(Sample.dataset_id == ds.id).group_by(User.name, Response.status)):
            per_user[name][status] = n
        latest = aliased(Review)  # only the newest review of the present version counts
        reviewed = session.execute(
            select(User.name, Review.decision, func.count())
            .join(Response, Response.id == Review.response_id)
            .join(User, User.id == Response.user_id)
            .join(Sample, Sample.id == Response.sample_id)
            .where(Sample.dataset_id == ds.id, Response.status == "submitted",
                   Review.id == select(func.max(latest.id))
                   .where(latest.response_id == Response.id,
                          latest.response_version == Response.version).scalar_subquery())
            .group_by(User.name, Review.decision)).all()
        for name, decision, n in reviewed:
            per_user[name][decision] += n
        totals = Counter()
        for counts in per_user.values():
            totals.update(counts)
        result = {"dataset": ds.name, "total": total, "complete": complete,
                  "min_submitted": ds.min_submitted,
                  "submitted": totals["submitted"], "drafts": totals["draft"],
                  "discarded": totals["discarded"], "accepted": totals["accepted"],
                  "rejected": totals["rejected"],
                  "per_user": {name: {k: counts[k] for k in ("submitted", "draft", "discarded",
                                                             "accepted", "rejected")}
                               for name, counts in sorted(per_user.items())}}
        if user is not None:
            mine = per_user.get(user_row(session, user).name, Counter())
            result.update(user_submitted=mine["submitted"], user_drafts=mine["draft"],
                          user_discarded=mine["discarded"], user_accepted=mine["accepted"])
        return result
