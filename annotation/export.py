"""Export: an immutable, content-hashed snapshot of the accepted corrections of a dataset.

    python app.py export --dataset rafdb --out exports/ [--include-suggestions] [--json]

    from annotation.export import export_dataset
    snap = export_dataset("rafdb", out="exports")    # Snapshot(id, path, content_hash, n_samples, ...)

What goes in: per record, the submitted correction whose newest review of its present version
is "accepted" (several accepted annotators: the most recently accepted one). With
`include_suggestions`, a record with no accepted correction falls back to its best machine
suggestion: status ok, with a label and an explanation, agreeing with the ground truth when the
record has one; Gemini before model suggestions, newest first. Nothing else is exported.

The snapshot folder `<out>/<dataset>-<hash[:12]>/` holds:

    instructions.jsonl   two records per sample, LLaVA/FERID conversation format (below)
    hf/                  the same records as a Hugging Face `datasets` DatasetDict
                         (`datasets.load_from_disk(path / "hf")`), one split per source split
    manifest.json        dataset, modality, label set, counts per split, content hash

JSONL record format (one JSON object per line, UTF-8; records sorted by split train/val/test,
then sample id, then task category before conversation):

    {"id": "rafdb-1f3a...-category",         # <dataset>-<content hash[:16]>-<task>
     "image": "/abs/path/train_00001.jpg",    # "video" instead for video datasets (a file or
                                              #  a folder of frames)
     "conversations": [
        {"from": "human", "value": "<image>\\nWhat is the facial expression of the person in
                                    the image? Choose one from the following options: neutral,
                                    happiness, ..."},
        {"from": "gpt", "value": "happiness"}],
     "split": "train",                        # train | val | test, kept from the source dataset
     "label": "happiness",                    # canonical label of this answer
     "task": "category",                      # category | conversation
     "sample_id": 17, "content_hash": "<sha256 of the media>",
     "source": "correction:ana"}              # or "suggestion:gemini:<model>"

The conversation record asks for a free-form answer ("<image>\\nDescribe the facial
expression ... cite the facial evidence") and answers with the explanation text. The prompt
token is "<image>" for videos too (LLaMA-VID's convention: frames are image tokens).

The content hash is sha256 over the dataset name, the include-suggestions flag and the JSONL
bytes, so the same data gives the same folder, byte for byte, and a second export of unchanged
data returns the existing snapshot instead of writing a new one. Asked for another `out`
folder, it copies that snapshot there (`copied_from` says from where): whoever asked for files
in a folder finds them there. The registered snapshot keeps its first folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from core.errors import UserError
# The questions come from the recipe's defaults (core/model/recipe.py): export runs without a
# model, and the defaults are every checkpoint's unless its config.json says otherwise; training
# asks each record with the trained model's own phrasings (recipe.record_question).
from core.model.recipe import category_question, training_conversation_question
from db.models import Dataset, ExportSnapshot, Response, Review, Sample, Suggestion, User
from db.session import data_dir, session_scope

FORMAT = "emo-llama-instructions/1"
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class Snapshot:
    id: int
    path: Path
    content_hash: str
    n_samples: int
    dataset: str
    include_suggestions: bool
    counts: dict = field(default_factory=dict)   # split -> samples
    sources: dict = field(default_factory=dict)  # correction / suggestion -> samples
    reused: bool = False                         # unchanged data: an existing snapshot
    copied_from: Path | None = None              # reused and copied now into the `out` asked for

    def to_dict(self) -> dict:
        return {"id": self.id, "path": str(self.path), "content_hash": self.content_hash,
                "n_samples": self.n_samples, "dataset": self.dataset,
                "include_suggestions": self.include_suggestions, "counts": self.counts,
                "sources": self.sources, "reused": self.reused,
                "copied_from": str(self.copied_from) if self.copied_from else None}


def _accepted_corrections(session, dataset_id: int) -> dict[int, tuple[str, str, str]]:
    """sample id -> (label, explanation, source) of the most recently accepted correction."""
    latest = aliased(Review)
    newest_review = (select(func.max(latest.id))
                     .where(latest.response_id == Response.id,
                            latest.response_version == Response.version).scalar_subquery())
    rows = session.execute(
        select(Response.sample_id, Response.label, Response.explanation, User.name, Review.id)
        .join(Review, Review.response_id == Response.id)
        .join(Sample, Sample.id == Response.sample_id)
        .join(User, User.id == Response.user_id)
        .where(Sample.dataset_id == dataset_id, Response.status == "submitted",
               Review.id == newest_review, Review.decision == "accepted")
        .order_by(Response.sample_id, Review.id)).all()
    chosen = {}
    for sample_id, label, explanation, name, _ in rows:  # later reviews overwrite earlier ones
        if label and explanation:
            chosen[sample_id] = (label, explanation, f"correction:{name}")
    return chosen


def _best_suggestions(session, dataset_id: int) -> dict[int, tuple[str, str, str]]:
    rows = session.execute(
        select(Suggestion, Sample.label).join(Sample, Sample.id == Suggestion.sample_id)
        .where(Sample.dataset_id == dataset_id, Suggestion.status == "ok",
               Suggestion.label.is_not(None), Suggestion.explanation.is_not(None))
        .order_by(Suggestion.sample_id, Suggestion.id)).all()
    best: dict[int, tuple[tuple, tuple]] = {}
    for suggestion, truth in rows:
        if (truth and suggestion.label != truth) or not suggestion.explanation.strip():
            continue
        rank = (not suggestion.source.startswith("gemini"), -suggestion.id)
        if suggestion.sample_id not in best or rank < best[suggestion.sample_id][0]:
            best[suggestion.sample_id] = (rank, (suggestion.label, suggestion.explanation.strip(),
                                                 f"suggestion:{suggestion.source}"))
    return {sample_id: answer for sample_id, (_, answer) in best.items()}


def build_records(dataset: str, include_suggestions: bool = False,
                  url: str | None = None) -> tuple[dict, list[dict]]:
    """(dataset info, JSONL records) for a dataset, in their export order."""
    with session_scope(url) as session:
        ds = session.scalars(select(Dataset).where(Dataset.name == dataset)).first()
        if ds is None:
            raise UserError(f"unknown dataset {dataset!r}: import it first (python app.py import)")
        answers = _best_suggestions(session, ds.id) if include_suggestions else {}
        answers.update(_accepted_corrections(session, ds.id))  # corrections win
        samples = session.scalars(select(Sample).where(Sample.id.in_(list(answers)))).all() \
            if answers else []
        info = {"name": ds.name, "modality": ds.modality, "label_set": list(ds.label_set)}
    kind = "video" if info["modality"] == "video" else "image"
    records = []
    for sample in sorted(samples, key=lambda s: (SPLIT_ORDER.get(s.split, 9), s.id)):
        label, explanation, source = answers[sample.id]
        # A few phrasings of the free-form question, picked by content hash so every run agrees.
        for task, question, answer in (
                ("category", category_question(info["label_set"], kind), label),
                ("conversation", training_conversation_question(kind, sample.content_hash), explanation)):
            records.append({
                "id": f"{info['name']}-{sample.content_hash[:16]}-{task}",
                kind: sample.media_path,
                "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                  {"from": "gpt", "value": answer}],
                "split": sample.split, "label": label, "task": task, "sample_id": sample.id,
                "content_hash": sample.content_hash, "source": source,
                # A face crop is analysed as one (training: no detection); absent otherwise, so
                # the exports of other datasets stay byte-identical.
                **({"aligned": True} if (sample.meta or {}).get("aligned") else {})})
    return info, records


def _write_folder(folder: Path, info: dict, jsonl: bytes, records: list[dict],
                  manifest: dict) -> None:
    import datasets

    datasets.disable_progress_bars()
    folder.mkdir(parents=True)
    (folder / "instructions.jsonl").write_bytes(jsonl)
    splits = {}
    for split in SPLIT_ORDER:
        rows = [r for r in records if r["split"] == split]
        if rows:
            splits[split] = datasets.Dataset.from_list(rows)
    datasets.DatasetDict(splits).save_to_disk(str(folder / "hf"))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")


def export_dataset(dataset: str, out: str | os.PathLike | None = None,
                   include_suggestions: bool = False, url: str | None = None) -> Snapshot:
    """Write (or find) the snapshot of a dataset's accepted corrections; see the module doc."""
    info, records = build_records(dataset, include_suggestions, url)
    if not records:
        hint = "" if include_suggestions else " (--include-suggestions falls back to suggestions)"
        raise UserError(f"nothing to export from {dataset}: no accepted corrections yet{hint}")
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    digest = hashlib.sha256()
    for part in (FORMAT, info["name"], str(bool(include_suggestions))):
        digest.update(part.encode() + b"\0")
    digest.update(jsonl)
    content_hash = digest.hexdigest()
    samples = [r for r in records if r["task"] == "category"]
    counts = {split: sum(r["split"] == split for r in samples) for split in SPLIT_ORDER
              if any(r["split"] == split for r in samples)}
    sources = {kind: sum(r["source"].startswith(kind) for r in samples)
               for kind in ("correction", "suggestion")}
    manifest = {"format": FORMAT, "dataset": info["name"], "modality": info["modality"],
                "label_set": info["label_set"], "include_suggestions": bool(include_suggestions),
                "content_hash": content_hash, "n_samples": len(samples), "counts": counts,
                "sources": sources, "files": {"jsonl": "instructions.jsonl", "hf": "hf"}}

    explicit_out = out is not None and str(out) != ""
    out = Path(out).expanduser() if explicit_out else data_dir() / "exports"
    with session_scope(url) as session:
        ds_id = session.scalars(select(Dataset.id).where(Dataset.name == info["name"])).one()
        existing = session.scalars(select(ExportSnapshot)
                                   .where(ExportSnapshot.content_hash == content_hash)).first()
        if existing is not None and (Path(existing.path) / "manifest.json").exists():
            source = Path(existing.path)
            path, copied_from = source, None
            if explicit_out:
                path, copied = _copy_into(source, out)
                copied_from = source if copied else None
            return Snapshot(existing.id, path, content_hash, existing.n_samples, info["name"],
                            bool(include_suggestions), counts, sources, reused=True,
                            copied_from=copied_from)
        folder = (out / f"{info['name']}-{content_hash[:12]}").resolve()
        if not (folder / "manifest.json").exists():
            # Write beside the target and rename: readers never see half a snapshot.
            tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                _write_folder(tmp, info, jsonl, records, manifest)
                os.replace(tmp, folder)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if not (folder / "manifest.json").exists():  # not a twin export winning the race
                    raise UserError(f"cannot write the snapshot under {out}: {exc}") from None
        if existing is None:
            existing = ExportSnapshot(dataset_id=ds_id, content_hash=content_hash,
                                      path=str(folder), n_samples=len(samples),
                                      include_suggestions=bool(include_suggestions))
            session.add(existing)
        else:
            existing.path = str(folder)  # its old folder was deleted: point at the new one
        try:
            session.flush()
        except IntegrityError:  # a twin export of the same data registered it first
            session.rollback()
            existing = session.scalars(select(ExportSnapshot)
                                       .where(ExportSnapshot.content_hash == content_hash)).one()
        return Snapshot(existing.id, folder, content_hash, len(samples), info["name"],
                        bool(include_suggestions), counts, sources)


