"""Annotation workflow: queue and claims, optimistic concurrency under threads, history, review,
progress, agreement and A/B votes, against a real SQLite file."""
from __future__ import annotations

import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select, update

from annotation import workflow
from annotation.users import add_user
from annotation.workflow import ConflictError, PermissionDenied
from core.errors import UserError
from db.models import Dataset, Response, ResponseHistory, Sample, User
from db.session import session_scope

PASSWORD = "correct-horse"

# Each test that uses db_url runs on SQLite and on a real PostgreSQL (tests/conftest.py).
STORE_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture
def team(db_url, small_dataset, fast_passwords):
    for name, role in [("ana", "annotator"), ("bob", "annotator"), ("cat", "annotator"),
                       ("rita", "reviewer"), ("adam", "admin"), ("vic", "viewer")]:
        add_user(name, role, PASSWORD, url=db_url)
    return db_url


def set_overlap(url, n):
    with session_scope(url) as s:
        s.execute(update(Dataset).where(Dataset.name == "faces").values(min_submitted=n))


def submit(url, user, sample_id, label="happiness", text="Cheeks raised, lip corners up."):
    version = (workflow.get_record(sample_id, user, url=url)["response"] or {}).get("version", 0)
    return workflow.save(user, sample_id, label, text, "submitted", version, url=url)


# ----------------------------------------------------------------------------- queue

def test_queue_gives_each_record_to_one_annotator_and_resumes(team):
    url = team
    first = workflow.next_record("ana", "faces", url=url)
    assert first["label_set"] and first["media_path"].endswith(".png")
    assert first["suggestions"] == [] and first["response"] is None
    assert workflow.next_record("bob", "faces", url=url)["sample_id"] != first["sample_id"]
    assert workflow.next_record("ana", "faces", url=url)["sample_id"] == first["sample_id"]  # resume
    submit(url, "ana", first["sample_id"])
    after = workflow.next_record("ana", "faces", url=url)
    assert after["sample_id"] != first["sample_id"]
    # A submitted record is not handed out again when one annotation is wanted.
    seen = set()
    while (rec := workflow.next_record("cat", "faces", url=url)) is not None:
        seen.add(rec["sample_id"])
        submit(url, "cat", rec["sample_id"])
    assert first["sample_id"] not in seen and len(seen) == 6 - 1 - 2  # ana's done, ana's + bob's claimed


def test_overlap_and_claim_expiry(team):
    url = team
    set_overlap(url, 2)
    a = workflow.next_record("ana", "faces", url=url)
    b = workflow.next_record("bob", "faces", url=url)
    c = workflow.next_record("cat", "faces", url=url)
    assert a["sample_id"] == b["sample_id"] != c["sample_id"]  # two annotators per record
    set_overlap(url, 1)
    expired = workflow.next_record("adam", "faces", url=url, claim_seconds=-1)
    taken = workflow.next_record("rita", "faces", url=url)
    assert taken["sample_id"] == expired["sample_id"]          # adam's claim lapsed
    workflow.release("rita", taken["sample_id"], url=url)
    assert workflow.next_record("adam", "faces", url=url)["sample_id"] == taken["sample_id"]


def test_concurrent_claims_never_collide(team):
    url = team
    names = [f"u{i}" for i in range(6)]
    for name in names:
        add_user(name, "annotator", PASSWORD, url=url)
    barrier = threading.Barrier(len(names))

    def grab(name):
        barrier.wait()
        return workflow.next_record(name, "faces", url=url)["sample_id"]

    with ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(grab, names))
    assert sorted(got) == sorted(set(got)) and len(got) == 6   # six records, six annotators
    assert workflow.next_record("ana", "faces", url=url) is None


