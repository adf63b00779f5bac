"""Continuous batching: rows that join a running decode batch, or leave it, change no one's tokens.

    python -m pytest -q tests/test_continuous_batching.py

The interleavings are forced, never timed: DecodeBatch is driven step by step here, and the
engine tests submit the next request from inside the model's decode hook (then wait until it is
queued), so it is ready exactly between two given steps.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from core.engine import Engine, EngineConfig
from core.faces import shared_analyzer
from core.model.decoding import DecodeBatch
from core.model.modeling import EmoLlama
from tests.media_files import face_frames, face_photo, no_face_photo, write_image, write_video
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)

N = 10  # new tokens per row unless a test says otherwise


@pytest.fixture(scope="module")
def model(tiny_checkpoint):  # noqa: F811
    return EmoLlama.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def inputs(model):
    """Four prompts of different lengths (43, 58, 57 and 75 positions on the tiny checkpoint)."""
    photo = face_photo()
    faces = shared_analyzer().analyze(photo)
    long_question = "Describe the face in detail please, every muscle and every wrinkle of it."
    xs = [model.prepare([photo], [faces], "Why?"),
          model.prepare([photo] * 4, [faces] * 4, "What is the facial expression of the person in the image?"),
          model.prepare([np.full((40, 40, 3), 200, np.uint8)], [[]], long_question),
          model.prepare([photo], [faces], long_question)]
    lengths = [_prompt_length(model, x) for x in xs]
    assert len(set(lengths)) == 4 and lengths[0] == min(lengths) and lengths[3] == max(lengths)
    return xs


def _prompt_length(model, x) -> int:
    return model.prompt_embeddings(x).shape[0]


def _alone(model, x, n: int = N, stop=None) -> list[int]:
    batch = DecodeBatch(model)
    (row,) = batch.add([x], max_new_tokens=n, stop=stop)
    while batch:
        batch.step()
    return row.tokens


@pytest.fixture(scope="module")
def solo(model, inputs):
    tokens = [_alone(model, x) for x in inputs]
    assert all(len(t) == N for t in tokens)  # no early stop: every row decodes all N steps
    return tokens


def _run(batch: DecodeBatch, joins: dict[int, list], **add_args) -> list:
    """Step `batch` to the end; `joins[k]` joins before step k. Returns the rows in join order."""
    rows, step = [], 0
    while batch or any(k >= step for k in joins):
        if step in joins:
            rows += batch.add(joins[step], **add_args)
        batch.step()
        step += 1
    return rows


def test_rows_joining_at_different_steps_get_what_they_get_alone(model, inputs, solo):
    """The shortest prompt runs; a longer one joins at step 2 (the running row is padded); a
    shorter and a longer one join together at step 5; each row's tokens equal its solo run, and
    generate() reimplemented on the decoder gives the same text."""
    batch, sizes = DecodeBatch(model), []
    real_step = batch.step
    batch.step = lambda: (sizes.append(len(batch)), real_step())[1]
    rows = _run(batch, {0: [inputs[0]], 2: [inputs[1]], 5: [inputs[2], inputs[3]]}, max_new_tokens=N)
    assert [row.tokens for row in rows] == solo
    assert sizes[:2] == [1, 1] and sizes[2:5] == [2, 2, 2] and 4 in sizes  # they really shared steps
    for x, row in zip(inputs, rows):
        assert model.generate([x], max_new_tokens=N) == [row.answer]
        assert row.finish_reason == "length"


def test_a_joiner_does_not_change_the_running_rows_logits(model, inputs):
    """Step by step, the running rows' logits with and without a row joining at step 3 (a longer
    prompt, so every running row is re-padded) agree to float32 rounding."""
    def logits_per_step(joiner: bool) -> list[torch.Tensor]:
        batch = DecodeBatch(model)
        batch.add(inputs[:3], max_new_tokens=N)
        seen = []
        for step in range(N - 1):
            if joiner and step == 3:
                batch.add([inputs[3]], max_new_tokens=N)
            seen.append(batch._logits[:3].clone())
            batch.step()
        return seen

    for without, with_joiner in zip(logits_per_step(False), logits_per_step(True)):
        assert torch.allclose(without, with_joiner, atol=1e-5)


def test_a_cancelled_row_leaves_at_once_and_the_rest_finish_equal(model, inputs, solo):
    gone = threading.Event()
    batch = DecodeBatch(model)
    rows = batch.add(inputs, max_new_tokens=N, is_active=lambda key: not (key == 1 and gone.is_set()))
    for _ in range(3):
        batch.step()
    gone.set()  # request 1's client goes away after three tokens
    finished = batch.step()
    assert finished == [rows[1]] and rows[1].finish_reason == "cancelled" and len(batch) == 3
    assert rows[1].tokens == solo[1][:3]
    while batch:
        batch.step()
    assert [rows[i].tokens for i in (0, 2, 3)] == [solo[i] for i in (0, 2, 3)]


def test_per_row_limits_and_stop_tokens(model, inputs, solo):
    """Rows with 3, 10 and 6 new tokens leave when they reach theirs; a row given a stop token
    ends just before it, as a solo run with that stop token does."""
    batch = DecodeBatch(model)
    rows = batch.add(inputs[:3], max_new_tokens=[3, N, 6])
    first = next(i for i, t in enumerate(solo[3]) if t not in solo[3][:i] and i >= 3)
    stop = {solo[3][first]}
    rows += batch.add([inputs[3]], max_new_tokens=N, stop=stop)
    sizes = []
    while batch:
        sizes.append(len(batch))
        batch.step()
    assert [len(r.tokens) for r in rows] == [3, N, 6, first]
    assert rows[0].tokens == solo[0][:3] and rows[1].tokens == solo[1] and rows[2].tokens == solo[2][:6]
    assert rows[3].tokens == _alone(model, inputs[3], stop=stop) == solo[3][:first]
    assert rows[3].finish_reason == "stop" and rows[0].finish_reason == "length"
    assert sizes[:3] == [4, 4, 4] and sizes[3] == 3 and len(sizes) == N  # each left on its own step


def test_the_kv_merge_pads_either_side_and_trims_what_no_row_needs(model, inputs, solo):
    """A longer joiner pads the running rows, a shorter one is padded; once the longest rows have
    left, the cache keeps only the columns a remaining row still attends to."""
    short, mid, long_ = (_prompt_length(model, inputs[i]) for i in (0, 1, 3))
    batch = DecodeBatch(model)
    rows = batch.add([inputs[0]], max_new_tokens=N)
    batch.step()
    assert batch.length == short + 1
    rows += batch.add([inputs[3]], max_new_tokens=4)       # longer than the running row
    assert batch.length == long_
    batch.step()
    rows += batch.add([inputs[1]], max_new_tokens=N)       # shorter than the running rows
    assert batch.length == long_ + 1 and len(batch) == 3
    while len(rows[1].tokens) < 4:
        batch.step()
    assert len(batch) == 2 and rows[1].finish_reason == "length"
    # Left: the short and the mid row, each its prompt + the tokens fed so far; the long row's
    # leading columns are gone.
    assert batch.length == max(short + len(rows[0].tokens), mid + len(rows[2].tokens)) < long_
    layer = batch._cache.layers[0]
    assert layer.keys.shape[0] == 2 and layer.keys.shape[2] == batch.length == batch._mask.shape[1]
    assert bool(batch._mask[:, 0].any())
    while batch:
        batch.step()
    assert rows[0].tokens == solo[0] and rows[2].tokens == solo[1] and rows[1].tokens == solo[3][:4]


# ------------------------------------------------------------------ through the engine
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous-files")
    return {"face": write_image(root / "face.jpg", face_photo()),
            "video": write_video(root / "clip.mp4", face_frames(8), fps=4),
            "empty": write_image(root / "coffee.jpg", no_face_photo())}


class _Arrivals:
    """Submits the next request from inside the model's decode hook (on the model thread) and
    waits until preprocessing has queued it, so it is ready right after a chosen step."""

    def __init__(self, engine: Engine, schedule: dict[int, str]):
        self.engine, self.schedule, self.streams, self.calls = engine, schedule, [], 0
        self._queued: list = []
        self._cond = threading.Condition()
        real_put = engine._queue.put

        def put(request, *args, **kwargs):
            real_put(request, *args, **kwargs)
            with self._cond:
                self._queued.append(request)
                self._cond.notify_all()

        engine._queue.put = put
        model = engine._model
        real_decode = model.decode

        def decode(*args, **kwargs):
            self.calls += 1
            if self.calls in self.schedule:
                stream = engine.stream(self.schedule[self.calls])
                self.streams.append(stream)
                with self._cond:
                    assert self._cond.wait_for(lambda: any(r is stream._request for r in self._queued), 60)
            return real_decode(*args, **kwargs)

        model.decode = decode


def _events(stream) -> list[dict]:
    return list(stream)


@pytest.mark.parametrize("continuous", [True, False])
def test_requests_arriving_mid_decode_join_the_running_batch(tiny_checkpoint, files, continuous):  # noqa: F811
    """A photo decodes; a video (a longer prompt) arrives during step 2 and a face-free photo
    (shorter) during step 4. Continuous: each joins at the next step, and every answer equals its
    request run alone (model.generate([x])). Static (continuous=False): they wait for the batch."""
    engine = Engine(str(tiny_checkpoint), EngineConfig(num_frames=4, max_new_tokens=8, continuous=continuous))
    try:
        model = engine._model
        arrivals = _Arrivals(engine, {2: files["video"], 4: files["empty"]})
        first = engine.stream(files["face"])
        outcomes = [_events(first)] + [_events(s) for s in arrivals.streams]
        requests = [first._request] + [s._request for s in arrivals.streams]
        sizes = engine.health()["batch_sizes"]
        del model.decode  # the real hook again, for the solo runs
        for events, request in zip(outcomes, requests):
            kinds = [e["event"] for e in events]
            assert kinds[0] == "analysis" and kinds[-1] == "done" and set(kinds[1:-1]) == {"text"}
            explanation = events[-1]["result"]["explanation"]
            assert "".join(e["text"] for e in events if e["event"] == "text").strip() == explanation
            assert [explanation] == model.generate([request.text_input], max_new_tokens=8)
        if continuous:
            assert max(sizes) == 3 and sizes.get(2, 0) >= 2  # joined at steps 3 and 5
        else:
            assert max(sizes) == 2 and sizes[1] >= 8  # the photo decoded alone; the others waited
    finally:
        engine.close()


def test_a_failing_decoding_step_retries_its_rows_alone(tiny_checkpoint, files):  # noqa: F811
    """The step that runs two rows raises once: both are decoded again alone, finish with their
    solo answers, and no text is streamed twice."""
    engine = Engine(str(tiny_checkpoint), EngineConfig(num_frames=4, max_new_tokens=8))
    try:
        model = engine._model
        arrivals = _Arrivals(engine, {1: files["video"]})
        real_decode = model.decode
        failed = []

        def decode(next_ids, *args, **kwargs):
            if len(next_ids) == 2 and not failed:
                failed.append(True)
                raise RuntimeError("boom")
            return real_decode(next_ids, *args, **kwargs)

        model.decode = decode
        first = engine.stream(files["face"])
        outcomes = [_events(first)] + [_events(s) for s in arrivals.streams]
        requests = [first._request] + [s._request for s in arrivals.streams]
        assert failed and len(outcomes) == 2
        del model.decode
        for events, request in zip(outcomes, requests):
            kinds = [e["event"] for e in events]
            assert kinds.count("analysis") == 1 and kinds[-1] == "done"
            explanation = events[-1]["result"]["explanation"]
            assert "".join(e["text"] for e in events if e["event"] == "text").strip() == explanation
            assert [explanation] == model.generate([request.text_input], max_new_tokens=8)
        assert engine.health()["failed"] == 0
    finally:
        engine.close()


def test_a_cache_that_cannot_be_repadded_takes_no_joiners_but_still_decodes(model, inputs, solo):
    """Sliding-window layers keep a window, not one column per token: such a batch says it is not
    joinable (the engine then batches statically), refuses a joiner clearly, and still drops
    finished rows and decodes the rest as alone."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    batch = DecodeBatch(model)
    rows = batch.add(inputs[:2], max_new_tokens=[3, N])
    assert batch.joinable
    sliding = []
    for layer in batch._cache.layers:
        window = DynamicSlidingWindowLayer(sliding_window=4096)  # wider than any row: same answers
        window.lazy_initialization(layer.keys, layer.values)
        window.keys, window.values, window.cumulative_length = layer.keys, layer.values, layer.keys.shape[-2]
        sliding.append(window)
    batch._cache.layers[:] = sliding
    assert not batch.joinable
    with pytest.raises(NotImplementedError, match="full-attention"):
        batch.add([inputs[2]])
    while batch:
        batch.step()
    assert rows[0].tokens == solo[0][:3] and rows[1].tokens == solo[1]
