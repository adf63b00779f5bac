"""Export snapshots: what goes in, byte-identical output, the HF datasets folder, the CLI."""
from __future__ import annotations

import filecmp
import json
import shutil

import pytest
from sqlalchemy import select

from annotation import workflow
from annotation.export import export_dataset, read_records, resolve_snapshot
from annotation.users import add_user
from core.errors import UserError
from db.models import ExportSnapshot, Sample, Suggestion
from db.session import session_scope

# Each test that uses db_url runs on SQLite and on a real PostgreSQL (tests/conftest.py).
STORE_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture
def reviewed(db_url, small_dataset, fast_passwords):
    """Two accepted corrections (train and test), one rejected, one accepted-then-edited."""
    add_user("ana", "annotator", "password1", url=db_url)
    add_user("rita", "reviewer", "password1", url=db_url)
    with session_scope(db_url) as s:
        ids = {(r.split, r.meta["file"]): r.id for r in s.scalars(select(Sample))}
    by_file = {file.split("/")[-1]: sid for (_, file), sid in ids.items()}
    plan = [("000.png", "happiness", "accepted"), ("004.png", "neutral", "accepted"),
            ("001.png", "sadness", "rejected"), ("002.png", "anger", "accepted")]
    for file, label, decision in plan:
        saved = workflow.save("ana", by_file[file], label, f"Because of the {label} cues.",
                              "submitted", 0, url=db_url)
        workflow.review("rita", saved["response_id"], decision, url=db_url)
    # Edited after acceptance: the acceptance no longer holds, so 002 is not exported.
    workflow.save("ana", by_file["002.png"], "anger", "Brows down and together.", "submitted", 1,
                  url=db_url)
    return db_url, by_file