def test_roles_are_enforced(team):
    url = team
    rec = workflow.next_record("ana", "faces", url=url)
    with pytest.raises(PermissionDenied):
        workflow.next_record("vic", "faces", url=url)
    with pytest.raises(PermissionDenied):
        workflow.save("vic", rec["sample_id"], "happiness", "x", "draft", 0, url=url)
    saved = submit(url, "ana", rec["sample_id"])
    with pytest.raises(PermissionDenied):
        workflow.review("bob", saved["response_id"], "accepted", url=url)
    own = submit(url, "rita", workflow.next_record("rita", "faces", url=url)["sample_id"])
    with pytest.raises(PermissionDenied, match="own"):
        workflow.review("rita", own["response_id"], "accepted", url=url)
    assert workflow.review("rita", saved["response_id"], "accepted", url=url)["decision"] == "accepted"
    with pytest.raises(UserError, match="not a label"):
        workflow.save("ana", rec["sample_id"], "bored", "x", "draft", 1, url=url)
    with pytest.raises(UserError, match="needs a label and an explanation"):
        workflow.save("ana", rec["sample_id"], "sadness", "  ", "submitted", 1, url=url)
    with pytest.raises(UserError, match="unknown user"):
        workflow.next_record("nobody", "faces", url=url)


# ----------------------------------------------------------------------------- concurrency

def test_eight_threads_no_lost_update_every_conflict_reported(team):
    """4 annotators x 2 editors each (8 threads) save the same 3 records, 6 rounds each.

    Both editors of a user load the same version, then save: exactly one wins per round and the
    other gets a ConflictError showing the winner's text. Afterwards every success is one
    version step, every conflict is in the history, and the last saved text is the stored one.
    """
    url = team
    users = ["ana", "bob", "cat", "adam"]
    with session_scope(url) as s:
        sample_ids = list(s.scalars(select(Sample.id).order_by(Sample.id).limit(3)))
    rounds = 6
    pair_barriers = {u: threading.Barrier(2, timeout=60) for u in users}
    results: list[tuple[str, int, str, object]] = []
    lock = threading.Lock()

    def editor(user: str, editor_no: int):
        for r in range(rounds):
            sample_id = sample_ids[r % len(sample_ids)]
            record = workflow.get_record(sample_id, user, url=url)
            version = (record["response"] or {}).get("version", 0)
            text = f"{user} editor {editor_no} round {r}"
            pair_barriers[user].wait()          # both editors hold the same version now
            try:
                saved = workflow.save(user, sample_id, "sadness", text, "draft", version, url=url)
                outcome = saved["version"]
            except ConflictError as exc:
                assert exc.current["version"] > version and exc.current["explanation"] != text
                outcome = exc
            with lock:
                results.append((user, sample_id, text, outcome))
            pair_barriers[user].wait()          # next round starts from the committed state

    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(editor, u, e) for u in users for e in (0, 1)]:
            f.result()

    successes = [r for r in results if isinstance(r[3], int)]
    conflicts = [r for r in results if isinstance(r[3], ConflictError)]
    assert len(successes) == len(conflicts) == len(users) * rounds   # one winner per pair per round
    with session_scope(url) as s:
        for user in users:
            for sample_id in sample_ids:
                mine = [r for r in successes if r[0] == user and r[1] == sample_id]
                response = s.scalars(select(Response).join(User, User.id == Response.user_id)
                                     .where(Response.sample_id == sample_id,
                                            User.name == user)).one()
                rows = list(s.scalars(select(ResponseHistory).where(
                    ResponseHistory.response_id == response.id).order_by(ResponseHistory.id)))
                saves = [h for h in rows if h.action == "draft"]
                lost = [h for h in rows if h.action == "conflict"]
                assert response.version == len(mine) == len(saves)               # no lost update
                assert [h.after["version"] for h in saves] == list(range(1, len(mine) + 1))
                assert sorted(h.after["explanation"] for h in saves) == sorted(r[2] for r in mine)
                assert len(lost) == sum(1 for r in conflicts if r[0] == user and r[1] == sample_id)
                assert response.explanation == saves[-1].after["explanation"]
                for earlier, later in zip(saves, saves[1:]):
                    assert later.before == earlier.after                         # a complete chain


