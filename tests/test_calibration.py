"""Label calibration: the temperature fit, ECE by hand, and the fit stored with a version."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from annotation.calibration import (expected_calibration_error, fit_temperature, nll, reliability_bins,
                                    save_reliability_png, softmax)
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)


@pytest.mark.parametrize("true_t", [0.4, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    """Labels drawn from softmax(z / T0): the NLL-minimising T is T0 (up to sampling noise)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 3.0, (20000, 7))
    probs = softmax(logits, true_t)
    truth = (probs.cumsum(1) > rng.random((len(probs), 1))).argmax(1)
    fitted = fit_temperature(logits, truth)
    assert fitted == pytest.approx(true_t, rel=0.05)
    # it is the minimum: a little either side is worse
    assert nll(logits, truth, fitted) < min(nll(logits, truth, fitted * 0.9), nll(logits, truth, fitted * 1.1))
    # shifting a row changes no probability, so no temperature either
    assert fit_temperature(logits + rng.normal(0, 5, (len(logits), 1)), truth) == pytest.approx(fitted, rel=1e-4)


def test_fit_temperature_edge_cases():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    # always right with a margin: sharper is always better, down to the lower bound
    logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    assert fit_temperature(logits, np.array([0, 1])) == pytest.approx(1e-2, rel=1e-3)
    # always wrong: flatter is always better, up to the upper bound
    assert fit_temperature(logits, np.array([1, 0])) == pytest.approx(1e2, rel=1e-3)
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((3, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError):
        fit_temperature(np.array([[0.0, -np.inf]]), np.array([0]))


def test_nll_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]: NLL of class 1 is ln(4/3), of class 0 ln 4
    logits = np.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)]])
    assert nll(logits, np.array([1, 0])) == pytest.approx((np.log(4 / 3) + np.log(4)) / 2)
    # T = 2 halves the scores: softmax([0, ln 3 / 2]) = [1/(1+√3), √3/(1+√3)]
    assert nll(logits[:1], np.array([1]), 2.0) == pytest.approx(np.log((1 + np.sqrt(3)) / np.sqrt(3)))


PROBS = np.array([[0.9, 0.1],    # top 0.9, right
                  [0.6, 0.4],    # top 0.6, wrong (truth 1)
                  [0.3, 0.7],    # top 0.7, right
                  [0.8, 0.2]])   # top 0.8, right
TRUTH = np.array([0, 1, 1, 0])


def test_ece_on_hand_computed_cases():
    # 10 bins: every sample alone in its bin -> mean |correct - confidence|
    # = (|1 - .9| + |0 - .6| + |1 - .7| + |1 - .8|) / 4 = (.1 + .6 + .3 + .2) / 4 = 0.3
    assert expected_calibration_error(PROBS, TRUTH, bins=10) == pytest.approx(0.3)
    # 2 bins: all four in (0.5, 1]: accuracy 3/4, mean confidence (.9+.6+.7+.8)/4 = .75 -> 0
    assert expected_calibration_error(PROBS, TRUTH, bins=2) == pytest.approx(0.0)
    # 1 bin, all right: |1 - .75| = .25
    assert expected_calibration_error(PROBS, np.array([0, 0, 1, 0]), bins=1) == pytest.approx(0.25)
    # two bins of different sizes, weighted by size: confidences .55, .65 (right, wrong) in
    # (0.5, 0.75] -> |.5 - .6| = .1 ; .95 (right) in (0.75, 1] -> |1 - .95| = .05 ; ECE = 2/3 .1 + 1/3 .05
    probs = np.array([[0.55, 0.45], [0.35, 0.65], [0.95, 0.05]])
    assert expected_calibration_error(probs, np.array([0, 0, 0]), bins=4) == pytest.approx(2 / 3 * 0.1 + 1 / 3 * 0.05)
    # an edge belongs to the bin below it: 0.5 with 2 bins is in (0, 0.5]
    cells = reliability_bins(np.array([[0.5, 0.5]]), np.array([0]), bins=2)
    assert [c["n"] for c in cells] == [1, 0] and cells[0]["accuracy"] == 1.0 and cells[1]["accuracy"] is None
    # a perfectly confident, always right model is perfectly calibrated
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0
    assert expected_calibration_error(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 0.0


def test_temperature_lowers_ece_of_an_overconfident_model_and_the_diagram_is_written(tmp_path):
    rng = np.random.default_rng(2)
    logits = rng.normal(0.0, 3.0, (5000, 5))
    truth = (softmax(logits, 3.0).cumsum(1) > rng.random((5000, 1))).argmax(1)   # true T = 3
    before, t = softmax(logits), fit_temperature(logits, truth)
    after = softmax(logits, t)
    assert expected_calibration_error(after, truth) < 0.03 < 0.1 < expected_calibration_error(before, truth)
    assert (after.argmax(1) == before.argmax(1)).all()   # the same labels win
    path = save_reliability_png(after, truth, tmp_path / "r" / "rel.png", "test", probs_before=before, temperature=t)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_temperature_is_written_into_a_local_checkpoint_config_only(tmp_path):
    from annotation.versions import save_label_temperature
    from core.model.config import EmoLlamaConfig

    EmoLlamaConfig(version="v7").save(tmp_path)
    assert save_label_temperature(tmp_path, 1.75)
    again = EmoLlamaConfig.load(tmp_path)
    assert again.label_temperature == 1.75 and again.version == "v7"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]   # no temporary left behind
    assert not save_label_temperature(tmp_path / "missing", 2.0)
    assert not save_label_temperature("org/hub-model", 2.0)


