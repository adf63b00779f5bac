"""The annotation workflow: queue, corrections with optimistic concurrency, history, review.

    from annotation import workflow
    rec = workflow.next_record("ana", "rafdb")           # claims one record for ana (or None)
    saved = workflow.save("ana", rec["sample_id"], "happiness", "Cheeks raised, lips...",
                          "submitted", expected_version=0)   # 0: no saved version yet
    workflow.save("ana", rec["sample_id"], ..., expected_version=1)   # the version you loaded
    workflow.review("rita", saved["response_id"], "accepted", "good evidence")

Records are Argilla-style: machine `Suggestion`s are never edited; each annotator owns one
`Response` per record. Every save is a compare-and-swap on `Response.version`
(UPDATE ... WHERE version = :expected): a save from a stale editor raises `ConflictError`
carrying the newer text, and the losing text is kept in the history (action "conflict"), so
nothing typed is lost. Every change appends a `ResponseHistory` row in the same transaction.

Queue rules (`next_record`): a record is offered to a user who has not submitted or discarded
it, while fewer than the dataset's `min_submitted` annotators have submitted it or hold a live
claim on it; claims last `CLAIM_SECONDS` and are taken with one conditional INSERT, so two
annotators racing for the last slot cannot both get it. Users resume their own claimed or
drafted record first.

Every function takes the user as a name (or id) and checks the role: viewers read, annotators
save, reviewers review (`PermissionDenied` otherwise). Functions open their own short session.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from itertools import combinations

from sqlalchemy import (DateTime, and_, delete, exists, func, insert, literal, select, union,
                        update)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from annotation.ingest import is_aligned
from core.errors import UserError
from core.labels import normalize_label
from db.models import (ROLE_RANK, Claim, Dataset, Preference, Response, ResponseHistory, Review,
                       Sample, Suggestion, User, utcnow)
from db.session import session_scope

CLAIM_SECONDS = 30 * 60
STATUSES = {"draft": "draft", "submitted": "submitted", "submit": "submitted",
            "discarded": "discarded", "discard": "discarded"}
DECISIONS = {"accepted": "accepted", "accept": "accepted", "rejected": "rejected",
             "reject": "rejected"}
WINNERS = ("left", "right", "tie")
QUEUE_PAGE = 20  # candidates fetched per try; a claim lost to a race just moves to the next


class PermissionDenied(UserError):
    """The user's role does not allow this action."""


class ClaimRefused(UserError):
    """A submission to a record whose overlap is already filled by other annotators."""


class ConflictError(UserError):
    """A save based on an old version: `current` holds the newer response (text, version, who)."""

    def __init__(self, message: str, current: dict | None):
        super().__init__(message)
        self.current = current or {}


# ----------------------------------------------------------------------------- lookups

def _user(session: Session, user: str | int | User) -> User:
    if isinstance(user, User):
        user = user.id
    found = session.get(User, user) if isinstance(user, int) else \
        session.scalars(select(User).where(User.name == str(user))).first()
    if found is None:
        raise UserError(f"unknown user {user!r}")
    return found


def _require(user: User, role: str, doing: str) -> None:
    if ROLE_RANK.get(user.role, -1) < ROLE_RANK[role]:
        raise PermissionDenied(f"{user.name} has the {user.role} role: {doing} needs the "
                               f"{role} role or higher")


def _dataset(session: Session, dataset: str | int | Dataset) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    found = session.get(Dataset, dataset) if isinstance(dataset, int) else \
        session.scalars(select(Dataset).where(Dataset.name == str(dataset))).first()
    if found is None:
        raise UserError(f"unknown dataset {dataset!r}: import it first (python app.py import)")
    return found


def _sample(session: Session, sample_id: int) -> Sample:
    sample = session.get(Sample, int(sample_id))
    if sample is None:
        raise UserError(f"no record #{sample_id}")
    return sample