def test_conflict_shows_the_newer_text_and_keeps_the_losing_one(team):
    url = team
    rec = workflow.next_record("ana", "faces", url=url)
    sid = rec["sample_id"]
    workflow.save("ana", sid, "happiness", "first tab text", "draft", 0, url=url)
    with pytest.raises(ConflictError) as info:
        workflow.save("ana", sid, "sadness", "second tab text", "draft", 0, url=url)
    assert info.value.current["explanation"] == "first tab text" and info.value.current["version"] == 1
    workflow.save("ana", sid, "happiness", "first tab, edited", "submitted", 1, url=url)
    with pytest.raises(ConflictError):
        workflow.save("ana", sid, "sadness", "stale", "draft", 1, url=url)
    entries = workflow.history(sid, url=url)
    assert [e["action"] for e in entries] == ["draft", "conflict", "submitted", "conflict"]
    assert entries[1]["after"]["explanation"] == "second tab text"         # nothing typed is lost
    assert entries[2]["before"]["explanation"] == "first tab text"
    assert all(e["user"] == "ana" for e in entries)


# ----------------------------------------------------------------------------- review, progress

def test_review_flow_and_stale_reviews(team):
    url = team
    rec = workflow.next_record("ana", "faces", url=url)
    saved = submit(url, "ana", rec["sample_id"])
    item = workflow.next_review("rita", "faces", url=url)
    assert item["response_id"] == saved["response_id"] and item["user"] == "ana"
    assert item["ground_truth"] == rec["label"]
    workflow.review("rita", item["response_id"], "accepted", "clear evidence", url=url)
    assert workflow.next_review("rita", "faces", url=url) is None
    assert workflow.progress("faces", url=url)["accepted"] == 1

    # Editing after the review makes it stale: back in the review queue, no longer accepted.
    workflow.save("ana", rec["sample_id"], "sadness", "On second look: lowered lip corners.",
                  "submitted", saved["version"], url=url)
    again = workflow.next_review("adam", "faces", url=url)
    assert again["response_id"] == saved["response_id"] and again["version"] == 2
    with pytest.raises(ConflictError):
        workflow.review("adam", again["response_id"], "rejected", expected_version=1, url=url)
    workflow.review("adam", again["response_id"], "rejected", "lips are neutral", url=url)
    stats = workflow.progress("faces", user="ana", url=url)
    assert (stats["accepted"], stats["rejected"], stats["user_submitted"]) == (0, 1, 1)
    actions = [e["action"] for e in workflow.history(rec["sample_id"], url=url)]
    assert actions == ["submitted", "accepted", "submitted", "rejected"]


def test_progress_counts_complete_records_by_overlap(team):
    url = team
    set_overlap(url, 2)
    rec = workflow.next_record("ana", "faces", url=url)
    submit(url, "ana", rec["sample_id"])
    assert workflow.progress("faces", url=url)["complete"] == 0
    assert workflow.next_record("bob", "faces", url=url)["sample_id"] == rec["sample_id"]
    submit(url, "bob", rec["sample_id"])
    draft = workflow.next_record("cat", "faces", url=url)
    workflow.save("cat", draft["sample_id"], None, "thinking...", "draft", 0, url=url)
    stats = workflow.progress("faces", user="cat", url=url)
    assert (stats["total"], stats["complete"], stats["submitted"], stats["drafts"]) == (6, 1, 2, 1)
    assert stats["per_user"]["bob"]["submitted"] == 1 and stats["user_drafts"] == 1


# ----------------------------------------------------------------------------- agreement

