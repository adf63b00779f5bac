"""Calibration of the label probabilities: a fitted temperature, ECE and a reliability diagram.

`EmoLlama.score_labels(..., raw=True)` gives per-option log-likelihoods z (length-normalised by
default); the served probabilities are softmax(z / T). `fit_temperature` picks the T that
minimises the negative log-likelihood of the true labels on a validation split (Guo et al.,
2017, "On Calibration of Modern Neural Networks"); T does not change which label wins, only how
sure the model says it is. `expected_calibration_error` measures the result: equal-width bins
of the top probability, ECE = sum over bins of (bin size / N) * |accuracy - mean confidence|.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

T_BOUNDS = (1e-2, 1e2)


def _check(scores: np.ndarray, truth_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, truth_idx = np.asarray(scores, dtype=np.float64), np.asarray(truth_idx)
    if scores.ndim != 2 or truth_idx.shape != (scores.shape[0],):
        raise ValueError(f"need scores (N, K) and truth_idx (N,), got {scores.shape} and {truth_idx.shape}")
    if scores.shape[0] and not np.issubdtype(truth_idx.dtype, np.integer):
        raise ValueError("truth_idx must hold integer class indices")
    truth_idx = truth_idx.astype(np.int64)
    if truth_idx.size and (truth_idx.min() < 0 or truth_idx.max() >= scores.shape[1]):
        raise ValueError("truth_idx out of range of the classes")
    return scores, truth_idx


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, truth_idx: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / temperature)."""
    logits, truth_idx = _check(logits, truth_idx)
    if not logits.shape[0]:
        return 0.0
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), truth_idx]))


def fit_temperature(logits: np.ndarray, truth_idx: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature T in `bounds` minimising nll(logits, truth_idx, T); 1.0 with no samples.

    The NLL is convex in 1/T, hence unimodal in log T: a grid over log T finds the basin and a
    golden-section search refines it (to about 1e-6 relative). A model that is right on every
    sample with a margin drives T to the lower bound (sharper is always better there).
    """
    logits, truth_idx = _check(logits, truth_idx)
    if not logits.shape[0]:
        return 1.0
    if not np.isfinite(logits).all():
        raise ValueError("fit_temperature needs finite scores")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    grid = np.linspace(lo, hi, 161)
    values = [nll(logits, truth_idx, float(np.exp(u))) for u in grid]
    best = int(np.argmin(values))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2

    def f(u: float) -> float:
        return nll(logits, truth_idx, float(np.exp(u)))

    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-6:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    candidates = [(values[best], grid[best]), (f((a + b) / 2), (a + b) / 2)]
    return float(np.exp(min(candidates)[1]))


def reliability_bins(probs: np.ndarray, truth_idx: np.ndarray, bins: int = 10) -> list[dict]:
    """Per equal-width confidence bin (lo, hi] (the first also holds 0): n, mean confidence of the
    top label, accuracy of the top label (None for an empty bin)."""
    probs, truth_idx = _check(probs, truth_idx)
    if bins < 1:
        raise ValueError("bins must be at least 1")
    confidence = probs.max(axis=1) if probs.shape[0] else np.zeros(0)
    correct = (probs.argmax(axis=1) == truth_idx) if probs.shape[0] else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    out = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                    "confidence": float(confidence[inside].mean()) if n else None,
                    "accuracy": float(correct[inside].mean()) if n else None})
    return out


def expected_calibration_error(probs: np.ndarray, truth_idx: np.ndarray, bins: int = 10) -> float:
    """ECE: sum over equal-width bins of the top probability of (n_bin / N) |accuracy - confidence|;
    0 for no samples."""
    cells = reliability_bins(probs, truth_idx, bins)
    total = sum(c["n"] for c in cells)
    if not total:
        return 0.0
    return float(sum(c["n"] / total * abs(c["accuracy"] - c["confidence"]) for c in cells if c["n"]))


def save_reliability_png(probs: np.ndarray, truth_idx: np.ndarray, path: str | Path, title: str = "",
                         bins: int = 10, probs_before: np.ndarray | None = None,
                         temperature: float | None = None) -> Path:
    """A reliability diagram: accuracy per confidence bin (bars) against the diagonal, with the
    uncalibrated (T = 1) curve when `probs_before` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = reliability_bins(probs, truth_idx, bins)
    width = 1.0 / bins
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfectly calibrated")
    after = f"T = {temperature:.3g}" if temperature is not None else "model"
    ax.bar([c["lo"] for c in cells], [c["accuracy"] or 0.0 for c in cells], width=width, align="edge",
           edgecolor="navy", color="cornflowerblue", alpha=0.8,
           label=f"{after}: ECE {expected_calibration_error(probs, truth_idx, bins):.3f}")
    if probs_before is not None:
        before = [c for c in reliability_bins(probs_before, truth_idx, bins) if c["n"]]
        ax.plot([c["confidence"] for c in before], [c["accuracy"] for c in before], "o-", color="darkorange",
                label=f"T = 1: ECE {expected_calibration_error(probs_before, truth_idx, bins):.3f}")
    for c in cells:
        if c["n"]:
            ax.text(c["lo"] + width / 2, 0.02, str(c["n"]), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the top label")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG (folders made as needed) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
