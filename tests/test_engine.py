"""The shared engine under concurrent load: right answers, right errors, batching, hot-swap."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.engine import Engine, EngineBusy, EngineConfig, RequestTimeout
from core.errors import MediaError, ModelLoadError, UserError
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
        with pytest.raises(ModelLoadError, match="no such checkpoint folder"):
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
    real_prefill = model.prefill  # the engine's generation starts here (continuous batching)

    def prefill(batch, *args, **kwargs):
        if any(x.question_ids == poison for x in batch):
            raise RuntimeError("boom")
        return real_prefill(batch, *args, **kwargs)

    monkeypatch.setattr(model, "prefill", prefill)
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


def _vit_prior(folder):
    """A tiny transformers expression classifier: a prior network other than mini-Xception,
    with a 32-wide embedding (mini-Xception's is 128)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64,
                       id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_serving_and_swap_name_the_version_without_parsing(tiny_checkpoint, files, tmp_path):  # noqa: F811
    engine = Engine(None, EngineConfig(num_frames=2, max_new_tokens=2))
    try:
        assert engine.serving.name == "prior-only" and engine.serving.mode == "prior-only"
        serving = engine.swap(str(tiny_checkpoint), name="v1")
        assert serving == engine.serving and serving.name == "v1" and serving.folder == str(tiny_checkpoint)
        assert serving.mode == "tiny-test-fixture"
        assert engine.predict(files["face"])["model_version"] == "tiny-test-fixture:v1"
        with pytest.raises(UserError):
            engine.swap(str(tmp_path / "missing"), name="v2")
        assert engine.serving == serving  # a failed swap changes nothing
        assert engine.load_version(str(tiny_checkpoint), name="v1b").name == "v1b"  # the old name
    finally:
        engine.close()


def test_requests_run_on_the_version_and_analyser_they_were_prepared_for(tiny_checkpoint, files, tmp_path):  # noqa: F811
    """Swaps between two versions with different bases and prior networks while requests are in
    flight: each request answers from the version it was submitted to, as that version alone."""
    other = build_tiny(tmp_path / "vb", seed=1, version="vb", prior=_vit_prior(tmp_path / "prior"),
                       prior_dim=32)
    engine = Engine(str(tiny_checkpoint), EngineConfig(max_batch=8, batch_window_ms=200, num_frames=2,
                                                       max_new_tokens=4))
    kinds = ("face", "video", "empty")
    try:
        first_prior = engine.info["face_pipeline"]["prior"]
        solo = {"tiny-base": {kind: engine.predict(files[kind]) for kind in kinds}}
        engine.swap(str(other))
        assert engine.info["face_pipeline"]["prior"] != first_prior  # its own prior network
        solo["vb"] = {kind: engine.predict(files[kind]) for kind in kinds}
        engine.swap(str(tiny_checkpoint))
        assert engine.serving.name == "tiny-base"
        # Requests submitted to one version, then a swap before they have run, three times over.
        expected, streams = [], []
        for target, version in ((str(other), "tiny-base"), (str(tiny_checkpoint), "vb"),
                                (str(other), "tiny-base")):
            for kind in kinds * 2:
                streams.append(engine.stream(files[kind]))
                expected.append((version, kind))
            engine.swap(target)
        results = [next(e for e in s if e["event"] == "done")["result"] for s in streams]
    finally:
        engine.close()
    for (version, kind), result in zip(expected, results):
        want = solo[version][kind]
        assert result["model_version"] == f"tiny-test-fixture:{version}"
        assert [f["prior"].keys() for f in result["faces"]] == [f["prior"].keys() for f in want["faces"]]
        for got, face in zip(result["faces"], want["faces"]):
            assert got["prior"] == pytest.approx(face["prior"], abs=1e-5)
        assert list(result["scores"].values()) == pytest.approx(list(want["scores"].values()), abs=1e-5)
        assert result["explanation"] == want["explanation"]


def test_one_vision_pass_per_request_shared_by_scoring_and_generation(engine, files):
    """An image with one face: its frame and face go through the vision tower once (2 images in
    1 pass), not once for scoring and again for generation; a 4-frame video: 1 pass."""
    model = engine._model
    expected = engine.predict(files["face"])
    passes: list[int] = []
    handle = model.vision.embeddings.register_forward_hook(
        lambda module, args, out: passes.append(int(args[0].shape[0])))
    try:
        result = engine.predict(files["face"], explain=True)
        assert passes == [1 + len(result["faces"])] == [2]
        passes.clear()
        video = engine.predict(files["video"], explain=True)
        faced_frames = len({f["frame"] for f in video["faces"]})
        assert passes == [4 + faced_frames]
    finally:
        handle.remove()
    assert list(result["scores"].values()) == pytest.approx(list(expected["scores"].values()), abs=1e-5)
    assert result["explanation"] == expected["explanation"]


def test_the_frames_of_a_video_share_one_prior_pass(engine):
    """FaceAnalyzer.analyze_frames: every frame's faces through the prior network in one batch,
    with what analysing each frame alone gives."""
    frames = face_frames(4)
    analyzer = engine.faces
    alone = [analyzer.analyze(frame) for frame in frames]
    passes: list[int] = []
    handle = analyzer.prior.model.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    try:
        together = analyzer.analyze_frames(frames)
    finally:
        handle.remove()
    assert passes == [sum(len(fs) for fs in alone)] and passes[0] >= 4
    for one, many in zip(alone, together):
        assert [f.box for f in one] == [f.box for f in many] and one.notes == many.notes
        for a, b in zip(one, many):
            assert b.prior == pytest.approx(a.prior, abs=1e-5)
            assert b.embedding == pytest.approx(a.embedding, abs=1e-5)


def test_the_analysis_event_carries_the_sampled_frames(engine, files):
    """The frames the boxes refer to come with the events: the UI draws without decoding again."""
    from core.media import load_media

    events = list(engine.stream(files["video"], explain=False))
    analysis, done = events[0], events[-1]
    decoded = load_media(str(files["video"]), num_frames=4).frames
    assert len(analysis["frames"]) == len(decoded) == 4 and done["frames"] is analysis["frames"]
    assert all((a == b).all() for a, b in zip(analysis["frames"], decoded))
    assert max(f["frame"] for f in done["result"]["faces"]) < len(done["frames"])