def _iso(moment: datetime | None) -> str | None:
    """UTC ISO time; SQLite hands datetimes back without their zone, so add it."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def _state(response: Response | None) -> dict | None:
    if response is None:
        return None
    return {"status": response.status, "label": response.label,
            "explanation": response.explanation, "version": response.version}


def _response_view(session: Session, response: Response) -> dict:
    return {"response_id": response.id, "sample_id": response.sample_id,
            "user": session.get(User, response.user_id).name, **_state(response),
            "updated_at": _iso(response.updated_at)}


def _suggestion_view(s: Suggestion) -> dict:
    return {"id": s.id, "source": s.source, "prompt_version": s.prompt_version,
            "status": s.status, "reject_reason": s.reject_reason, "label": s.label,
            "category_answer": s.category_answer, "explanation": s.explanation,
            "input_tokens": s.input_tokens, "output_tokens": s.output_tokens,
            "created_at": _iso(s.created_at)}


def _record(session: Session, sample: Sample, user: User | None) -> dict:
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
            "response": _response_view(session, response) if response else None}


def get_record(sample_id: int, user: str | int | None = None, url: str | None = None) -> dict:
    """One record as `next_record` shows it (media, ground truth, suggestions, your response)."""
    with session_scope(url) as session:
        who = _user(session, user) if user is not None else None
        return _record(session, _sample(session, sample_id), who)


def sample_media(sample_id: int, url: str | None = None) -> tuple[str, bool]:
    """The media path of a record and whether it is a face crop (the model skips detection)."""
    with session_scope(url) as session:
        sample = _sample(session, sample_id)
        return sample.media_path, is_aligned(sample.meta)


def random_sample(dataset: str | int, url: str | None = None,
                  rng: random.Random | None = None) -> dict | None:
    """A random record of a dataset (for blind comparisons), or None when it is empty."""
    rng = rng or random.Random()
    with session_scope(url) as session:
        ds = _dataset(session, dataset)
        count = session.scalar(select(func.count()).where(Sample.dataset_id == ds.id))
        if not count:
            return None
        sample = session.scalars(select(Sample).where(Sample.dataset_id == ds.id)
                                 .order_by(Sample.id).offset(rng.randrange(count)).limit(1)).one()
        return {"id": sample.id, "media_path": sample.media_path, "modality": sample.modality,
                "aligned": is_aligned(sample.meta),
                "content_hash": sample.content_hash, "label": sample.label, "split": sample.split}


# ----------------------------------------------------------------------------- the queue

def _others_holding(sample_id, user_id: int, now: datetime):
    """How many other annotators have submitted the record or hold a live claim on it."""
    submitted = (select(func.count()).select_from(Response)
                 .where(Response.sample_id == sample_id, Response.user_id != user_id,
                        Response.status == "submitted").scalar_subquery())
    claimed = (select(func.count()).select_from(Claim)
               .where(Claim.sample_id == sample_id, Claim.user_id != user_id,
                      Claim.expires_at > now).scalar_subquery())
    return submitted + claimed


def _claim(session: Session, sample_id: int, user_id: int, capacity: int, now: datetime,
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
        who = _user(session, user)
        _require(who, "annotator", "annotating")
        ds = _dataset(session, dataset)
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
                if _claim(session, sample_id, who.id, ds.min_submitted, now, claim_seconds):
                    return {**_record(session, session.get(Sample, sample_id), who),
                            "claimed": True, "notice": None}
                if query is queries[0] and session.scalar(
                        select(func.count()).where(Sample.id == sample_id,
                                                   Sample.id.in_(own_drafts))):
                    # The user's own draft on a record others have filled since: still theirs to
                    # read and discard (never stranded), but a submission would exceed the
                    # record's overlap, so save() refuses one until a slot frees up.
                    return {**_record(session, session.get(Sample, sample_id), who),
                            "claimed": False, "notice": _full_message(sample_id, ds.min_submitted)}
        return None


def _full_message(sample_id: int, capacity: int) -> str:
    who = "annotator has" if capacity == 1 else "annotators have"
    return (f"record #{sample_id} is taken: its {capacity} {who} submitted it or are working on "
            "it, so it cannot take another submission now. Your draft is kept: discard it to "
            "move on, or submit later if a claim frees up")


def release(user: str | int, sample_id: int, url: str | None = None) -> None:
    """Give a claimed record back to the queue before its claim expires."""
    with session_scope(url) as session:
        who = _user(session, user)
        session.execute(delete(Claim).where(Claim.sample_id == int(sample_id),
                                            Claim.user_id == who.id))


# ----------------------------------------------------------------------------- saving

def _conflict(session: Session, response: Response, user: User, attempted: dict,
              expected: int) -> ConflictError:
    """Keep the losing text in the history, then describe the newer version to the caller."""
    session.add(ResponseHistory(response_id=response.id, user_id=user.id, action="conflict",
                                before=_state(response), after={**attempted, "version": expected}))
    session.commit()
    current = _response_view(session, response)
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
        who = _user(session, user)
        _require(who, "annotator", "saving corrections")
        sample = _sample(session, sample_id)
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
            claimed = _claim(session, sample.id, who.id, capacity, now, CLAIM_SECONDS)
            if not claimed and status == "submitted":
                stored = session.scalars(select(Response).where(mine)).first()
                if stored is not None:  # keep the refused text in the history: nothing is lost
                    session.add(ResponseHistory(response_id=stored.id, user_id=who.id,
                                                action="refused", before=_state(stored),
                                                after={**attempted, "version": expected}, at=now))
                    session.commit()
                raise ClaimRefused(_full_message(sample.id, capacity) + "; your text was not "
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
                **attempted, "version": expected + 1, "updated_at": _iso(now)}


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
                 "after": h.after, "at": _iso(h.at)} for h, name, owner in rows]


# ----------------------------------------------------------------------------- review

def _current_review():
    """Reviews that judged the response's present version (an edit makes a review stale)."""
    return and_(Review.response_id == Response.id, Review.response_version == Response.version)