def test_kappa_against_published_examples():
    # Cohen (Wikipedia): 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert workflow.cohen_kappa(a, b) == pytest.approx(0.4)
    # Fleiss (Fleiss 1971 as on Wikipedia): 10 items, 14 raters, 5 categories -> 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    items = [Counter({c: n for c, n in enumerate(row) if n}) for row in table]
    assert workflow.fleiss_kappa(items) == pytest.approx(0.2099, abs=1e-3)
    assert workflow.edit_distance("raised cheeks and smile", "raised cheeks and smile") == 0.0
    assert workflow.edit_distance("brows raised", "mouth open wide") == 1.0
    assert workflow.edit_distance("brows raised high", "brows lowered high") == pytest.approx(1 / 3)


def test_agreement_on_submitted_corrections(team):
    url = team
    set_overlap(url, 2)
    labels = {"ana": ["happiness", "sadness", "anger"], "bob": ["happiness", "sadness", "neutral"]}
    for name in ("ana", "bob"):
        for label in labels[name]:
            rec = workflow.next_record(name, "faces", url=url)
            submit(url, name, rec["sample_id"], label, f"{name} says {label}")
    result = workflow.agreement("faces", url=url)
    assert result["items"] == 3 and result["raters"] == 2
    expected = workflow.cohen_kappa(labels["ana"], labels["bob"])
    assert result["cohen_kappa"]["ana~bob"] == {"kappa": pytest.approx(expected), "items": 3}
    assert result["fleiss_kappa"] is not None and result["fleiss_kappa"] < 1
    # "<name> says <label>": 1 word of 3 differs on two items, 2 of 3 on the third
    assert result["explanation_distance"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)


# ----------------------------------------------------------------------------- A/B votes

def test_preference_votes_and_random_samples(team):
    url = team
    sample = workflow.random_sample("faces", url=url, rng=random.Random(0))
    assert sample == workflow.random_sample("faces", url=url, rng=random.Random(0))
    for winner in ("left", "left", "tie", "right"):
        workflow.vote_preference(content_hash=sample["content_hash"], left_source="gemini:flash",
                                 right_source="model:v1", winner=winner, sample_id=sample["id"],
                                 user="vic", url=url)
    stats = workflow.preference_stats(url=url)
    assert stats["gemini:flash"] == {"wins": 2, "losses": 1, "ties": 1, "votes": 4, "win_rate": 0.625}
    assert stats["model:v1"]["wins"] == 1
    with pytest.raises(UserError, match="left, right or tie"):
        workflow.vote_preference(content_hash=sample["content_hash"], left_source="a",
                                 right_source="b", winner="both", url=url)
    with pytest.raises(UserError, match="different sources"):
        workflow.vote_preference(content_hash=sample["content_hash"], left_source="a",
                                 right_source="a", winner="tie", url=url)


# ----------------------------------------------------------------------------- command line

def test_annotate_commands_two_terminals(team, monkeypatch, capsys):
    """The README's flow: two terminals edit one record; the stale save exits 2 and shows the
    newer text, then a reviewer accepts and progress counts it."""
    import json

    import app

    monkeypatch.setenv("EMO_DB_URL", team)

    def run(*argv):
        code = app.main(list(argv))
        out = capsys.readouterr()
        return code, json.loads(out.out) if "--json" in argv and out.out.strip() else out.out, out.err

    code, rec, _ = run("annotate", "next", "--dataset", "faces", "--user", "ana", "--json")
    assert code == 0 and rec["response"] is None
    sid = str(rec["sample_id"])
    code, saved, _ = run("annotate", "save", sid, "--user", "ana", "--label", "happy",
                         "--explanation", "terminal one", "--version", "0", "--json")
    assert code == 0 and saved["version"] == 1 and saved["label"] == "happiness"
    code, stale, err = run("annotate", "save", sid, "--user", "ana", "--label", "sad",
                           "--explanation", "terminal two", "--version", "0", "--json")
    assert code == 2 and err.startswith("error: record #") and len(err.strip().splitlines()) == 1
    assert stale["conflict"]["explanation"] == "terminal one" and stale["conflict"]["version"] == 1
    code, saved, _ = run("annotate", "save", sid, "--user", "ana", "--label", "sad",
                         "--explanation", "terminal two, merged", "--submit", "--version", "1", "--json")
    assert code == 0 and saved["status"] == "submitted" and saved["version"] == 2

    code, changes, _ = run("annotate", "history", sid, "--json")
    assert [h["action"] for h in changes] == ["draft", "conflict", "submitted"]
    assert changes[1]["after"]["explanation"] == "terminal two"       # the losing text is kept

    code, _, err = run("annotate", "review", str(saved["response_id"]), "--user", "bob", "--accept")
    assert code == 2 and "reviewer role" in err
    code, waiting, _ = run("annotate", "review", "--user", "rita", "--dataset", "faces", "--json")
    assert waiting["response_id"] == saved["response_id"]
    code, done, _ = run("annotate", "review", str(saved["response_id"]), "--user", "rita",
                        "--accept", "--comment", "fine", "--json")
    assert code == 0 and done["decision"] == "accepted"
    code, stats, _ = run("annotate", "progress", "--dataset", "faces", "--json")
    assert stats["complete"] == 1 and stats["per_user"]["ana"]["accepted"] == 1
    code, text, _ = run("annotate", "progress", "--dataset", "faces")
    assert code == 0 and "1/6 records complete" in text