def test_export_contains_accepted_corrections_only(reviewed, tmp_path):
    url, by_file = reviewed
    snap = export_dataset("faces", tmp_path / "out", url=url)
    assert snap.n_samples == 2 and snap.counts == {"train": 1, "test": 1}
    assert snap.path.name == f"faces-{snap.content_hash[:12]}"
    records = read_records(snap.path)
    assert [(r["sample_id"], r["task"]) for r in records] == [
        (by_file["000.png"], "category"), (by_file["000.png"], "conversation"),
        (by_file["004.png"], "category"), (by_file["004.png"], "conversation")]
    category, conversation = records[0], records[1]
    assert category["image"].endswith("000.png") and "video" not in category
    human, gpt = category["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert "Choose one from the following options: neutral, happiness" in human["value"]
    assert gpt == {"from": "gpt", "value": "happiness"}
    assert conversation["conversations"][1]["value"] == "Because of the happiness cues."
    assert category["split"] == "train" and records[2]["split"] == "test"
    assert category["source"] == "correction:ana"
    manifest = json.loads((snap.path / "manifest.json").read_text())
    assert manifest["content_hash"] == snap.content_hash and manifest["n_samples"] == 2

    import datasets

    hf = datasets.load_from_disk(str(snap.path / "hf"))
    assert set(hf) == {"train", "test"} and hf["train"].num_rows == 2 and hf["test"].num_rows == 2
    assert hf["train"][0]["conversations"] == category["conversations"]


def test_export_is_byte_identical_and_immutable(reviewed, tmp_path):
    url, by_file = reviewed
    first = export_dataset("faces", tmp_path / "out", url=url)
    kept = tmp_path / "first-copy"
    shutil.copytree(first.path, kept)
    shutil.rmtree(first.path)                    # force a rewrite of the same data
    second = export_dataset("faces", tmp_path / "out", url=url)
    assert (second.id, second.content_hash, second.path) == (first.id, first.content_hash, first.path)
    files = sorted(p.relative_to(kept) for p in kept.rglob("*") if p.is_file())
    assert files and all(filecmp.cmp(kept / f, second.path / f, shallow=False) for f in files)
    assert sorted(p.relative_to(second.path) for p in second.path.rglob("*") if p.is_file()) == files

    third = export_dataset("faces", tmp_path / "elsewhere", url=url)   # unchanged data, new --out
    assert third.reused and third.id == first.id and third.copied_from == first.path
    assert third.path == (tmp_path / "elsewhere" / first.path.name).resolve()
    assert all(filecmp.cmp(kept / f, third.path / f, shallow=False) for f in files)
    assert resolve_snapshot(first.id, url=url) == first.path        # the registry keeps its folder

    workflow.review("rita", workflow.next_review("rita", "faces", url=url)["response_id"],
                    "accepted", url=url)           # 002's edit accepted: new data, new snapshot
    changed = export_dataset("faces", tmp_path / "out", url=url)
    assert changed.id != first.id and changed.n_samples == 3 and changed.path != first.path
    assert (first.path / "manifest.json").exists()  # older snapshots stay as they were
    with session_scope(url) as s:
        assert s.scalar(select(ExportSnapshot.n_samples).where(ExportSnapshot.id == changed.id)) == 3
    assert resolve_snapshot(changed.id, url=url) == changed.path
    assert resolve_snapshot(str(first.path), url=url) == first.path


def test_suggestions_fill_in_only_when_asked(reviewed, tmp_path):
    url, by_file = reviewed
    with session_scope(url) as s:
        truth = {sid: s.get(Sample, sid).label for sid in by_file.values()}
        sid = by_file["003.png"]                  # no correction; ground truth happiness
        s.add_all([
            Suggestion(sample_id=sid, source="model:v1", prompt_version="p1", label=truth[sid],
                       explanation="Model: smile."),
            Suggestion(sample_id=sid, source="gemini:flash", prompt_version="p1", label=truth[sid],
                       explanation="Gemini: raised cheeks and a smile."),
            Suggestion(sample_id=sid, source="gemini:pro", prompt_version="p1", status="rejected",
                       reject_reason="label mismatch", label="fear", explanation="Scared."),
            Suggestion(sample_id=by_file["005.png"], source="gemini:flash", prompt_version="p1",
                       label="fear", explanation="Contradicts the ground truth."),
            Suggestion(sample_id=by_file["000.png"], source="gemini:flash", prompt_version="p1",
                       label=truth[by_file["000.png"]], explanation="Loses to the correction.")])
    plain = export_dataset("faces", tmp_path / "out", url=url)
    mixed = export_dataset("faces", tmp_path / "out", include_suggestions=True, url=url)
    assert mixed.content_hash != plain.content_hash and mixed.n_samples == 3
    assert mixed.sources == {"correction": 2, "suggestion": 1}
    answers = {(r["sample_id"], r["task"]): r for r in read_records(mixed.path)}
    filled = answers[(by_file["003.png"], "conversation")]
    assert filled["conversations"][1]["value"] == "Gemini: raised cheeks and a smile."
    assert filled["source"] == "suggestion:gemini:flash"
    assert answers[(by_file["000.png"], "category")]["source"] == "correction:ana"
    assert (by_file["005.png"], "category") not in answers


def test_nothing_to_export_and_cli(db_url, small_dataset, tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match="no accepted corrections"):
        export_dataset("faces", tmp_path, url=db_url)
    with pytest.raises(UserError, match="unknown dataset"):
        export_dataset("nope", tmp_path, url=db_url)
    import app

    monkeypatch.setenv("EMO_DB_URL", db_url)
    assert app.main(["export", "--dataset", "faces", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: nothing to export")
    with session_scope(db_url) as s:
        sid = s.scalars(select(Sample.id).where(Sample.label == "happiness")).first()
        s.add(Suggestion(sample_id=sid, source="gemini:flash", prompt_version="p1",
                         label="happiness", explanation="Smiling broadly."))
    assert app.main(["export", "--dataset", "faces", "--out", str(tmp_path),
                     "--include-suggestions", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_samples"] == 1 and (tmp_path / f"faces-{out['content_hash'][:12]}").is_dir()


def test_cli_export_of_unchanged_data_puts_the_snapshot_in_the_folder_asked_for(reviewed, tmp_path):
    """`export --out DIR` twice with unchanged data: DIR holds the files, and the CLI says so."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    url, _ = reviewed
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "EMO_DB_URL": url, "EMO_DATA_DIR": str(tmp_path / "data")}

    def export(out: Path) -> dict:
        done = subprocess.run([sys.executable, str(repo / "app.py"), "export", "--dataset",
                               "faces", "--out", str(out), "--json"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    first = export(tmp_path / "first")
    second = export(tmp_path / "second")
    assert second["reused"] and second["id"] == first["id"]
    assert Path(second["path"]).parent == (tmp_path / "second").resolve()
    assert second["copied_from"] == first["path"]
    files = sorted(p.relative_to(first["path"]) for p in Path(first["path"]).rglob("*") if p.is_file())
    assert files and all(filecmp.cmp(Path(first["path"]) / f, Path(second["path"]) / f,
                                     shallow=False) for f in files)
    done = subprocess.run([sys.executable, str(repo / "app.py"), "export", "--dataset", "faces",
                           "--out", str(tmp_path / "second")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "unchanged since snapshot" in done.stdout
    assert str((tmp_path / "second").resolve()) in done.stdout   # where the files are
    assert "nothing new written" in done.stdout                  # already there: said so