# ------------------------------------------------------------- evaluation, on the tiny model

COLOURS = {"happiness": (220, 40, 40), "sadness": (40, 40, 220), "surprise": (40, 200, 40)}


@pytest.fixture()
def store(tmp_path, monkeypatch, tiny_checkpoint):  # noqa: F811
    from annotation.ingest import import_dataset
    from annotation.versions import register_version
    from db.session import init_db

    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path / "data"))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("EMO_DB_URL", url)
    init_db(url)
    checkpoint = tmp_path / "ckpt"   # a copy: evaluation writes the fitted T into config.json
    shutil.copytree(tiny_checkpoint, checkpoint, symlinks=True)
    register_version("base", checkpoint, is_tiny=True, published=True, url=url)
    rng = np.random.default_rng(0)
    for name, splits in (("colours", ("val", "val", "val", "test", "test")), ("noval", ("test", "test"))):
        folder = tmp_path / name
        folder.mkdir()
        rows = []
        for label, colour in COLOURS.items():
            for i, split in enumerate(splits):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{label}-{i}.png")
                rows.append(f"{label}-{i}.png,{label},{split}")
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
        import_dataset("csv", folder / "labels.csv", name, url=url, progress=False)
    return checkpoint, url


def test_evaluation_fits_the_temperature_on_val_and_stores_it_with_the_version(store, capsys):
    import app
    from annotation.evaluate import evaluate_version
    from annotation.versions import find_version
    from core.model.config import EmoLlamaConfig

    checkpoint, url = store
    result = evaluate_version("base", "colours", "test", url=url, num_frames=1)
    assert result["n"] == 6 and result["temperature_fitted"] and result["temperature_saved"]
    assert result["temperature_split"] == "val" and result["temperature_n"] == 9
    t = result["temperature"]
    assert 1e-2 <= t <= 1e2 and EmoLlamaConfig.load(checkpoint).label_temperature == pytest.approx(t)
    assert 0.0 <= result["ece"] <= 1.0 and 0.0 <= result["ece_before_temperature"] <= 1.0
    assert result["label_scoring"] == "mean"
    assert open(result["reliability_png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    stored = find_version("base", url)["metrics"]["colours/test"]
    assert stored["temperature"] == t and stored["ece"] == result["ece"]
    assert stored["ece_before_temperature"] == result["ece_before_temperature"]
    assert stored["reliability_png"] == result["reliability_png"]

    # Fitting on val while evaluating val (in-sample) scores the same samples the same way, and
    # the raw scores are taken at T = 1 whatever T the checkpoint holds now: the same T again.
    same = evaluate_version("base", "colours", "val", url=url, num_frames=1)
    assert same["temperature"] == pytest.approx(t, rel=1e-4) and "in-sample" in same["temperature_note"]
    assert same["nll"] <= same["nll_before_temperature"] + 1e-9   # the fit's own objective

    # No val split: nothing fitted, the checkpoint's T kept, and the report says so.
    none = evaluate_version("base", "noval", "test", url=url, num_frames=1)
    assert not none["temperature_fitted"] and not none["temperature_saved"]
    assert "no labelled 'val' samples" in none["temperature_note"]
    # (kept = what the in-sample evaluation above saved last, equal to t only to its 1e-4)
    kept = same["temperature"]
    assert none["temperature"] == pytest.approx(kept) and EmoLlamaConfig.load(checkpoint).label_temperature == pytest.approx(kept)

    # The command line prints it.
    capsys.readouterr()
    assert app.main(["evaluate", "--version", "base", "--dataset", "colours", "--frames", "1"]) == 0
    out = capsys.readouterr().out
    assert "calibration: ECE" in out and "fitted on val (n=9)" in out and "reliability diagram:" in out
    assert app.main(["evaluate", "--version", "base", "--dataset", "colours", "--frames", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"ece", "ece_before_temperature", "temperature", "reliability_png"} <= set(report)
