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

The package, one concern a module: records.py (a record as a user sees it; roles), queue.py
(next_record, claims), saves.py (save, history), review.py, progress.py, agreement.py (kappas,
edit distance), preferences.py (blind A/B votes). This module is their public API.
"""
from annotation.workflow.agreement import agreement, cohen_kappa, edit_distance, fleiss_kappa
from annotation.workflow.preferences import preference_stats, vote_preference
from annotation.workflow.progress import progress
from annotation.workflow.queue import CLAIM_SECONDS, ClaimRefused, next_record, release
from annotation.workflow.records import PermissionDenied, get_record, random_sample, sample_media
from annotation.workflow.review import next_review, review
from annotation.workflow.saves import ConflictError, history, save

__all__ = ["CLAIM_SECONDS", "ClaimRefused", "ConflictError", "PermissionDenied", "agreement", "cohen_kappa",
           "edit_distance", "fleiss_kappa", "get_record", "history", "next_record", "next_review",
           "preference_stats", "progress", "random_sample", "release", "review", "sample_media", "save",
           "vote_preference"]
