"""Importers against small generated copies of each dataset's real on-disk layout, broken rows included."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from annotation.ingest import import_dataset
from core.media import content_hash
from core.errors import UserError
from db.models import Dataset, Sample
from db.session import session_scope
from tests.conftest import write_png
from tests.media_files import ramp_frames
from tests.media_files import write_video as _write_video


def samples(url: str, name: str) -> list[Sample]:
    with session_scope(url) as s:
        ds = s.scalars(select(Dataset).where(Dataset.name == name)).one()
        return list(s.scalars(select(Sample).where(Sample.dataset_id == ds.id).order_by(Sample.id)))


def reasons(summary) -> str:
    return " | ".join(f"{where}: {why}" for where, why in summary.broken)


def write_video(path, frames):
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_video(path, frames)


def write_frames(folder, seed: int, n: int = 3):
    for i in range(n):
        write_png(folder / f"{i + 1:05d}.png", seed * 100 + i)
    return folder


# ----------------------------------------------------------------------------- RAF-DB

def make_rafdb(root):
    (root / "EmoLabel").mkdir(parents=True)
    lines = []
    for i, code in enumerate([1, 2, 3, 4, 5, 6, 7], 1):
        name = f"train_{i:05d}.jpg" if i <= 5 else f"test_{i:04d}.jpg"
        write_png(root / "Image" / "original" / name, seed=i, size=24)
        if i != 2:  # one image only in original/: the importer falls back to it
            write_png(root / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg"), seed=50 + i)
        lines.append(f"{name} {code}")
    truncated = root / "Image" / "aligned" / "train_00008_aligned.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:200])
    lines += ["train_00008.jpg 4", "train_00009.jpg 9", "not a row", "train_00010.jpg 3"]
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root


def test_rafdb_import_is_idempotent_and_reports_broken_rows(db_url, tmp_path):
    root = make_rafdb(tmp_path / "basic")
    summary = import_dataset("rafdb", root, "raf", url=db_url, progress=False)
    assert summary.added == 7 and summary.skipped == 0
    assert summary.by_split == {"train": 5, "test": 2}
    assert summary.by_label["surprise"] == 1 and summary.by_label["neutral"] == 1
    text = reasons(summary)
    assert len(summary.broken) == 4, text
    assert ":9:" in text and "code 1-7" in text           # label code 9
    assert "not a row" in text
    assert "train_00010" in text and "no such file" in text
    assert "train_00008" in text and "corrupt or truncated" in text

    rows = samples(db_url, "raf")
    by_file = {r.meta["file"]: r for r in rows}
    assert by_file["train_00002.jpg"].meta["variant"] == "original"
    assert by_file["train_00001.jpg"].meta["variant"] == "aligned"
    assert by_file["train_00001.jpg"].label == "surprise"  # code 1
    assert by_file["train_00001.jpg"].meta["aligned"] is True     # aligned/: a face crop
    assert by_file["train_00002.jpg"].meta["aligned"] is False    # original photo
    assert by_file["test_0007.jpg"].split == "test" and by_file["test_0007.jpg"].label == "neutral"
    assert all(r.content_hash == content_hash(r.media_path) for r in rows)

    again = import_dataset("rafdb", root, "raf", url=db_url, progress=False)
    assert (again.added, again.skipped) == (0, 7)
    assert len(samples(db_url, "raf")) == 7


def test_import_cli_json_and_one_line_errors(db_url, tmp_path, monkeypatch, capsys):
    import app

    monkeypatch.setenv("EMO_DB_URL", db_url)
    root = make_rafdb(tmp_path / "basic")
    assert app.main(["import", "--format", "rafdb", str(root), "--name", "raf", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["added"] == 7 and len(out["broken"]) == 4 and out["by_split"]["test"] == 2

    assert app.main(["import", "--format", "rafdb", str(tmp_path / "nowhere"), "--name", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no such file" in err and "\n" not in err
    assert app.main(["import", "--format", "ferplus", str(root)]) == 2
    assert "fer2013new.csv" in capsys.readouterr().err


# ----------------------------------------------------------------------------- AffectNet

def test_affectnet_codes_non_expressions_and_label_sets(db_url, tmp_path):
    root = tmp_path / "AffectNet"
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True)
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
    train = [header]
    for i, code in enumerate([0, 1, 7, 8, 9, 10, 3]):
        rel = f"{i}/img{i}.jpg"
        write_png(root / "Manually_Annotated_Images" / rel, seed=200 + i)
        train.append(f'{rel},10,12,80,80,"1.0;2.0",{code},0.5,-0.25')
    train.append("5/missing.jpg,0,0,1,1,,2,0,0")
    train.append("6/img6.jpg,0,0,1,1,,seven,0,0")
    (lists / "training.csv").write_text("\n".join(train) + "\n")
    write_png(root / "Manually_Annotated_Images" / "9" / "val.jpg", seed=299)
    (lists / "validation.csv").write_text(header + "\n9/val.jpg,1,1,50,50,,6,-0.6,0.7\n")

    summary = import_dataset("affectnet", root, "an8", url=db_url, progress=False)
    assert summary.added == 5, reasons(summary)        # 0, 1, 7 (contempt), 3, validation 6
    assert summary.excluded == {"code 8 (none)": 1, "code 9 (uncertain)": 1, "code 10 (no-face)": 1}
    assert len(summary.broken) == 2 and "missing.jpg" in reasons(summary) and "not 0-10" in reasons(summary)
    rows = samples(db_url, "an8")
    assert {r.label for r in rows} == {"neutral", "happiness", "contempt", "surprise", "anger"}
    test_row = next(r for r in rows if r.split == "test")
    assert test_row.label == "anger" and test_row.meta["valence"] == -0.6
    with session_scope(db_url) as s:
        assert "contempt" in s.scalars(select(Dataset.label_set).where(Dataset.name == "an8")).one()

    seven = import_dataset("affectnet", root, "an7", url=db_url, progress=False, label_set="basic7")
    assert seven.added == 4 and seven.excluded["contempt (not in basic7)"] == 1


# ----------------------------------------------------------------------------- FERPlus

def test_ferplus_majority_votes(db_url, tmp_path):
    root = tmp_path / "FERPlus"
    rows = ["Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"]
    votes = {"fer0000000.png": ("Training", "0,10,0,0,0,0,0,0,0,0"),   # happiness
             "fer0000001.png": ("Training", "4,0,0,0,0,0,0,0,0,0"),    # neutral (few votes still win)
             "fer0000002.png": ("PublicTest", "5,5,0,0,0,0,0,0,0,0"),  # tie
             "fer0000003.png": ("PrivateTest", "0,0,0,0,0,0,0,0,6,4"),  # unknown majority
             "fer0000004.png": ("Training", "0,0,0,0,0,0,0,0,0,10"),   # not a face
             "fer0000005.png": ("PublicTest", "0,0,1,0,0,0,0,9,0,0"),  # contempt
             "fer0000006.png": ("PrivateTest", "0,0,0,8,2,0,0,0,0,0")}  # sadness
    folders = {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}
    for i, (name, (usage, counts)) in enumerate(votes.items()):
        grey = np.random.default_rng(i).integers(0, 256, (48, 48), dtype=np.uint8)
        (root / folders[usage]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey, mode="L").save(root / folders[usage] / name)
        rows.append(f"{usage},{name},{counts}")
    rows.append("Training,,10,0,0,0,0,0,0,0,0,0")       # FER2013 row with no image
    rows.append("Training,fer0000099.png,x,y,0,0,0,0,0,0,0,0")
    (root / "fer2013new.csv").write_text("\n".join(rows) + "\n")

    summary = import_dataset("ferplus", root, "ferplus", url=db_url, progress=False)
    assert summary.added == 4, reasons(summary)
    assert summary.excluded == {"tied votes": 1, "unknown majority": 1, "nf majority": 1,
                                "no image for this FER2013 row": 1}
    assert len(summary.broken) == 1 and "vote counts" in summary.broken[0][1]
    got = {r.meta["file"]: (r.label, r.split) for r in samples(db_url, "ferplus")}
    assert got == {"fer0000000.png": ("happiness", "train"), "fer0000001.png": ("neutral", "train"),
                   "fer0000005.png": ("contempt", "val"), "fer0000006.png": ("sadness", "test")}


# ----------------------------------------------------------------------------- videos

def test_dfew_folds_frame_folders_and_videos(db_url, tmp_path):
    root = tmp_path / "DFEW"
    write_frames(root / "Clip" / "clip_224x224" / "00001", seed=1)
    write_frames(root / "Clip" / "clip_224x224" / "00002", seed=2)
    write_frames(root / "Clip" / "clip_224x224_16f" / "00002", seed=3, n=2)  # fewer frames: not chosen
    write_video(root / "Clip" / "original" / "00004.mp4", ramp_frames(4, 32, 32))
    (root / "Clip" / "original" / "00005.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    write_frames(root / "Clip" / "clip_224x224" / "00009", seed=9)           # in no split list
    splits = root / "EmoLabel_DataSplit"
    (splits / "train(single-labeled)").mkdir(parents=True)
    (splits / "test(single-labeled)").mkdir(parents=True)
    (splits / "train(single-labeled)" / "set_1.csv").write_text(
        "video_name,label\n2,2\n4,4\n5,5\n6,0\n7,3\n")
    (splits / "test(single-labeled)" / "set_1.csv").write_text("video_name,label\n1,1\n")
    (splits / "train(single-labeled)" / "set_2.csv").write_text("video_name,label\n1,1\n")
    (splits / "test(single-labeled)" / "set_2.csv").write_text("video_name,label\n2,2\n4,6\n")

    summary = import_dataset("dfew", root, "dfew", url=db_url, progress=False)
    assert summary.modality == "video"
    assert summary.added == 2, reasons(summary)
    text = reasons(summary)
    assert "clip 7 not found" in text                       # listed, not on disk
    assert "00005.mp4" in text                              # not a video
    assert "clip 4 is disgust here but anger" in text         # contradicting split lists
    assert summary.excluded["not single-labelled"] == 1     # label 0
    assert any("1 clips on disk" in n for n in summary.notes)
    rows = {r.meta["clip"]: r for r in samples(db_url, "dfew")}
    assert rows["1"].label == "happiness" and rows["1"].split == "test" and rows["1"].meta["fold"] == 1
    assert rows["2"].label == "sadness" and rows["2"].split == "train" and rows["2"].meta["fold"] == 2
    assert rows["2"].media_path.endswith("clip_224x224/00002")

    fold2 = import_dataset("dfew", root, "dfew-fold2", url=db_url, progress=False, fold=2)
    assert {r.meta["clip"]: r.split for r in samples(db_url, "dfew-fold2")} == {"1": "train", "2": "test"}
    assert fold2.added == 2


def test_mafw_lists_captions_and_videos(db_url, tmp_path):
    root = tmp_path / "MAFW"
    write_video(root / "data" / "clips" / "00001.mp4", ramp_frames(4, 32, 32))
    write_frames(root / "data" / "frames" / "00001", seed=11)  # same clip as frames: video wins
    write_frames(root / "data" / "frames" / "00002", seed=12)
    write_frames(root / "data" / "frames" / "00003", seed=13)
    plain = root / "Train & Test Set" / "single" / "no_caption" / "set_1"
    captions = root / "Train & Test Set" / "single" / "with_caption" / "set_1"
    plain.mkdir(parents=True)
    captions.mkdir(parents=True)
    (plain / "train.txt").write_text("00001.mp4 anxiety\n00002.mp4 helplessness\n00004.mp4 anger\n")
    (plain / "test.txt").write_text("00003.mp4 disappointment\n00005.mp4 confusion\n")
    (captions / "train.txt").write_bytes("00001.mp4 anxiety She bites her lip and glances around.\n"
                                         .encode("gb18030"))
    summary = import_dataset("mafw", root, "mafw", url=db_url, progress=False)
    assert summary.added == 3, reasons(summary)
    assert "clip 00004.mp4 not found" in reasons(summary) and "confusion" in reasons(summary)
    rows = {r.meta["clip"]: r for r in samples(db_url, "mafw")}
    assert rows["00001.mp4"].media_path.endswith("00001.mp4")
    assert rows["00001.mp4"].meta["description"] == "She bites her lip and glances around."
    assert rows["00003.mp4"].split == "test" and rows["00003.mp4"].label == "disappointment"
    with session_scope(db_url) as s:
        assert len(s.scalars(select(Dataset.label_set).where(Dataset.name == "mafw")).one()) == 11


def test_ferv39k_scene_lists(db_url, tmp_path):
    root = tmp_path / "FERV39k"
    clips = root / "2_ClipsforFaceCrop"
    write_frames(clips / "Action" / "Happy" / "0001", seed=21)
    write_frames(clips / "Talkshow" / "Sad" / "0007", seed=22)
    lists = root / "4_setups" / "All_scenes"
    lists.mkdir(parents=True)
    (lists / "train_All.csv").write_text("Action/Happy/0001 Happy\nAction/Happy/0404 Happy\n"
                                         "Action/Weird/0002 Bored\n")
    (lists / "test_All.csv").write_text("Talkshow/Sad/0007 Sad\n")
    summary = import_dataset("ferv39k", root, "ferv", url=db_url, progress=False)
    assert summary.added == 2 and len(summary.broken) == 2, reasons(summary)
    rows = {r.meta["clip"]: r for r in samples(db_url, "ferv")}
    assert rows["Talkshow/Sad/0007"].split == "test" and rows["Talkshow/Sad/0007"].label == "sadness"
    assert rows["Action/Happy/0001"].meta["scene"] == "Action"


# ----------------------------------------------------------------------------- folder, csv

def test_folder_layout_with_splits(db_url, tmp_path):
    root = tmp_path / "mine"
    write_png(root / "train" / "Happy" / "a.png", 1)
    write_png(root / "train" / "1_angry" / "b.png", 2)
    write_png(root / "val" / "sad" / "c.png", 3)
    write_png(root / "val" / "sad" / "c_copy.png", 3)            # same bytes: one sample
    write_png(root / "test" / "bored" / "d.png", 4)              # not an expression
    (root / "train" / "Happy" / "notes.txt").write_text("hello")
    (root / "train" / "Happy" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    summary = import_dataset("folder", root, url=db_url, progress=False)
    assert summary.dataset == "mine" and summary.added == 3 and summary.skipped == 1
    assert {where.split("/")[-1] for where, _ in summary.broken} == {"bored", "broken.png"}
    assert any("1 items" in n for n in summary.notes)
    assert {(r.label, r.split) for r in samples(db_url, "mine")} == {
        ("happiness", "train"), ("anger", "train"), ("sadness", "val")}


def test_generic_csv(db_url, tmp_path):
    write_png(tmp_path / "img" / "a.png", 1)
    write_png(tmp_path / "img" / "b.png", 2)
    write_png(tmp_path / "img" / "c.png", 3)
    absolute = write_png(tmp_path / "elsewhere" / "d.png", 4)
    (tmp_path / "labels.csv").write_text(
        "path,label,split\nimg/a.png,happy,train\nimg/b.png,,test\n"
        f"{absolute},Surprised,validation\nimg/c.png,bored,train\nimg/c.png,sad,holdout\n"
        "img/zzz.png,sad,train\n")
    summary = import_dataset("csv", tmp_path / "labels.csv", "mine", url=db_url, progress=False)
    assert summary.added == 3 and len(summary.broken) == 3, reasons(summary)
    assert summary.by_label == {"happiness": 1, "unlabelled": 1, "surprise": 1}
    assert {(r.label, r.split) for r in samples(db_url, "mine")} == {
        ("happiness", "train"), (None, "test"), ("surprise", "val")}


def test_bad_requests_raise_user_errors(db_url, tmp_path):
    with pytest.raises(UserError, match="unknown format"):
        import_dataset("kinetics", tmp_path, "x", url=db_url, progress=False)
    with pytest.raises(UserError, match="dataset name"):
        import_dataset("folder", tmp_path, "bad name!", url=db_url, progress=False)
    write_png(tmp_path / "vid" / "happy" / "a.png", 1)
    import_dataset("folder", tmp_path / "vid", "same", url=db_url, progress=False)
    write_video(tmp_path / "v" / "happy" / "clip.mp4", ramp_frames(4, 32, 32))
    with pytest.raises(UserError, match="holds images"):
        import_dataset("folder", tmp_path / "v", "same", url=db_url, progress=False)


# ----------------------------------------------------------------------------- through the CLI
# (a subprocess, as a user runs it: what reaches the terminal is what is asserted)

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-live-0123456789abcdefSECRET"
PASSWORD = "hunter2-admin-PASSWORD"


def cli(tmp_path, db_url, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMO_DB_URL": db_url, "EMO_DATA_DIR": str(tmp_path / "data"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("EMO_IMPORT_ROOTS", None)
    return subprocess.run([sys.executable, str(REPO / "app.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_quote_is_short_and_escaped():
    from annotation.formats.quoting import quote as _quote

    quoted = _quote("GEMINI_API_KEY=" + SECRET + "\n\x00\x1b[31m" * 20)
    assert len(quoted) <= 40 + 3 and quoted.startswith("'GEMINI_API_KEY=") and quoted.endswith("…'")
    assert not any(ch in quoted for ch in "\n\x00\x1b\r")
    assert _quote("a\rb\x00c") == "'a\\rb\\x00c'"                 # repr-like escapes
    assert _quote("/very/long/" + "x" * 80 + "/zzz.png", tail=True).endswith("/zzz.png'")


def test_an_environment_dump_imported_as_csv_never_shows_its_secrets(tmp_path, db_url):
    """/proc/self/environ through the CLI: every row broken, no value of it in any message."""
    lines = [f"GEMINI_API_KEY={SECRET}", f"EMO_ADMIN_PASSWORD={PASSWORD}",
             f"LIST=a,{SECRET},{PASSWORD}",                   # commas: cells of a 'CSV'
             f"X=1,GEMINI_API_KEY={SECRET}{SECRET}"]
    environ = tmp_path / "environ"
    environ.write_text("\n".join(lines) + "\n")
    nul = tmp_path / "environ-nul"                            # the real file's NUL separators
    nul.write_bytes(b"\0".join(line.encode() for line in lines) + b"\0")
    for path in (environ, nul):
        for extra in ((), ("--json",)):
            done = cli(tmp_path, db_url, "import", "--format", "csv", str(path), "--quiet", *extra)
            shown = done.stdout + done.stderr
            assert done.returncode == 0, shown
            assert "Traceback" not in shown
            for secret in (SECRET, PASSWORD, SECRET[:12], PASSWORD[:10]):
                assert secret not in shown, (secret, shown)
            if extra:
                summary = json.loads(done.stdout)
                assert summary["added"] == 0 and summary["broken"]
                assert all(len(b["reason"]) <= 300 for b in summary["broken"])


def test_the_store_s_own_files_are_not_importable_even_from_the_cli(tmp_path, db_url):
    data = tmp_path / "data"
    data.mkdir()
    (data / "secret_key").write_text(f"{SECRET}\n")
    store = db_url.removeprefix("sqlite:///")
    for path in (str(data / "secret_key"), store, str(data)):
        done = cli(tmp_path, db_url, "import", "--format", "csv", path)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("error:") and done.stderr.count("\n") == 1, done.stderr
        assert "store's own files" in done.stderr and SECRET not in done.stderr
    # A CSV row naming the key file: a broken row, not a sample.
    (tmp_path / "rows.csv").write_text(f"{data / 'secret_key'},happy\n")
    done = cli(tmp_path, db_url, "import", "--format", "csv", str(tmp_path / "rows.csv"), "--json")
    summary = json.loads(done.stdout)
    assert summary["added"] == 0 and "store's own files" in summary["broken"][0]["reason"]
    assert SECRET not in done.stdout + done.stderr


def test_malformed_csv_rows_are_reported_never_fatal(tmp_path, db_url):
    """Stray CR, NUL, undecodable bytes, a huge field, an unclosed quote: reported rows."""
    for i in range(3):
        write_png(tmp_path / "img" / f"{i}.png", 500 + i)
    rows = [b"path,label,split", b"img/0.png,happy,train",
            b"img/1.png,sa\rd,train",                       # a stray CR inside a field
            b"img/\x00x.png,happy,train",                   # a NUL byte
            b"img/\xff\xfe.png,happy,train",               # not UTF-8
            b"img/big.png," + b"y" * 300_000 + b",train",   # over the csv field limit
            b"img/2.png,angry,test",
            b'"img/unclosed.png,happy,train', b"img/x.png,happy,train"]   # an unclosed quote to EOF
    (tmp_path / "bad.csv").write_bytes(b"\n".join(rows) + b"\n")
    done = cli(tmp_path, db_url, "import", "--format", "csv", str(tmp_path / "bad.csv"), "--json")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    summary = json.loads(done.stdout)
    assert summary["added"] == 2 and summary["by_split"] == {"test": 1, "train": 1}
    broken = {b["where"]: b["reason"] for b in summary["broken"]}
    assert "carriage return" in broken["bad.csv:3"]
    assert "control or undecodable" in broken["bad.csv:4"]
    assert "control or undecodable" in broken["bad.csv:5"]
    assert "over 131,072 characters" in broken["bad.csv:6"]
    assert "unclosed quote" in broken["bad.csv:8-9"]
    assert "yyyy" not in done.stdout
    plain = cli(tmp_path, db_url, "import", "--format", "csv", str(tmp_path / "bad.csv"))
    assert plain.returncode == 0 and "2 already there, 5 broken" in plain.stdout, plain.stdout


def fer2013_rows() -> tuple[list[str], dict]:
    """FER2013's own layout: emotion,pixels,Usage; good rows of each usage and broken ones."""
    rng = np.random.default_rng(13)
    crop = lambda: " ".join(str(v) for v in rng.integers(0, 256, 48 * 48))  # noqa: E731
    good = [(3, "Training"), (0, "Training"), (6, "PublicTest"), (4, "PrivateTest"),
            (5, "PrivateTest")]
    rows = ["emotion,pixels,Usage"] + [f"{code},{crop()},{usage}" for code, usage in good]
    rows.append(rows[1])                                         # a duplicate crop: stored once
    rows += [f"2,{crop()[:-4]},Training",                        # 2303 values
             f"1,{crop().replace(' ', ' x', 1)},Training",       # non-numeric
             f"2,{' '.join(['300'] * 2304)},Training",           # out of range
             f"9,{crop()},Training",                             # no such emotion
             f"2,{crop()},Holdout"]                              # unknown usage
    return rows, {"good": good}


