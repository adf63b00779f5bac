"""Evaluation as FER papers report it: WAR, UAR, per-class recall, confusion matrix, ROUGE-L.

    python app.py evaluate --version v3 --dataset rafdb --split test [--json]
    python app.py evaluate --version prior-only --dataset fer2013 --split test   # the embedded default

`--version prior-only` measures what the product answers with no checkpoint loaded (the face
prior network, through core.engine exactly as the Image tab asks it); a name or a checkpoint
folder measures that version. Samples imported as face crops (`Sample.meta["aligned"]`) are
analysed as crops. A sample with no face found has no prior-only label: it counts as a miss in
WAR and UAR (nothing is guessed for it) and in the report's `no_face` count, per class in
`no_face_by_class`.

WAR (weighted average recall) is plain accuracy over samples; UAR (unweighted average recall) is
the mean of the per-class recalls over the classes present in the ground truth. Labels come from
`score_labels` (one likelihood pass over the dataset's label set), not from parsing text.
Explanation quality is ROUGE-L (F-measure of the longest common token subsequence) against the
accepted corrected explanations, where a record has one. Calibration: a label temperature fitted
on the validation split, stored in the checkpoint's config.json, and the expected calibration
error (ECE) with a reliability diagram, before and after it (annotation/calibration.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from annotation.calibration import (expected_calibration_error, fit_temperature, nll,  # noqa: F401
                                    save_figure, save_reliability_png, softmax)


def confusion_matrix(truth: list[str], predicted: list[str], labels: list[str]) -> np.ndarray:
    """Rows: true label, columns: predicted label, in `labels` order."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(truth, predicted):
        matrix[index[t], index[p]] += 1
    return matrix


def _totals(matrix: np.ndarray, unanswered: np.ndarray | None) -> np.ndarray:
    """True samples per class: the matrix rows plus those that got no answer (no face)."""
    totals = matrix.sum(axis=1)
    return totals if unanswered is None else totals + np.asarray(unanswered)


def per_class_recall(matrix: np.ndarray, labels: list[str],
                     unanswered: np.ndarray | None = None) -> dict[str, float | None]:
    """Recall of each class; None for a class with no true samples (it does not count in UAR).
    `unanswered`: per class, samples without a prediction (misses, outside the matrix)."""
    totals = _totals(matrix, unanswered)
    return {label: (float(matrix[i, i] / totals[i]) if totals[i] else None) for i, label in enumerate(labels)}


def uar(matrix: np.ndarray, unanswered: np.ndarray | None = None) -> float:
    totals = _totals(matrix, unanswered)
    present = totals > 0
    return float((np.diag(matrix)[present] / totals[present]).mean()) if present.any() else 0.0


def war(matrix: np.ndarray, unanswered: np.ndarray | None = None) -> float:
    total = _totals(matrix, unanswered).sum()
    return float(np.trace(matrix) / total) if total else 0.0


_TOKEN = re.compile(r"\w+")


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens (Lin, 2004), beta = 1."""
    a, b = _TOKEN.findall(candidate.lower()), _TOKEN.findall(reference.lower())
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def save_confusion_png(matrix: np.ndarray, labels: list[str], path: str | Path, title: str = "",
                       unanswered: np.ndarray | None = None) -> Path:
    """The matrix as a picture; samples with no prediction (no face) as a last "no face" column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(labels)
    if unanswered is not None and np.asarray(unanswered).sum():
        matrix = np.concatenate([matrix, np.asarray(unanswered).reshape(-1, 1)], axis=1)
        columns.append("(no face)")
    size = 1.2 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1 + 0.55 * (len(columns) - len(labels)), size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = matrix.max() or 1
    for i in range(len(labels)):
        for j in range(len(columns)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > peak / 2 else "black", fontsize=8)
    return save_figure(fig, path)


