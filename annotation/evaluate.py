"""Evaluation as FER papers report it: WAR, UAR, per-class recall, confusion matrix, ROUGE-L.

    python app.py evaluate --version v3 --dataset rafdb --split test [--json]

WAR (weighted average recall) is plain accuracy over samples; UAR (unweighted average recall) is
the mean of the per-class recalls over the classes present in the ground truth. Labels come from
`score_labels` (one likelihood pass over the dataset's label set), not from parsing text.
Explanation quality is ROUGE-L (F-measure of the longest common token subsequence) against the
accepted corrected explanations, where a record has one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np


def confusion_matrix(truth: list[str], predicted: list[str], labels: list[str]) -> np.ndarray:
    """Rows: true label, columns: predicted label, in `labels` order."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(truth, predicted):
        matrix[index[t], index[p]] += 1
    return matrix


def per_class_recall(matrix: np.ndarray, labels: list[str]) -> dict[str, float | None]:
    """Recall of each class; None for a class with no true samples (it does not count in UAR)."""
    totals = matrix.sum(axis=1)
    return {label: (float(matrix[i, i] / totals[i]) if totals[i] else None) for i, label in enumerate(labels)}


def uar(matrix: np.ndarray) -> float:
    totals = matrix.sum(axis=1)
    present = totals > 0
    return float((np.diag(matrix)[present] / totals[present]).mean()) if present.any() else 0.0


def war(matrix: np.ndarray) -> float:
    total = matrix.sum()
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


def save_confusion_png(matrix: np.ndarray, labels: list[str], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.2 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = matrix.max() or 1
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > peak / 2 else "black", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(truth: list[str], predicted: list[str], labels: list[str]) -> dict:
    matrix = confusion_matrix(truth, predicted, labels)
    return {"uar": uar(matrix), "war": war(matrix), "per_class_recall": per_class_recall(matrix, labels),
            "confusion": matrix.tolist(), "labels": labels, "n": int(matrix.sum())}


def evaluate_version(name_or_folder: str, dataset: str, split: str = "test", url: str | None = None,
                     num_frames: int = 4, batch_size: int = 8, explanations: int = 16,
                     record: bool = True, device: str | None = None) -> dict:
    """Score every labelled sample of a dataset split with a model version (a registered name, or
    a checkpoint folder); the summary is stored on the version under "<dataset>/<split>".

    Returns dict(uar, war, per_class_recall, confusion, labels, n, confusion_png, rouge_l,
    rouge_l_n, samples, skipped, version, dataset, split). `samples` fingerprints the evaluated
    (sample, label) pairs, so two versions' scores are compared only on the same samples.
    `explanations` caps how many accepted corrections get a generated explanation for ROUGE-L
    (generation is the slow part). `device`: default cuda when there is one (bf16), else cpu.
    """
    import hashlib

    import torch
    from sqlalchemy import select

    from annotation.versions import find_version, version_folder
    from core.errors import UserError
    from core.faces import FaceConfig, shared_analyzer
    from core.media import load_media
    from core.model.modeling import EmoLlama
    from core.model.prompt import category_question, conversation_question
    from annotation.export import _accepted_corrections
    from db.models import Dataset, Sample
    from db.session import data_dir, session_scope

    folder = version_folder(name_or_folder, url)
    registered = find_version(name_or_folder, url) if record else None
    with session_scope(url) as s:
        ds = s.scalar(select(Dataset).where(Dataset.name == dataset))
        if ds is None:
            raise UserError(f"no dataset named {dataset!r}")
        labels = list(ds.label_set)
        samples = [(x.id, x.media_path, x.label) for x in s.scalars(
            select(Sample).where(Sample.dataset_id == ds.id, Sample.split == split,
                                 Sample.label.is_not(None)).order_by(Sample.id))]
        # The references are the corrections an export would ship (reviewed and accepted).
        accepted = {sample_id: explanation for sample_id, (_, explanation, _) in
                    _accepted_corrections(s, ds.id).items() if explanation}
    if not samples:
        raise UserError(f"{dataset} has no labelled samples in split {split!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = EmoLlama.from_pretrained(folder, device=device, dtype=dtype).eval()
    analyzer = shared_analyzer(FaceConfig(prior=model.config.prior))
    truth, predicted, rouge, skipped, evaluated = [], [], [], [], []
    pending: list[tuple] = []

    def flush() -> None:
        with torch.inference_mode():
            scores = model.score_labels([p[1] for p in pending], labels)
        for (sample_id, _, label, media, faces), s in zip(pending, scores):
            truth.append(label)
            predicted.append(max(s, key=s.get))
            if sample_id in accepted and len(rouge) < explanations:
                x = model.prepare(media.frames, faces, conversation_question(media.kind))
                (text,) = model.generate([x])
                rouge.append(rouge_l(text, accepted[sample_id]))
        pending.clear()

    for sample_id, path, label in samples:
        if label not in labels:
            skipped.append((path, f"label {label!r} not in the label set"))
            continue
        try:
            media = load_media(path, num_frames=num_frames)
        except UserError as exc:
            skipped.append((path, str(exc)))
            continue
        faces = [analyzer.analyze(frame) for frame in media.frames]
        pending.append((sample_id, model.prepare(media.frames, faces, category_question(labels, media.kind)),
                        label, media, faces))
        evaluated.append([sample_id, label])
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    result = report(truth, predicted, labels)
    name = registered["name"] if registered else model.config.version
    result.update(dataset=dataset, split=split, version=name, skipped=skipped,
                  rouge_l=float(np.mean(rouge)) if rouge else None, rouge_l_n=len(rouge),
                  samples=hashlib.sha256(json.dumps(evaluated).encode()).hexdigest()[:16])
    stem = re.sub(r"[^\w.-]", "_", f"{name}-{dataset}-{split}")
    png = data_dir() / "reports" / f"{stem}-confusion.png"
    result["confusion_png"] = str(save_confusion_png(np.array(result["confusion"]), labels, png,
                                                     f"{name} on {dataset}/{split}"))
    if registered is not None:
        from annotation.versions import record_metrics

        record_metrics(name, {f"{dataset}/{split}": _summary(result)}, url)
    return result


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("uar", "war", "per_class_recall", "n", "rouge_l", "confusion_png", "samples")}
