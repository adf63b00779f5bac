"""Evaluation metrics against values computed by hand."""
from __future__ import annotations

import numpy as np
import pytest

from annotation.evaluate import confusion_matrix, per_class_recall, report, rouge_l, save_confusion_png, uar, war

LABELS = ["neutral", "happiness", "sadness"]
#                 predicted: neu hap sad
FIXED = np.array([[5, 1, 4],   # neutral:   10 true, 5 right -> recall 0.5
                  [0, 8, 0],   # happiness:  8 true, 8 right -> recall 1.0
                  [1, 1, 0]])  # sadness:    2 true, 0 right -> recall 0.0


def test_war_and_uar_on_a_fixed_confusion_matrix():
    assert war(FIXED) == pytest.approx(13 / 20)                 # accuracy over samples
    assert uar(FIXED) == pytest.approx((0.5 + 1.0 + 0.0) / 3)   # mean per-class recall
    assert per_class_recall(FIXED, LABELS) == {"neutral": 0.5, "happiness": 1.0, "sadness": 0.0}


def test_confusion_matrix_from_labels_and_absent_classes():
    truth = ["neutral"] * 10 + ["happiness"] * 8 + ["sadness"] * 2
    predicted = (["neutral"] * 5 + ["happiness"] + ["sadness"] * 4 + ["happiness"] * 8
                 + ["neutral", "happiness"])
    assert (confusion_matrix(truth, predicted, LABELS) == FIXED).all()
    only_two = confusion_matrix(["neutral", "happiness"], ["neutral", "neutral"], LABELS)
    assert per_class_recall(only_two, LABELS)["sadness"] is None
    assert uar(only_two) == pytest.approx(0.5)  # sadness has no samples: not averaged in
    r = report(truth, predicted, LABELS)
    assert r["n"] == 20 and r["confusion"] == FIXED.tolist()


def test_samples_without_an_answer_are_misses_and_counted():
    """Prior-only mode gives no label where no face is found: a miss in WAR and UAR, counted."""
    truth = ["neutral"] * 10 + ["happiness"] * 8 + ["sadness"] * 2
    predicted = (["neutral"] * 5 + ["happiness"] + ["sadness"] * 4 + ["happiness"] * 8
                 + ["neutral", "happiness"])
    r = report(truth, predicted, LABELS, unanswered=["happiness", "happiness", "sadness", "neutral"])
    assert r["n"] == 24 and r["unanswered"] == 4 and r["confusion"] == FIXED.tolist()
    assert r["unanswered_by_class"] == {"neutral": 1, "happiness": 2, "sadness": 1}
    assert r["war"] == pytest.approx(13 / 24)
    assert r["per_class_recall"] == {"neutral": pytest.approx(5 / 11), "happiness": pytest.approx(8 / 10),
                                     "sadness": 0.0}
    assert r["uar"] == pytest.approx((5 / 11 + 8 / 10 + 0.0) / 3)
    only_missed = report([], [], LABELS, unanswered=["sadness"])
    assert only_missed["war"] == 0.0 and only_missed["per_class_recall"]["neutral"] is None


def test_confusion_png_has_a_no_face_column(tmp_path):
    from PIL import Image

    plain = save_confusion_png(FIXED, LABELS, tmp_path / "plain.png")
    wider = save_confusion_png(FIXED, LABELS, tmp_path / "wider.png", unanswered=np.array([1, 2, 1]))
    assert Image.open(wider).size[0] > Image.open(plain).size[0]


def test_rouge_l_by_hand():
    # LCS("the cheeks are raised", "cheeks raised and lips pulled") = "cheeks raised" (2 tokens):
    # precision 2/4, recall 2/5 -> F1 = 2 * 0.5 * 0.4 / 0.9
    assert rouge_l("The cheeks are raised", "cheeks raised and lips pulled") == pytest.approx(0.8 / 1.8)
    assert rouge_l("same words here", "same words here") == pytest.approx(1.0)
    assert rouge_l("", "anything") == 0.0 and rouge_l("abc", "xyz") == 0.0


def test_confusion_png_is_written(tmp_path):
    path = save_confusion_png(FIXED, LABELS, tmp_path / "cm.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_calibration_fits_on_the_calibration_split_and_says_when_it_cannot():
    from annotation.calibration import fit_temperature
    from annotation.evaluate import _summary, calibrate

    rng = np.random.default_rng(0)
    test = (rng.normal(0, 2, (40, 3)).tolist(), rng.integers(0, 3, 40).tolist())
    val = (rng.normal(0, 2, (30, 3)).tolist(), rng.integers(0, 3, 30).tolist())
    fitted = calibrate({"eval": test, "fit": val}, 3, "test", "val")
    assert fitted["temperature"] == fit_temperature(np.array(val[0]), np.array(val[1]))
    assert fitted["temperature_fitted"] and fitted["temperature_n"] == 30
    assert fitted["temperature_note"] == "fitted on val (n=30)"
    in_sample = calibrate({"eval": val, "fit": ([], [])}, 3, "val", "val")
    assert in_sample["temperature"] == fitted["temperature"] and "in-sample" in in_sample["temperature_note"]
    kept = calibrate({"eval": test, "fit": ([], [])}, 3, "test", "val", current_temperature=1.5)
    assert not kept["temperature_fitted"] and kept["temperature"] == 1.5
    assert "no labelled 'val' samples" in kept["temperature_note"]
    assert kept["ece"] != kept["ece_before_temperature"]   # ECE at the checkpoint's T vs at T = 1
    result = {**report(["neutral"], ["neutral"], LABELS), **fitted, "rouge_l": None, "confusion_png": "c.png",
              "samples": "x", "reliability_png": "r.png"}
    summary = _summary(result)
    assert {"ece", "ece_before_temperature", "temperature", "reliability_png"} <= set(summary)
    assert "per_class_recall" in _summary({k: v for k, v in result.items() if k != "ece"})  # older reports


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_scikit_learn_on_random_labels(seed):
    """Our hand-written UAR/WAR, confusion matrix and Cohen's kappa against scikit-learn's own
    (balanced accuracy, accuracy, confusion_matrix, cohen_kappa_score) on random label lists."""
    from sklearn import metrics

    from annotation.workflow import cohen_kappa

    rng = np.random.default_rng(seed)
    labels = ["neutral", "happiness", "sadness", "surprise", "fear"]
    truth = list(rng.choice(labels, 200, p=[0.4, 0.3, 0.15, 0.1, 0.05]))
    predicted = [t if rng.random() < 0.6 else rng.choice(labels) for t in truth]
    matrix = confusion_matrix(truth, predicted, labels)
    assert (matrix == metrics.confusion_matrix(truth, predicted, labels=labels)).all()
    assert war(matrix) == pytest.approx(metrics.accuracy_score(truth, predicted))
    assert uar(matrix) == pytest.approx(metrics.balanced_accuracy_score(truth, predicted))
    recall = metrics.recall_score(truth, predicted, labels=labels, average=None)
    assert list(per_class_recall(matrix, labels).values()) == pytest.approx(list(recall))
    assert cohen_kappa(truth, predicted) == pytest.approx(metrics.cohen_kappa_score(truth, predicted))