def report(truth: list[str], predicted: list[str], labels: list[str],
           unanswered: list[str] | None = None) -> dict:
    """Metrics of (truth, predicted) pairs; `unanswered` are the true labels of samples that got
    no prediction (no face in prior-only mode): misses in WAR/UAR, counted in `unanswered`."""
    matrix = confusion_matrix(truth, predicted, labels)
    missed = np.zeros(len(labels), dtype=np.int64)
    for label in unanswered or []:
        missed[labels.index(label)] += 1
    return {"uar": uar(matrix, missed), "war": war(matrix, missed),
            "per_class_recall": per_class_recall(matrix, labels, missed),
            "confusion": matrix.tolist(), "labels": labels, "n": int(matrix.sum() + missed.sum()),
            "unanswered": int(missed.sum()),
            "unanswered_by_class": {label: int(m) for label, m in zip(labels, missed)}}


PRIOR_ONLY = "prior-only"
PRIOR_ONLY_NAMES = (PRIOR_ONLY, "prior_only", "prior", "default")

Progress = Callable[[int, int], None]  # (samples done, samples in all)


def _labelled_samples(s, dataset_id: int, split: str) -> list[tuple]:
    """(id, media path, label, is a face crop) of a split's labelled samples, in id order."""
    from sqlalchemy import select

    from db.models import Sample

    return [(x.id, x.media_path, x.label, bool((x.meta or {}).get("aligned"))) for x in s.scalars(
        select(Sample).where(Sample.dataset_id == dataset_id, Sample.split == split,
                             Sample.label.is_not(None)).order_by(Sample.id))]


def _dataset_split(s, dataset: str, split: str) -> tuple[int, list[str], list[tuple]]:
    """The dataset's id, label set and the split's labelled samples; one clear error when the
    dataset does not exist."""
    from sqlalchemy import select

    from core.errors import UserError
    from db.models import Dataset

    ds = s.scalar(select(Dataset).where(Dataset.name == dataset))
    if ds is None:
        raise UserError(f"no dataset named {dataset!r}")
    return ds.id, list(ds.label_set), _labelled_samples(s, ds.id, split)


