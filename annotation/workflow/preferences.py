"""Blind A/B votes between two explanations of one image (the Compare tab), and their tallies.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from sqlalchemy import select

from annotation.workflow.records import sample_row, user_row
from core.errors import UserError
from db.models import Preference
from db.session import session_scope


WINNERS = ("left", "right", "tie")


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
            user_id = user_row(session, user).id
        elif user_id is not None:
            user_id = user_row(session, int(user_id)).id
        if sample_id is not None:
            sample_id = sample_row(session, sample_id).id
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