def test_fer2013_csv_import_through_the_cli(tmp_path, db_url):
    rows, _ = fer2013_rows()
    table = tmp_path / "fer2013.csv"
    table.write_text("\n".join(rows) + "\n")
    done = cli(tmp_path, db_url, "import", "--format", "fer2013", str(table), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["dataset"] == "fer2013" and summary["added"] == 5 and summary["skipped"] == 1
    assert summary["by_split"] == {"test": 2, "train": 3, "val": 1}
    assert summary["by_label"] == {"anger": 1, "happiness": 2, "neutral": 1, "sadness": 1,
                                   "surprise": 1}
    reasons_ = [b["reason"] for b in summary["broken"]]
    assert len(reasons_) == 5, reasons_
    assert any("2303 pixel values, expected 2304" in r for r in reasons_)
    assert any("pixel value 'x" in r and "is not a whole number" in r for r in reasons_)
    assert any("0-255" in r for r in reasons_)
    assert any("emotion '9' is not 0-6" in r for r in reasons_)
    assert any("Usage 'Holdout' is not Training, PublicTest or PrivateTest" in r for r in reasons_)

    stored = samples(db_url, "fer2013")
    assert len(stored) == 5 and all(r.meta["aligned"] is True for r in stored)
    root = (tmp_path / "data" / "datasets" / "fer2013").resolve()
    for row in stored:
        path = Path(row.media_path)
        assert path.parent == root / row.split and path.suffix == ".png"
        with Image.open(path) as img:
            assert img.size == (48, 48) and img.mode == "L"
        assert row.content_hash == content_hash(path)
    assert {(r.label, r.split, r.meta["usage"]) for r in stored} >= {
        ("happiness", "train", "Training"), ("neutral", "val", "PublicTest"),
        ("sadness", "test", "PrivateTest")}

    again = cli(tmp_path, db_url, "import", "--format", "fer2013", str(table), "--json")
    assert json.loads(again.stdout)["added"] == 0 and json.loads(again.stdout)["skipped"] == 6
    assert len(samples(db_url, "fer2013")) == 5

    only = cli(tmp_path, db_url, "import", "--format", "fer2013", str(table), "--name", "ferpt",
               "--split", "test", "--json")
    summary = json.loads(only.stdout)
    assert summary["added"] == 2 and summary["by_split"] == {"test": 2}
    # The usage is read before the pixels: other splits' rows are left out, broken or not.
    assert summary["excluded"] == {"train rows (not --split test)": 6,
                                   "val rows (not --split test)": 1}


def test_fer2013_real_excerpt_when_present(tmp_path, db_url):
    """The 280 real rows in ../shared (absent in a fresh clone: then skipped)."""
    excerpt = REPO.parent / "shared" / "data" / "fer2013" / "fer2013-excerpt.csv"
    if not excerpt.exists():
        pytest.skip("no ../shared/data/fer2013 here")
    summary = import_dataset("fer2013", excerpt, "ferx", url=db_url, progress=False,
                             media_dir=tmp_path / "media")
    assert not summary.broken and summary.added + summary.skipped == 280
    assert summary.by_split == {"train": 140, "val": 140}
    assert set(summary.by_label.values()) == {40}


@pytest.mark.store_backends("sqlite", "postgresql")   # the face-crop flag is read with JSON SQL
def test_folder_split_folders_split_option_and_face_crops(tmp_path, db_url):
    fer = tmp_path / "fer2013"
    for i, (split, label) in enumerate([("train", "happy"), ("train", "angry"), ("validation", "sad"),
                                        ("test", "neutral"), ("test", "fear")]):
        write_png(fer / split / label / f"{i}.png", 700 + i)
    done = cli(tmp_path, db_url, "import", "--format", "folder", str(fer), "--aligned", "--json")
    summary = json.loads(done.stdout)
    assert summary["by_split"] == {"test": 2, "train": 2, "val": 1}, done.stdout
    assert all(r.meta["aligned"] is True for r in samples(db_url, "fer2013"))

    plus = tmp_path / "ferplus-folders"                         # FERPlus-style names
    for i, split in enumerate(["FER2013Train", "FER2013Valid", "FER2013Test"]):
        write_png(plus / split / "happy" / f"{i}.png", 800 + i)
    summary = json.loads(cli(tmp_path, db_url, "import", "--format", "folder", str(plus),
                             "--json").stdout)
    assert summary["by_split"] == {"test": 1, "train": 1, "val": 1}

    flat = tmp_path / "flat"                                    # no split folders
    write_png(flat / "happy" / "a.png", 900)
    write_png(flat / "sad" / "b.png", 901)
    summary = json.loads(cli(tmp_path, db_url, "import", "--format", "folder", str(flat),
                             "--split", "test", "--json").stdout)
    assert summary["by_split"] == {"test": 2}
    assert {r.split for r in samples(db_url, "flat")} == {"test"}
    assert all("aligned" not in r.meta for r in samples(db_url, "flat"))

    # --split with split folders: only that split; --no-aligned updates what is stored.
    done = cli(tmp_path, db_url, "import", "--format", "folder", str(fer), "--split", "val",
               "--no-aligned")
    assert done.returncode == 0 and "1 already there" in done.stdout, done.stdout
    assert "no longer marked as face crops" in done.stdout
    flags = {r.split: r.meta["aligned"] for r in samples(db_url, "fer2013")}
    assert flags == {"val": False, "train": True, "test": True}

    bad = cli(tmp_path, db_url, "import", "--format", "folder", str(flat), "--split", "holdout")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