def evaluate_version(name_or_folder: str, dataset: str, split: str = "test", url: str | None = None,
                     num_frames: int | None = None, batch_size: int = 8, explanations: int = 16,
                     record: bool = True, device: str | None = None,
                     calibration_split: str | None = "val", progress: Progress | None = None) -> dict:
    """Score every labelled sample of a dataset split with a model version (a registered name, or
    a checkpoint folder); the summary is stored on the version under "<dataset>/<split>".
    `prior-only` measures the embedded default instead (evaluate_prior_only).

    Returns dict(uar, war, per_class_recall, confusion, labels, n, confusion_png, rouge_l,
    rouge_l_n, samples, skipped, version, dataset, split, label_scoring, temperature,
    temperature_fitted, temperature_split, temperature_n, temperature_note, temperature_saved,
    ece, ece_before_temperature, nll, nll_before_temperature, reliability_png). `samples`
    fingerprints the evaluated (sample, label) pairs, so two versions' scores are compared only
    on the same samples.

    Calibration: the label temperature T is fitted (annotation/calibration.py) on the
    `calibration_split` ("val"; None: no fit) by minimising the NLL of the true labels on the
    model's raw per-option log-likelihoods, and, when `record`, written into the checkpoint's
    config.json, which every later load applies. With no labelled samples in that split the
    checkpoint's T is kept (1 unless fitted before) and the report says so. ECE is measured on
    `split` before (T = 1) and after T (in-sample when `split` is the calibration split).
    `explanations` caps how many accepted corrections get a generated explanation for ROUGE-L
    (generation is the slow part). `device`: default cuda when there is one (bf16), else cpu.
    `progress(done, total)` is called after each sample. `no_face` counts the evaluated samples
    in which no face was found (the model then answers from the whole frame).
    """
    if name_or_folder.strip().lower() in PRIOR_ONLY_NAMES:
        return evaluate_prior_only(dataset, split, url, num_frames=num_frames, progress=progress)
    import hashlib

    import torch

    from annotation.export import _accepted_corrections
    from annotation.versions import find_version, version_folder
    from core.errors import UserError
    from core.faces import FaceConfig, shared_analyzer
    from core.media import load_media
    from core.model.loading import load_model
    from core.model.recipe import category_question, conversation_question, frames
    from db.session import data_dir, session_scope

    folder = version_folder(name_or_folder, url)
    registered = find_version(name_or_folder, url) if record else None
    with session_scope(url) as s:
        dataset_id, labels, samples = _dataset_split(s, dataset, split)
        # Calibration samples are only scored (no explanations, not in the report's metrics).
        fit_samples = (_labelled_samples(s, dataset_id, calibration_split)
                       if calibration_split not in (None, split) else [])
        # The references are the corrections an export would ship (reviewed and accepted).
        accepted = {sample_id: explanation for sample_id, (_, explanation, _) in
                    _accepted_corrections(s, dataset_id).items() if explanation}
    if not samples:
        raise UserError(f"{dataset} has no labelled samples in split {split!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = load_model(folder, device=device, dtype=dtype)
    analyzer = shared_analyzer(FaceConfig(prior=model.config.prior))
    truth, predicted, rouge, skipped, evaluated = [], [], [], [], []
    pending: list[tuple] = []
    fit_ids = {x[0] for x in fit_samples}
    scored: dict[str, tuple[list, list]] = {"eval": ([], []), "fit": ([], [])}  # raw scores, truth index
    fit_skipped: list = []
    no_face: list[str] = []  # true labels of evaluated samples in which no face was found

    def flush() -> None:
        with torch.inference_mode():  # raw: the per-option log-likelihoods, at T = 1
            scores = model.score_labels([p[1] for p in pending], labels, raw=True)
        for (sample_id, _, label, prepared), s in zip(pending, scores):
            rows, truth_idx = scored["fit" if sample_id in fit_ids else "eval"]
            rows.append([s[x] for x in labels])
            truth_idx.append(labels.index(label))
            if sample_id in fit_ids:
                continue
            truth.append(label)
            predicted.append(max(s, key=s.get))
            if sample_id in accepted and len(rouge) < explanations:
                # The category prompt's prepared media: no second image-processor or vision pass.
                x = model.prepare(prepared, [], conversation_question(prepared.kind, model.config))
                (text,) = model.generate([x])
                rouge.append(rouge_l(text, accepted[sample_id]))
        pending.clear()

    everything = samples + fit_samples
    for done, (sample_id, path, label, aligned) in enumerate(everything, start=1):
        if progress:
            progress(done, len(everything))
        if label not in labels:
            (fit_skipped if sample_id in fit_ids else skipped).append((path, f"label {label!r} not in the label set"))
            continue
        try:
            media = load_media(path, num_frames=frames(model.config, num_frames))
        except UserError as exc:
            (fit_skipped if sample_id in fit_ids else skipped).append((path, str(exc)))
            continue
        faces = [analyzer.analyze(frame, aligned=aligned) for frame in media.frames]
        if sample_id not in fit_ids and not any(faces):
            no_face.append(label)
        # Prepared once (as core/engine.py `_preprocess` does): the category prompt and, for
        # ROUGE-L, the conversation prompt share one image-processor pass and one vision pass.
        prepared = model.prepare_media(media.frames, faces)
        pending.append((sample_id, model.prepare(prepared, faces,
                                                 category_question(labels, media.kind, model.config)),
                        label, prepared))
        if sample_id not in fit_ids:
            evaluated.append([sample_id, label])
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    result = report(truth, predicted, labels)
    name = registered["name"] if registered else model.config.version
    result.update(dataset=dataset, split=split, version=name, skipped=skipped,
                  rouge_l=float(np.mean(rouge)) if rouge else None, rouge_l_n=len(rouge),
                  samples=hashlib.sha256(json.dumps(evaluated).encode()).hexdigest()[:16],
                  **_no_face_counts(no_face, labels))
    stem = re.sub(r"[^\w.-]", "_", f"{name}-{dataset}-{split}")
    png = data_dir() / "reports" / f"{stem}-confusion.png"
    result["confusion_png"] = str(save_confusion_png(np.array(result["confusion"]), labels, png,
                                                     f"{name} on {dataset}/{split}"))
    result.update(calibrate(scored, len(labels), split, calibration_split, model.config.label_temperature,
                            fit_skipped))
    result["label_scoring"] = model.config.label_scoring
    if result["temperature_fitted"] and record:
        from annotation.versions import save_label_temperature

        result["temperature_saved"] = save_label_temperature(folder, result["temperature"])
    logits, truth_idx = _arrays(*scored["eval"], len(labels))
    result["reliability_png"] = str(save_reliability_png(
        softmax(logits, result["temperature"]), truth_idx, data_dir() / "reports" / f"{stem}-reliability.png",
        f"{name} on {dataset}/{split}", probs_before=softmax(logits), temperature=result["temperature"]))
    if registered is not None:
        from annotation.versions import record_metrics

        record_metrics(name, {f"{dataset}/{split}": _summary(result)}, url)
    return result


def _no_face_counts(no_face: list[str], labels: list[str]) -> dict:
    return {"no_face": len(no_face),
            "no_face_by_class": {label: no_face.count(label) for label in labels}}


def evaluate_prior_only(dataset: str, split: str = "test", url: str | None = None,
                        num_frames: int | None = None, progress: Progress | None = None,
                        in_flight: int = 32) -> dict:
    """The embedded default (no checkpoint: the face prior network) on a dataset split, asked
    through core.engine as every tab asks it, `in_flight` requests at a time.

    Same report as evaluate_version, with `no_face` = samples without a label (no face found:
    misses in WAR/UAR). Nothing is fitted or stored: there is no checkpoint to keep a label
    temperature in, so ECE is that of the prior's own probabilities, and no version records it.
    """
    import collections
    import hashlib

    from core.engine import Engine, EngineConfig
    from core.errors import UserError
    from db.session import data_dir, session_scope

    with session_scope(url) as s:
        _, labels, samples = _dataset_split(s, dataset, split)
    if not samples:
        raise UserError(f"{dataset} has no labelled samples in split {split!r}")
    engine = Engine(None, EngineConfig(num_frames=num_frames, max_queue=max(64, in_flight)))
    truth, predicted, no_face, skipped, evaluated, rows, truth_idx = [], [], [], [], [], [], []
    waiting: collections.deque = collections.deque()
    try:
        version = engine.info["model_version"]
        todo = iter([x for x in samples if x[2] in labels])
        skipped += [(path, f"label {label!r} not in the label set") for _, path, label, _ in samples
                    if label not in labels]
        done = len(skipped)

        prior_labels = list(engine.faces.prior.labels)
        if not any(x in prior_labels for x in labels):  # else every sample would fail alike
            raise UserError(f"the prior network scores only {', '.join(prior_labels)}; none of "
                            f"{dataset}'s labels ({', '.join(labels)}); evaluate a checkpoint")

        def submit() -> None:
            """Keep `in_flight` requests submitted, so that the engine always has work queued."""
            for sample_id, path, label, aligned in todo:
                waiting.append((sample_id, path, label,
                                engine.stream(path, label_set=labels, explain=False, aligned=aligned)))
                if len(waiting) >= in_flight:
                    return

        submit()
        while waiting:
            sample_id, path, label, stream = waiting.popleft()
            try:
                result = next(e for e in stream if e["event"] == "done")["result"]
            except UserError as exc:  # an unreadable file is reported, never fatal
                skipped.append((path, str(exc)))
                result = None
            finally:
                stream.close()
            submit()
            done += 1
            if progress:
                progress(done, len(samples))
            if result is None:
                continue
            evaluated.append([sample_id, label])
            if result.get("label") is None:
                no_face.append(label)
                continue
            truth.append(label)
            predicted.append(result["label"])
            scores = result.get("scores") or {}
            rows.append([float(scores.get(x, 0.0)) for x in labels])
            truth_idx.append(labels.index(label))
    finally:
        engine.close()
    result = report(truth, predicted, labels, unanswered=no_face)
    result.update(dataset=dataset, split=split, version=version, skipped=skipped, rouge_l=None,
                  rouge_l_n=0, samples=hashlib.sha256(json.dumps(evaluated).encode()).hexdigest()[:16],
                  label_scoring="prior network (no checkpoint)", **_no_face_counts(no_face, labels))
    stem = re.sub(r"[^\w.-]", "_", f"{PRIOR_ONLY}-{dataset}-{split}")
    missed = np.array([result["unanswered_by_class"][x] for x in labels])
    result["confusion_png"] = str(save_confusion_png(
        np.array(result["confusion"]), labels, data_dir() / "reports" / f"{stem}-confusion.png",
        f"{PRIOR_ONLY} on {dataset}/{split}", unanswered=missed))
    # The engine's scores are probabilities; their logs are logits whose softmax gives them back.
    probs, idx = _arrays(rows, truth_idx, len(labels))
    logits = np.log(np.clip(probs, 1e-12, 1.0))
    ece = expected_calibration_error(probs, idx) if len(idx) else None
    result.update(temperature=1.0, temperature_fitted=False, temperature_split=None,
                  temperature_n=0, temperature_saved=False,
                  temperature_note="not fitted (prior-only: no checkpoint to store it in)",
                  ece=ece, ece_before_temperature=ece,
                  nll=nll(logits, idx) if len(idx) else None,
                  nll_before_temperature=nll(logits, idx) if len(idx) else None,
                  reliability_png=str(save_reliability_png(
                      probs, idx, data_dir() / "reports" / f"{stem}-reliability.png",
                      f"{PRIOR_ONLY} on {dataset}/{split}")) if len(idx) else None)
    return result


def _arrays(rows: list, truth_idx: list, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.array(rows, dtype=np.float64).reshape(len(rows), n_classes),
            np.array(truth_idx, dtype=np.int64).reshape(len(truth_idx)))


def calibrate(scored: dict[str, tuple[list, list]], n_classes: int, split: str, calibration_split: str | None,
              current_temperature: float = 1.0, fit_skipped: list | None = None) -> dict:
    """The temperature fit and the calibration metrics of a report, from the raw per-option
    scores: scored["eval"] (the evaluated split) and scored["fit"] (the calibration split,
    empty when it is the evaluated split itself), each (rows of scores, true class indices)."""
    logits, truth_idx = _arrays(*scored["eval"], n_classes)
    fit_logits, fit_truth = scored["eval"] if calibration_split == split else scored["fit"]
    out = {"temperature_split": calibration_split, "temperature_n": len(fit_truth), "temperature_saved": False}
    if calibration_split is None:
        temperature, note = float(current_temperature), "not fitted (no calibration split asked for)"
    elif not fit_truth:
        temperature = float(current_temperature)
        note = (f"not fitted: no labelled {calibration_split!r} samples"
                + (f" ({len(fit_skipped)} unreadable or off-label)" if fit_skipped else "")
                + f"; the checkpoint's T = {temperature:.3g} kept")
    else:
        temperature = fit_temperature(*_arrays(fit_logits, fit_truth, n_classes))
        note = f"fitted on {calibration_split} (n={len(fit_truth)})" + (
            ", the evaluated split itself: in-sample" if calibration_split == split else "")
    fitted = calibration_split is not None and bool(fit_truth)
    before, after = softmax(logits), softmax(logits, temperature)
    out.update(temperature=temperature, temperature_fitted=fitted, temperature_note=note,
               ece=expected_calibration_error(after, truth_idx),
               ece_before_temperature=expected_calibration_error(before, truth_idx),
               nll=nll(logits, truth_idx, temperature), nll_before_temperature=nll(logits, truth_idx))
    return out


SUMMARY_KEYS = ("uar", "war", "per_class_recall", "n", "no_face", "rouge_l", "confusion_png", "samples", "ece",
                "ece_before_temperature", "temperature", "temperature_split", "temperature_fitted",
                "reliability_png")


def _summary(result: dict) -> dict:
    return {k: result[k] for k in SUMMARY_KEYS if k in result}