# ----------------------------------------------------------------------------- stranded drafts

def _expire_claims(url, user):
    """What 30 minutes away from the editor does: the user's claims run out."""
    from datetime import timedelta

    from db.models import Claim, utcnow

    with session_scope(url) as s:
        uid = s.scalars(select(User.id).where(User.name == user)).one()
        s.execute(update(Claim).where(Claim.user_id == uid)
                  .values(expires_at=utcnow() - timedelta(seconds=1)))


def test_own_draft_stays_reachable_after_someone_else_submits_it(team):
    """14.7: ana drafts, walks away; bob takes the record and submits. ana's queue still starts
    with her draft (marked as taken), her submit is refused with the reason and her text kept,
    and a discard lets her move on."""
    url = team
    set_overlap(url, 1)
    rec = workflow.next_record("ana", "faces", url=url)
    sid = rec["sample_id"]
    assert rec["claimed"] is True and rec["notice"] is None
    workflow.save("ana", sid, "happiness", "ana's careful draft", "draft", 0, url=url)
    _expire_claims(url, "ana")
    assert workflow.next_record("bob", "faces", url=url)["sample_id"] == sid
    submit(url, "bob", sid)

    again = workflow.next_record("ana", "faces", url=url)
    assert again["sample_id"] == sid and again["claimed"] is False          # first, not lost
    assert again["response"]["explanation"] == "ana's careful draft"
    assert "is taken" in again["notice"] and "discard" in again["notice"]
    with pytest.raises(workflow.ClaimRefused, match=f"record #{sid} is taken") as refused:
        workflow.save("ana", sid, "happiness", "ana's final text", "submitted", 1, url=url)
    assert "not submitted" in str(refused.value)
    kept = workflow.get_record(sid, "ana", url=url)["response"]
    assert (kept["status"], kept["version"], kept["explanation"]) == \
        ("draft", 1, "ana's careful draft")
    refusal = [h for h in workflow.history(sid, url=url) if h["action"] == "refused"]
    assert refusal and refusal[-1]["after"]["explanation"] == "ana's final text"  # nothing lost
    # A draft fills no slot, so saving one is never refused; discarding needs no claim.
    assert workflow.save("ana", sid, "happiness", "still thinking", "draft", 1,
                         url=url)["version"] == 2
    workflow.save("ana", sid, None, "still thinking", "discarded", 2, url=url)
    assert workflow.next_record("ana", "faces", url=url)["sample_id"] != sid
    stats = workflow.progress("faces", url=url)
    assert stats["per_user"]["bob"]["submitted"] == 1 and stats["submitted"] == 1