def next_review(reviewer: str | int, dataset: str | int, url: str | None = None) -> dict | None:
    """The oldest submitted correction with no review of its present version (not the reviewer's own)."""
    with session_scope(url) as session:
        who = _user(session, reviewer)
        _require(who, "reviewer", "reviewing")
        ds = _dataset(session, dataset)
        row = session.execute(
            select(Response, Sample).join(Sample, Sample.id == Response.sample_id)
            .where(Sample.dataset_id == ds.id, Response.status == "submitted",
                   Response.user_id != who.id, ~exists().where(_current_review()))
            .order_by(Response.updated_at, Response.id).limit(1)).first()
        if row is None:
            return None
        response, sample = row
        return {**_response_view(session, response), "media_path": sample.media_path,
                "modality": sample.modality, "ground_truth": sample.label,
                "split": sample.split, "label_set": list(ds.label_set)}


def review(reviewer: str | int, response_id: int, decision: str, comment: str | None = "",
           expected_version: int | None = None, url: str | None = None) -> dict:
    """Accept or reject a submitted correction (reviewer or admin; not one's own)."""
    decision = DECISIONS.get((decision or "").lower(), "")
    if not decision:
        raise UserError("decision must be accepted or rejected")
    with session_scope(url) as session:
        who = _user(session, reviewer)
        _require(who, "reviewer", "reviewing")
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
                                _response_view(session, response))
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


# ----------------------------------------------------------------------------- progress

def progress(dataset: str | int, user: str | int | None = None, url: str | None = None) -> dict:
    """Counts for a dataset: records complete (>= min_submitted submissions), per annotator."""
    with session_scope(url) as session:
        ds = _dataset(session, dataset)
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
            mine = per_user.get(_user(session, user).name, Counter())
            result.update(user_submitted=mine["submitted"], user_drafts=mine["draft"],
                          user_discarded=mine["discarded"], user_accepted=mine["accepted"])
        return result


# ----------------------------------------------------------------------------- agreement

def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items (None without items)."""
    if not a or len(a) != len(b):
        return None
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    chance = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    if chance == 1.0:  # both raters used one and the same label throughout
        return 1.0 if observed == 1.0 else None
    return (observed - chance) / (1 - chance)


def fleiss_kappa(items: list[Counter]) -> float | None:
    """Fleiss' kappa from per-item label counts; items may have different numbers of raters."""
    items = [c for c in items if sum(c.values()) >= 2]
    if not items:
        return None
    agreement = []
    totals: Counter = Counter()
    for counts in items:
        n = sum(counts.values())
        agreement.append((sum(v * v for v in counts.values()) - n) / (n * (n - 1)))
        totals.update(counts)
    p_bar = sum(agreement) / len(agreement)
    ratings = sum(totals.values())
    p_chance = sum((v / ratings) ** 2 for v in totals.values())
    if p_chance == 1.0:
        return 1.0 if p_bar == 1.0 else None
    return (p_bar - p_chance) / (1 - p_chance)


def edit_distance(a: str, b: str) -> float:
    """Word-level Levenshtein distance divided by the longer text's length (0 same, 1 disjoint)."""
    x, y = (a or "").lower().split(), (b or "").lower().split()
    if not x and not y:
        return 0.0
    previous = list(range(len(y) + 1))
    for i, word in enumerate(x, 1):
        current = [i]
        for j, other in enumerate(y, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (word != other)))
        previous = current
    return previous[-1] / max(len(x), len(y))


