"""The comparison table (annotation/table.py): versions side by side on dataset splits, as
`python app.py table`, as a job (kind "table"), with its Markdown, PNG and JSON files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from annotation import jobs
from annotation.evaluate import evaluate_version
from annotation.table import compare_versions, markdown
from core.errors import UserError
from db.session import dispose_engine, init_db
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)
from tests.test_jobs import ended, faces_folder, wait

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def faces(tmp_path, monkeypatch):
    """A store with one tiny labelled dataset "faces" (3 test samples: happy, sad, angry)."""
    from annotation.ingest import import_dataset

    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path / "data"))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("EMO_DB_URL", url)
    init_db(url)
    import_dataset("folder", faces_folder(tmp_path / "faces", n_train=1, n_test=3), "faces", url=url,
                   progress=False)
    yield tmp_path, url
    dispose_engine(url)


def test_the_table_has_the_numbers_evaluate_reports_and_its_files(faces, tiny_checkpoint):  # noqa: F811
    root, url = faces
    tiny = str(tiny_checkpoint)
    table = compare_versions(["prior-only", tiny, "no-such-version"], "faces", "test", url=url,
                             out=root / "table")
    for version in ("prior-only", tiny):
        expected = evaluate_version(version, "faces", "test", url=url)
        row = next(r for r in table["rows"] if r["version"] == version)
        assert row["error"] is None
        assert row["cells"]["faces"] == {"uar": expected["uar"], "war": expected["war"],
                                         "n": expected["n"]}
        assert f"{100 * expected['uar']:.2f}" in table["markdown"]
    bad = table["rows"][2]
    assert bad["cells"]["faces"].keys() == {"error"} and "\n" not in bad["error"]
    assert "no-such-version" in bad["error"]
    assert f"error: {bad['error']}" in table["markdown"].splitlines()[4]

    # The files: Markdown as returned, a real PNG, JSON with the same rows.
    files = table["files"]
    assert Path(files["markdown"]).read_text().strip() == table["markdown"]
    with Image.open(files["png"]) as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert json.loads(Path(files["json"]).read_text())["rows"] == table["rows"]


def test_the_best_of_each_column_is_bold_and_errors_stay_in_their_row():
    table = {"datasets": ["a", "b"], "split": "test",
             "rows": [{"version": "x", "error": None,
                       "cells": {"a": {"uar": 0.5, "war": 0.25, "n": 4},
                                 "b": {"uar": 0.1, "war": 0.9, "n": 10}}},
                      {"version": "y|z", "error": "b: broken <checkpoint>",
                       "cells": {"a": {"uar": 0.75, "war": 0.25, "n": 4}, "b": {"error": "broken"}}}]}
    table["best"] = {"a": {"uar": 0.75, "war": 0.25}, "b": {"uar": 0.1, "war": 0.9}}
    lines = markdown(table).splitlines()
    assert lines[0] == "| Model | a UAR | a WAR | b UAR | b WAR | Note |"
    assert lines[2] == "| x | 50.00 | **25.00** | **10.00** | **90.00** |  |"
    assert lines[3] == "| y\\|z | **75.00** | **25.00** | — | — | error: b: broken &lt;checkpoint&gt; |"
    assert "a n=4, b n=10" in lines[-1]


def test_bad_arguments_are_one_line_errors(faces):
    _, url = faces
    with pytest.raises(UserError, match="at least one version"):
        compare_versions(" , ", "faces", url=url)
    with pytest.raises(UserError, match="split must be one of"):
        compare_versions("prior-only", "faces", "dev", url=url)


def test_the_cli_prints_the_markdown_and_the_job_gives_the_same_table(faces):
    root, url = faces
    env = {**os.environ, "EMO_DB_URL": url, "EMO_DATA_DIR": str(root / "data")}
    cli = subprocess.run([sys.executable, "app.py", "table", "--dataset", "faces", "--split", "test",
                          "--versions", "prior-only,nope", "--out", str(root / "cli")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    printed = cli.stdout.strip()
    assert printed.startswith("| Model | faces UAR | faces WAR | Note |")
    assert printed == (root / "cli" / "table.md").read_text().strip()
    assert "| nope | — | — | error: " in printed

    job_id = jobs.start_job("table", {"versions": ["prior-only", "nope"], "datasets": ["faces"]}, url)
    status = wait(job_id, url, ended, timeout=300)
    assert status["status"] == "done", status
    assert status["result"]["markdown"] == printed
    assert status["done"] == status["total"] == 2
    assert Path(status["result"]["files"]["png"]).is_relative_to(jobs.job_dir(job_id))
    with pytest.raises(UserError, match="a table job needs datasets"):
        jobs.start_job("table", {"versions": ["prior-only"]}, url)


def test_a_checkpoint_evaluation_prepares_each_sample_once(faces, tiny_checkpoint, monkeypatch):  # noqa: F811
    """The category prompt and the explanation prompt (ROUGE-L) share one image-processor pass
    (and so one vision pass) per sample, as the engine's requests do."""
    import annotation.export
    from core.model.modeling import EmoLlama

    _, url = faces
    calls = []
    prepare_media = EmoLlama.prepare_media
    monkeypatch.setattr(EmoLlama, "prepare_media",
                        lambda self, *a, **k: calls.append(1) or prepare_media(self, *a, **k))
    # Every sample has an accepted explanation, so every one is also asked to explain itself.
    monkeypatch.setattr(annotation.export, "_accepted_corrections",
                        lambda s, dataset_id: {i: ("happy", "The cheeks are raised.", None)
                                               for i in range(1, 100)})
    report = evaluate_version(str(tiny_checkpoint), "faces", "test", url=url, record=False)
    assert report["n"] == 3 and report["rouge_l_n"] == 3
    assert len(calls) == 3