def test_a_save_without_a_claim_claims_first_or_is_refused(team):
    """14.7: `save` needs no queue visit, but a submission fills a slot: the first caller
    claims the free record on the way, the second finds it full."""
    url = team
    set_overlap(url, 1)
    with session_scope(url) as s:
        sid = s.scalars(select(Sample.id).order_by(Sample.id.desc()).limit(1)).one()
    assert workflow.save("cat", sid, "sadness", "Lip corners down.", "submitted", 0,
                         url=url)["status"] == "submitted"
    with pytest.raises(workflow.ClaimRefused, match="is taken"):
        workflow.save("bob", sid, "anger", "Brows lowered.", "submitted", 0, url=url)
    assert workflow.get_record(sid, "bob", url=url)["response"] is None
    # bob's draft is kept (drafts fill no slot), but his submission stays refused.
    workflow.save("bob", sid, "anger", "Brows lowered.", "draft", 0, url=url)
    with pytest.raises(workflow.ClaimRefused):
        workflow.save("bob", sid, "anger", "Brows lowered.", "submitted", 1, url=url)
    assert workflow.progress("faces", url=url)["submitted"] == 1
    # With room for two annotators the second submission claims the second slot.
    set_overlap(url, 2)
    assert workflow.save("bob", sid, "anger", "Brows lowered.", "submitted", 1,
                         url=url)["status"] == "submitted"
    assert workflow.progress("faces", url=url)["complete"] >= 1


def test_eight_annotators_race_for_claims_none_lost_none_over_capacity(team):
    """8 annotators work the queue at once (2 per record, 24 records) until it is empty. On
    PostgreSQL this is the row-locked claim path (SELECT ... FOR UPDATE in
    annotation/workflow/queue.py `claim`); on SQLite the file lock. Every record ends with exactly 2 submissions by 2 different
    annotators: no claim given twice, no submission lost, no record over its overlap, and
    every annotator who lost a race was told so by getting another record (or None)."""
    url = team
    set_overlap(url, 2)
    with session_scope(url) as s:
        dataset_id = s.scalars(select(Dataset.id).where(Dataset.name == "faces")).one()
        for i in range(18):  # 6 imported + 18 rows: the queue never reads the media itself
            s.add(Sample(dataset_id=dataset_id, media_path=f"/race/{i}.png",
                         content_hash=f"{i:064x}", modality="image", label="happiness",
                         split="train", meta={}))
    with session_scope(url) as s:
        sample_ids = set(s.scalars(select(Sample.id).where(Sample.dataset_id == dataset_id)))
    names = [f"racer{i}" for i in range(8)]
    for name in names:
        add_user(name, "annotator", PASSWORD, url=url)
    barrier = threading.Barrier(len(names), timeout=60)

    def work(name: str) -> list[tuple[int, int]]:
        barrier.wait()
        done = []
        while (record := workflow.next_record(name, "faces", url=url)) is not None:
            saved = workflow.save(name, record["sample_id"], "happiness",
                                  f"{name}: cheeks raised", "submitted", 0, url=url)
            done.append((record["sample_id"], saved["version"]))
        return done

    with ThreadPoolExecutor(len(names)) as pool:
        results = dict(zip(names, pool.map(work, names)))

    per_record = Counter(sid for done in results.values() for sid, _ in done)
    assert per_record == {sid: 2 for sid in sample_ids}
    for name, done in results.items():
        assert len({sid for sid, _ in done}) == len(done)        # never the same record twice
        assert all(version == 1 for _, version in done)
    with session_scope(url) as s:
        stored = Counter(s.scalars(select(Response.sample_id).where(
            Response.status == "submitted")))
        history = s.scalar(select(func.count()).select_from(ResponseHistory).where(
            ResponseHistory.action == "submitted"))
    assert stored == per_record and history == 48                # what the threads saw is stored
    stats = workflow.progress("faces", url=url)
    assert (stats["complete"], stats["submitted"]) == (24, 48)
    assert all(workflow.next_record(name, "faces", url=url) is None for name in names)