def _copy_into(source: Path, out: Path) -> tuple[Path, bool]:
    """(`out/<name of source>`, whether it was copied now): the snapshot copied unless there.

    Copied beside the target and renamed, like a fresh export: nobody sees half a copy. An
    existing folder of that name with a manifest is the same content (the name holds the hash).
    """
    target = (out / source.name).resolve()
    if target == source.resolve() or (target / "manifest.json").exists():
        return target, False
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "manifest.json").exists():   # not a twin copy winning the race
            raise UserError(f"cannot copy snapshot {source.name} into {out}: "
                            f"{exc.strerror or exc}") from None
        return target, False
    return target, True


def resolve_snapshot(ref: str | int, url: str | None = None) -> Path:
    """A snapshot folder from its id (as the CLI prints it) or a folder path."""
    path = Path(str(ref)).expanduser()
    if not str(ref).isdigit() or (path / "manifest.json").exists():
        if not (path / "manifest.json").exists():
            raise UserError(f"{ref}: not a snapshot folder (no manifest.json)")
        return path.resolve()
    with session_scope(url) as session:
        row = session.get(ExportSnapshot, int(ref))
        if row is None:
            raise UserError(f"no snapshot #{ref}")
        if not (Path(row.path) / "manifest.json").exists():
            raise UserError(f"snapshot #{ref}: its folder {row.path} is gone; export again")
        return Path(row.path)


def read_records(snapshot: str | os.PathLike) -> list[dict]:
    """The JSONL records of a snapshot folder."""
    path = Path(snapshot) / "instructions.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