def agreement(dataset: str | int, url: str | None = None) -> dict:
    """Inter-annotator agreement on submitted corrections of records with 2+ annotators."""
    with session_scope(url) as session:
        ds = _dataset(session, dataset)
        rows = session.execute(
            select(Response.sample_id, User.name, Response.label, Response.explanation,
                   Sample.label)
            .join(User, User.id == Response.user_id)
            .join(Sample, Sample.id == Response.sample_id)
            .where(Sample.dataset_id == ds.id, Response.status == "submitted")
            .order_by(Response.sample_id, User.name)).all()
    by_item: dict[int, dict[str, tuple]] = defaultdict(dict)
    truth_hits: dict[str, list[bool]] = defaultdict(list)
    for sample_id, name, label, explanation, truth in rows:
        by_item[sample_id][name] = (label, explanation)
        if truth:
            truth_hits[name].append(label == truth)
    shared = {sid: raters for sid, raters in by_item.items() if len(raters) >= 2}
    pairs: dict[tuple[str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
    distances = []
    for raters in shared.values():
        for (n1, (l1, e1)), (n2, (l2, e2)) in combinations(sorted(raters.items()), 2):
            pairs[(n1, n2)][0].append(l1)
            pairs[(n1, n2)][1].append(l2)
            distances.append(edit_distance(e1, e2))
    cohen = {f"{a}~{b}": {"kappa": cohen_kappa(la, lb), "items": len(la)}
             for (a, b), (la, lb) in sorted(pairs.items())}
    kappas = [v["kappa"] for v in cohen.values() if v["kappa"] is not None]
    all_hits = [hit for hits in truth_hits.values() for hit in hits]
    return {"dataset": ds.name, "items": len(shared),
            "raters": len({n for raters in shared.values() for n in raters}),
            "fleiss_kappa": fleiss_kappa([Counter(label for label, _ in raters.values())
                                          for raters in shared.values()]),
            "cohen_kappa": cohen,
            "mean_cohen_kappa": sum(kappas) / len(kappas) if kappas else None,
            "explanation_distance": sum(distances) / len(distances) if distances else None,
            "ground_truth_agreement": {
                **{name: sum(h) / len(h) for name, h in sorted(truth_hits.items())},
                "all": sum(all_hits) / len(all_hits) if all_hits else None}}


# ----------------------------------------------------------------------------- A/B votes

def vote_preference(*, content_hash: str, left_source: str, right_source: str, winner: str,
                    sample_id: int | None = None, user_id: int | None = None,
                    user: str | None = None, url: str | None = None) -> dict:
    """Store one blind A/B vote between two explanations of the same media."""
    if winner not in WINNERS:
        raise UserError("winner must be left, right or tie")
    if not left_source or not right_source or left_source == right_source:
        raise UserError("a preference compares two different sources")
    if not content_hash or len(content_hash) != 64:
        raise UserError("content_hash must be the media's sha256 (64 hex digits)")
    with session_scope(url) as session:
        if user is not None:
            user_id = _user(session, user).id
        elif user_id is not None:
            user_id = _user(session, int(user_id)).id
        if sample_id is not None:
            sample_id = _sample(session, sample_id).id
        row = Preference(sample_id=sample_id, content_hash=content_hash, left_source=left_source,
                         right_source=right_source, winner=winner, user_id=user_id)
        session.add(row)
        session.flush()
        return {"id": row.id, "winner": winner}


def preference_stats(url: str | None = None) -> dict[str, dict]:
    """Wins, losses and ties per source over all blind votes."""
    stats: dict[str, Counter] = defaultdict(Counter)
    with session_scope(url) as session:
        for left, right, winner in session.execute(
                select(Preference.left_source, Preference.right_source, Preference.winner)):
            if winner == "tie":
                stats[left]["ties"] += 1
                stats[right]["ties"] += 1
            else:
                won, lost = (left, right) if winner == "left" else (right, left)
                stats[won]["wins"] += 1
                stats[lost]["losses"] += 1
    result = {}
    for source, c in sorted(stats.items()):
        votes = c["wins"] + c["losses"] + c["ties"]
        result[source] = {"wins": c["wins"], "losses": c["losses"], "ties": c["ties"],
                          "votes": votes, "win_rate": (c["wins"] + 0.5 * c["ties"]) / votes}
    return result
