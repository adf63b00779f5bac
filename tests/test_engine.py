"""The shared engine under concurrent load: right answers, right errors, batching, hot-swap."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.engine import Engine, EngineBusy, EngineConfig, RequestTimeout
from core.errors import MediaError, UserError
from core.model.build import build_tiny
from tests.media_files import face_frames, face_photo, no_face_photo, write_image, write_video
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-files")
    bad = root / "broken.jpg"
    bad.write_text("not an image")
    return {"face": write_image(root / "face.jpg", face_photo()),
            "empty": write_image(root / "coffee.jpg", no_face_photo()),
            "video": write_video(root / "clip.mp4", face_frames(8), fps=4),
            "bad": bad}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):  # noqa: F811
    engine = Engine(str(tiny_checkpoint), EngineConfig(max_batch=8, batch_window_ms=150, num_frames=4,
                                                       max_new_tokens=8))
    yield engine
    engine.close()


def test_prior_only_mode_says_so_and_never_invents(files):
    engine = Engine(None, EngineConfig(num_frames=4))
    try:
        result = engine.predict(files["face"])
        assert result["mode"] == "prior-only" and "No EMO-LLaMA checkpoint" in result["note"]
        assert result["label"] == "happiness" and sum(result["scores"].values()) == pytest.approx(1.0)
        assert result["faces"][0]["prior"]["happiness"] > 0.5
        empty = engine.predict(files["empty"])
        assert empty["label"] is None and empty["scores"] == {} and "No face found" in empty["note"]
        video = engine.predict(files["video"])
        assert video["label"] == "happiness" and {f["frame"] for f in video["faces"]} == {0, 1, 2, 3}
        with pytest.raises(MediaError):
            engine.predict(files["bad"])
        eight = engine.predict(files["face"], label_set=["happiness", "sadness", "contempt"])
        assert list(eight["scores"]) == ["happiness", "sadness"] and "cannot score contempt" in eight["note"]
        with pytest.raises(UserError, match="can be scored"):
            engine.predict(files["face"], label_set=["positive", "negative"])
    finally:
        engine.close()


def test_face_crops_and_face_notes_reach_every_mode(engine, files, tmp_path):
    """aligned=True travels with the request to the analyser, in prior-only and checkpoint mode,
    alone and in a batch with ordinary requests; what the analyser says lands in the note."""
    import cv2

    crop = write_image(tmp_path / "crop.png", cv2.resize(face_photo()[40:200, 150:300], (48, 48)))
    tiny = write_image(tmp_path / "tiny.png", face_photo()[::32, ::32])  # 16x16
    prior_only = Engine(None, EngineConfig(num_frames=4))
    try:
        for eng in (prior_only, engine):
            streams = [eng.stream(path, aligned=aligned, explain=False)
                       for path, aligned in ((crop, True), (files["face"], False), (tiny, False),
                                             (tiny, True))]
            results = [next(e for e in s if e["event"] == "done")["result"] for s in streams]
            as_crop, photo, too_small, tiny_crop = results
            assert as_crop["media"]["aligned"] is True and as_crop["faces"][0]["box"] == [0, 0, 48, 48]
            assert photo["media"]["aligned"] is False and photo["faces"][0]["box"][0] > 100
            assert too_small["faces"] == [] and too_small["faces_found"] == 0
            assert too_small["note"].startswith("Too small to find a face (16×16; at least 20 px a side).")
            assert len(tiny_crop["faces"]) == 1 and "Too small" not in tiny_crop["note"]
            assert (as_crop["label"] is not None and tiny_crop["label"] is not None)
        assert too_small["label"] is not None  # a checkpoint answers from the whole frame
        assert "No face found" in too_small["note"] and "TEST FIXTURE" in too_small["note"]
    finally:
        prior_only.close()


def test_tiny_model_answers_are_labelled_as_a_test_fixture(engine, files):
    result = engine.predict(files["face"])
    assert result["model_version"].startswith("tiny-test-fixture:") and result["mode"] == "tiny-test-fixture"
    assert "TEST FIXTURE" in result["note"]
    assert list(result["scores"]) == engine._model.config.label_set
    assert result["label"] == max(result["scores"], key=result["scores"].get)
    assert set(result["timings_ms"]) >= {"decode", "faces", "model"}


def test_quantized_engine_from_the_environment(tiny_checkpoint, files, monkeypatch):  # noqa: F811
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("EMO_QUANTIZATION", "8bit")   # what `serve --quantize 8bit` sets
    engine = Engine(str(tiny_checkpoint), EngineConfig(num_frames=4, max_new_tokens=4))
    try:
        assert engine.health()["quantization"] == "8bit"
        assert any(type(m).__name__ == "Linear8bitLt" for m in engine._model.llm.modules())
        result = engine.predict(files["face"])
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-4) and result["label"]
    finally:
        engine.close()


def test_stream_events_come_in_order(engine, files):
    events = list(engine.stream(files["face"]))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "analysis" and kinds[-1] == "done" and set(kinds[1:-1]) <= {"text"}
    text = "".join(e["text"] for e in events if e["event"] == "text")
    assert text.strip() == events[-1]["result"]["explanation"]

    cancelled = engine.health()["cancelled"]
    stream = engine.stream(files["face"])
    assert next(stream)["event"] == "analysis"
    stream.close()  # the client went away mid-answer: its slot is free at once
    assert engine.health()["in_flight"] == 0 and engine.health()["cancelled"] == cancelled + 1
    assert list(stream) == []


def test_32_mixed_concurrent_requests_match_solo_answers(engine, files, tiny_checkpoint):  # noqa: F811
    solo = Engine(str(tiny_checkpoint), EngineConfig(max_batch=1, batch_window_ms=0, num_frames=4, max_new_tokens=8))
    try:
        expected = {kind: solo.predict(files[kind]) for kind in ("face", "empty", "video")}
    finally:
        solo.close()
    kinds = ["face", "empty", "video", "bad"] * 8

    def call(kind):
        try:
            return engine.predict(files[kind])
        except MediaError as exc:
            return exc

    before = dict(engine.health()["batch_sizes"])
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, kinds))
    for kind, result in zip(kinds, results):
        if kind == "bad":
            assert isinstance(result, MediaError) and "not an image" in str(result)
            continue
        assert result["label"] == expected[kind]["label"]
        assert list(result["scores"].values()) == pytest.approx(list(expected[kind]["scores"].values()), abs=1e-4)
        assert result["explanation"] == expected[kind]["explanation"]
    after = engine.health()["batch_sizes"]
    assert any(size > 1 and after.get(size, 0) > before.get(size, 0) for size in after)  # really batched


def test_busy_error_and_cancellation_frees_the_slot(tiny_checkpoint, files):  # noqa: F811
    engine = Engine(str(tiny_checkpoint), EngineConfig(max_queue=2, num_frames=4, max_new_tokens=8))
    try:
        first = engine.stream(files["video"])
        second = engine.stream(files["video"])
        with pytest.raises(EngineBusy, match="busy"):
            engine.stream(files["face"])
        first.close()
        third = engine.stream(files["face"])  # the cancelled request's slot is free again
        assert [e["event"] for e in third][-1] == "done"
        assert [e["event"] for e in second][-1] == "done"
        health = engine.health()
        assert health["rejected_busy"] == 1 and health["cancelled"] >= 1 and health["in_flight"] == 0
    finally:
        engine.close()


def test_timeout_is_a_clear_error(engine, files):
    with pytest.raises(RequestTimeout):
        engine.predict(files["video"], timeout=0.001)


def test_hot_swap_under_load_drops_nothing(tiny_checkpoint, files, tmp_path):  # noqa: F811
    other = build_tiny(tmp_path / "v2", seed=1, version="v2")
    engine = Engine(str(tiny_checkpoint), EngineConfig(num_frames=2, max_new_tokens=4))
    try:
        results, errors = [], []

        def client():
            for _ in range(4):
                try:
                    results.append(engine.predict(files["face"]))
                except Exception as exc:  # pragma: no cover - the assertion below reports it
                    errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        engine.load_version(str(other), name="v2")
        for t in threads:
            t.join()
        assert not errors and len(results) == 16
        versions = {r["model_version"] for r in results}
        assert versions <= {"tiny-test-fixture:tiny-base", "tiny-test-fixture:v2"}
        assert engine.predict(files["face"])["model_version"] == "tiny-test-fixture:v2"
        with pytest.raises(Exception):
            engine.load_version(str(tmp_path / "missing"))
        assert engine.info["model_version"] == "tiny-test-fixture:v2"  # a failed load changes nothing
    finally:
        engine.close()


def test_hot_swap_onto_the_same_base_shares_it_and_releases_the_old_adapter(tiny_checkpoint, files, tmp_path):  # noqa: F811
    from core.model.modeling import EmoLlama

    base = EmoLlama.from_pretrained(tiny_checkpoint)
    folder = base.save_pretrained(tmp_path / "v3", version="v3")  # same base, its own adapter
    engine = Engine(str(tiny_checkpoint), EngineConfig(num_frames=2, max_new_tokens=4))
    try:
        before = engine._model
        engine.load_version(str(folder))
        assert engine._model.llm is before.llm  # the frozen base was not loaded twice
        result = engine.predict(files["face"])
        assert result["model_version"] == "tiny-test-fixture:v3"
        assert before.adapter_name not in engine._model.llm.peft_config  # released between batches
    finally:
        engine.close()


def test_a_request_that_breaks_the_model_fails_alone(engine, files, monkeypatch):
    model = engine._model
    poison = model._qformer_ids("POISON")
    real_generate = model.generate

    def generate(batch, *args, **kwargs):
        if any(x.question_ids == poison for x in batch):
            raise RuntimeError("boom")
        return real_generate(batch, *args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    expected = engine.predict(files["face"])
    before = engine.health()["batch_sizes"]

    def call(question):
        try:
            return list(engine.stream(files["face"], question=question))
        except UserError as exc:
            return exc

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(call, [None, "POISON", None, None]))
    assert isinstance(outcomes[1], UserError) and "model failed on this input" in str(outcomes[1])
    for events in outcomes[:1] + outcomes[2:]:
        kinds = [e["event"] for e in events]
        assert kinds.count("analysis") == 1 and kinds[-1] == "done"  # the retry repeats nothing
        text = "".join(e["text"] for e in events if e["event"] == "text")
        assert text.strip() == events[-1]["result"]["explanation"] == expected["explanation"]
    after = engine.health()["batch_sizes"]
    assert any(size > 1 and after.get(size, 0) > before.get(size, 0) for size in after)  # it was batched
    assert engine.predict(files["face"])["label"] == expected["label"]  # the model thread lives on


def test_close_fails_waiting_requests_and_refuses_new_ones(tiny_checkpoint, files):  # noqa: F811
    engine = Engine(str(tiny_checkpoint), EngineConfig(num_frames=4, max_new_tokens=8))
    waiting = [engine.stream(files["video"]) for _ in range(3)]
    engine.close()
    outcomes = []
    for stream in waiting:  # every request ends: answered before the shutdown, or a clear error
        try:
            outcomes.append([e["event"] for e in stream][-1])
        except UserError as exc:
            outcomes.append(str(exc))
    assert set(outcomes) <= {"done", "the engine was shut down before this request ran"}
    assert "done" not in outcomes[-1:]  # decoding a video takes longer than closing
    assert engine.health()["in_flight"] == 0
    with pytest.raises(UserError, match="shut down"):
        engine.predict(files["face"])
