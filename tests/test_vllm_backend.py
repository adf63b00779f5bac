"""The vLLM serving backend (core/model/remote.py) end to end: Engine() with EMO_VLLM_URL set,
through the real `openai` client, against tests/fake_openai.py speaking vLLM's wire format.

    python -m pytest -q tests/test_vllm_backend.py
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from core.engine import Engine, EngineConfig
from core.errors import MediaError, ModelLoadError, UserError
from core.labels import BASIC7
from core.model.recipe import category_question, conversation_question
from core.model.remote import OpenAIChatModel, RemoteInput, RemoteMedia, answer_logprobs
from tests.fake_openai import COLOURS, EXPLANATION, FakeVLLM, tokenize
from tests.fake_openai import answer_logprobs as fake_answer_logprobs
from tests.media_files import face_photo, write_image, write_video

KEY = "sk-vllm-test-secret-0123456789"
BASE = "Qwen/Qwen2.5-VL-3B-Instruct"
SPEC = f"zero-shot:{BASE}"
ADAPTER = "emo-llama-v3"          # a LoRA adapter the server serves by name (--lora-modules)
NEW_TOKENS = 12


def solid(label: str, size=(48, 64)) -> np.ndarray:
    return np.full((*size, 3), COLOURS[label], dtype=np.uint8)


def expected_scores(truth: str, labels=BASIC7) -> dict[str, float]:
    """Mean log-prob of each label's tokens + end token (the fake's rules), softmaxed."""
    means = [float(np.mean(fake_answer_logprobs(label, truth))) for label in labels]
    weights = [math.exp(m - max(means)) for m in means]
    return {label: w / sum(weights) for label, w in zip(labels, weights)}


def explanation(label: str) -> str:
    return "".join(tokenize(EXPLANATION.format(label=label))[:NEW_TOKENS]).strip()


def user_text(body: dict) -> str:
    return next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and KEY not in message
    return message


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-files")
    bad = root / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return {"blue": write_image(root / "blue.png", solid("sadness")),
            "yellow": write_image(root / "yellow.png", solid("happiness")),
            "face": write_image(root / "face.jpg", face_photo()),
            "video": write_video(root / "red.mp4", [solid("anger", (48, 64))] * 8, fps=4),
            "bad": bad}


@pytest.fixture(scope="module")
def fake():
    with FakeVLLM(models=[BASE, ADAPTER], api_key=KEY, slow_s=5.0) as server:
        yield server


@pytest.fixture(scope="module")
def engine(fake):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EMO_VLLM_URL", fake.url)
        env.setenv("EMO_VLLM_API_KEY", KEY)
        env.setenv("EMO_VLLM_TIMEOUT_S", "30")
        engine = Engine(SPEC, EngineConfig(max_batch=8, batch_window_ms=150, num_frames=4,
                                           max_new_tokens=NEW_TOKENS))
    yield engine
    engine.close()


@pytest.fixture
def clean(fake):
    """The fake in its normal state, its records emptied, before and after a test."""
    def reset():
        fake.default, fake.stream_delay_s, fake.delay_s = "ok", 0.0, 0.0
        fake.requests.clear(), fake.problems.clear(), fake.chunks_sent.clear()
        fake.aborted = fake.max_in_flight = 0
    reset()
    yield fake
    reset()


def test_an_image_gets_label_scores_explanation_and_the_remote_version(engine, clean, files):
    result = engine.predict(files["blue"])
    assert result["label"] == "sadness" and result["mode"] == "checkpoint"
    assert result["scores"] == pytest.approx(expected_scores("sadness"))
    assert sum(result["scores"].values()) == pytest.approx(1.0)
    assert result["explanation"] == explanation("sadness")
    assert result["model_version"] == f"{SPEC} via vLLM" and engine.serving.name == f"{SPEC} via vLLM"
    assert not clean.problems, clean.problems
    scoring = [r["body"] for r in clean.requests if not r["body"].get("stream")]
    talking = [r["body"] for r in clean.requests if r["body"].get("stream")]
    assert sorted(b["messages"][-1]["content"] for b in scoring) == sorted(BASIC7), len(scoring)
    assert len(talking) == 1
    assert {b["model"] for b in scoring + talking} == {BASE}
    assert all(r["images"] == 1 for r in clean.requests)
    question = category_question(BASIC7, "image", engine._model.config)
    for body in scoring:
        assert body["messages"][-1]["role"] == "assistant" and user_text(body) == question
        assert (body["prompt_logprobs"], body["add_generation_prompt"], body["continue_final_message"],
                body["max_tokens"]) == (1, False, False, 1)
    assert user_text(talking[0]) == conversation_question("image")
    assert talking[0]["max_tokens"] == NEW_TOKENS and "prompt_logprobs" not in talking[0]


def test_the_agr_sentence_travels_with_every_question(engine, clean, files):
    result = engine.predict(files["face"])
    agr = result["agr_sentence"]
    assert agr.startswith("The person appears to be") and result["faces"]
    texts = {user_text(r["body"]) for r in clean.requests}
    assert texts == {f"{agr}\n{category_question(BASIC7, 'image')}", f"{agr}\n{conversation_question('image')}"}


def test_a_video_streams_its_text_in_pieces_with_one_image_per_frame(engine, clean, files):
    with engine.stream(files["video"]) as events:
        events = list(events)
    pieces = [e["text"] for e in events if e["event"] == "text"]
    done = events[-1]["result"]
    assert events[0]["event"] == "analysis" and events[-1]["event"] == "done"
    assert len(pieces) > 3 and "".join(pieces).strip() == done["explanation"] == explanation("anger")
    assert done["label"] == "anger" and done["media"]["kind"] == "video"
    assert {r["images"] for r in clean.requests} == {4}   # num_frames=4 of the 8


def test_a_closed_stream_stops_the_request_on_the_server(engine, clean, files):
    clean.stream_delay_s = 0.05
    stream = engine.stream(files["yellow"])
    for event in stream:
        if event["event"] == "text":
            break
    stream.close()
    deadline = time.monotonic() + 10
    while not clean.aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert clean.aborted == 1
    assert clean.chunks_sent and clean.chunks_sent[-1] < NEW_TOKENS
    assert engine.predict(files["blue"], explain=False)["label"] == "sadness"   # still serving


def test_a_batch_of_clients_runs_concurrently_and_each_gets_its_own_answer(engine, clean, files):
    clean.delay_s = 0.05
    picks = ["blue", "yellow", "video", "blue", "yellow", "video"]
    before = dict(engine.health()["batch_sizes"])
    with ThreadPoolExecutor(len(picks)) as pool:
        results = list(pool.map(lambda name: engine.predict(files[name]), picks))
    truth = {"blue": "sadness", "yellow": "happiness", "video": "anger"}
    for name, result in zip(picks, results):
        assert result["label"] == truth[name] and result["explanation"] == explanation(truth[name])
        assert result["scores"] == pytest.approx(expected_scores(truth[name]))
    after = engine.health()["batch_sizes"]
    assert any(size > 1 and after[size] > before.get(size, 0) for size in after)  # batched...
    assert clean.max_in_flight > 1                                                 # ...and concurrent


@pytest.mark.parametrize("behaviour, words", [
    ("500", "refused the label scoring (HTTP 500)"),
    ("malformed", "unreadable answer to the label scoring"),
    ("no_logprobs", "sent no prompt_logprobs"),
    ("no_text", "is not in the prompt logprobs"),
])
def test_a_failing_server_gives_one_line_errors_and_the_engine_keeps_serving(engine, clean, files,
                                                                              behaviour, words):
    clean.default = behaviour
    with pytest.raises(UserError) as err:
        engine.predict(files["blue"])
    message = one_line(err)
    assert words in message and clean.url.rsplit("/", 1)[0] in message
    assert "EngineCore" not in message and '"' not in message   # no response body
    clean.default = "ok"
    assert engine.predict(files["blue"])["label"] == "sadness"


def test_a_server_slower_than_the_timeout(fake, clean, files, monkeypatch):
    monkeypatch.setenv("EMO_VLLM_URL", fake.url)
    monkeypatch.setenv("EMO_VLLM_API_KEY", KEY)
    monkeypatch.setenv("EMO_VLLM_TIMEOUT_S", "2")   # the "slow" behaviour takes 5 s
    engine = Engine(SPEC, EngineConfig(num_frames=2, max_new_tokens=4))
    try:
        clean.default = "slow"
        with pytest.raises(UserError) as err:
            engine.predict(files["blue"], explain=False)
        assert "did not answer the label scoring within 2 s (EMO_VLLM_TIMEOUT_S)" in one_line(err)
        clean.default = "ok"
        assert engine.predict(files["blue"], explain=False)["label"] == "sadness"
    finally:
        engine.close()


def test_a_failed_stream_is_retried_alone_and_repeats_no_text(engine, clean, files):
    clean.stream_delay_s = 0.01
    clean.plan_streams("500")   # the first explanation fails once; the other is mid-stream
    streams = [engine.stream(files[name]) for name in ("blue", "yellow")]
    for stream, truth in zip(streams, ("sadness", "happiness")):
        with stream as events:
            events = list(events)
        streamed = "".join(e["text"] for e in events if e["event"] == "text")
        assert events[-1]["result"]["explanation"] == explanation(truth) == streamed.strip()
    clean.plan_streams("500", "500")   # the retry fails too: that request fails, alone
    with pytest.raises(UserError) as err:
        engine.predict(files["blue"])
    assert "refused the explanation (HTTP 500)" in one_line(err)
    assert engine.predict(files["blue"])["explanation"] == explanation("sadness")


def test_a_server_that_goes_down_and_comes_back(files, clean):
    with FakeVLLM(models=[BASE]) as fake, pytest.MonkeyPatch.context() as env:
        port = int(fake.url.rsplit(":", 1)[1].split("/")[0])
        env.setenv("EMO_VLLM_URL", fake.url)
        env.delenv("EMO_VLLM_API_KEY", raising=False)
        engine = Engine(SPEC, EngineConfig(num_frames=2, max_new_tokens=4))
        try:
            fake.stop()
            with pytest.raises(UserError) as err:
                engine.predict(files["yellow"])
            assert "cannot reach the vLLM server at http://127.0.0.1" in one_line(err)
            with FakeVLLM(models=[BASE], port=port):
                assert engine.predict(files["yellow"])["label"] == "happiness"
        finally:
            engine.close()


def test_loading_says_what_is_wrong_with_the_server_or_the_name(fake, clean, monkeypatch):
    monkeypatch.setenv("EMO_VLLM_URL", fake.url)
    monkeypatch.setenv("EMO_VLLM_API_KEY", "sk-wrong")
    with pytest.raises(UserError) as err:
        Engine(SPEC)
    assert "HTTP 401" in one_line(err) and "EMO_VLLM_API_KEY" in str(err.value)
    assert "sk-wrong" not in str(err.value)
    monkeypatch.setenv("EMO_VLLM_API_KEY", KEY)
    with pytest.raises(ModelLoadError) as err:
        Engine("zero-shot:llava-hf/llava-1.5-7b-hf")
    assert f"does not serve 'llava-hf/llava-1.5-7b-hf'; it serves: {BASE}, {ADAPTER}" in one_line(err)
    monkeypatch.setenv("EMO_VLLM_URL", "http://127.0.0.1:9/v1")   # nothing listens on port 9
    with pytest.raises(UserError, match="cannot reach the vLLM server at http://127.0.0.1:9/v1"):
        Engine(SPEC)
    monkeypatch.setenv("EMO_VLLM_URL", fake.url)
    monkeypatch.setenv("EMO_VLLM_LABEL_SET", "emotions")
    with pytest.raises(UserError, match="EMO_VLLM_LABEL_SET"):
        Engine(SPEC)


def test_swapping_to_an_adapter_on_the_same_server(engine, clean, files):
    served = engine.serving
    with pytest.raises(ModelLoadError, match="does not serve 'emo-v9'"):
        engine.swap("emo-v9")
    assert engine.serving == served
    first = engine._model
    try:
        assert engine.swap(ADAPTER).name == f"{ADAPTER} via vLLM"
        assert engine._model.llm is first.llm   # one client per server, as one base per version
        result = engine.predict(files["yellow"])
        assert result["model_version"] == f"{ADAPTER} via vLLM" and result["label"] == "happiness"
        assert {r["body"]["model"] for r in clean.requests} == {ADAPTER}
    finally:
        engine.swap(SPEC)
    assert engine.serving.name == served.name


def test_an_undecodable_upload_never_reaches_the_server(engine, clean, files):
    with pytest.raises(MediaError):
        engine.predict(files["bad"])
    assert clean.requests == []


def test_the_fake_refuses_an_image_that_does_not_decode_as_vllm_does(fake, clean):
    model = OpenAIChatModel(fake.url, SPEC, api_key=KEY)
    broken = RemoteInput("image", "What is the facial expression?",
                         RemoteMedia("image", ["data:image/jpeg;base64,AAAAAAAA"]))
    with pytest.raises(UserError) as err:
        model.score_labels([broken], ["happiness"])
    assert "(HTTP 400)" in one_line(err) and clean.problems == ["Failed to load image: cannot identify image file"]
    with pytest.raises(UserError) as err:
        model.generate([broken])
    assert "refused the explanation (HTTP 400)" in one_line(err)


def test_answer_tokens_are_found_in_any_tokenizer_spelling():
    def positions(tokens, logprobs):
        return [None] + [{str(n): {"logprob": lp, "rank": 1, "decoded_token": t}}
                         for n, (t, lp) in enumerate(zip(tokens[1:], logprobs[1:]))]

    # byte-level BPE (Ġ marks a space), the label also named in the question: the answer is the last
    bpe = ["Options", ":", "Ġhapp", "iness", "<|im_end|>", "Ċ", "happ", "iness", "<|im_end|>", "Ċ"]
    assert answer_logprobs(positions(bpe, [0, -9, -9, -9, -9, -9, -1, -2, -3, -50]), "happiness") == [-1, -2, -3]
    # SentencePiece (▁), a template that ends the turn with "</s>"
    sp = ["USER", ":", "▁ASS", "IST", "ANT", ":", "▁sad", "ness", "</s>"]
    assert answer_logprobs(positions(sp, [0, 0, 0, 0, 0, 0, -1, -2, -4]), "sadness") == [-1, -2, -4]
    # the prompt token is the entry not ranked 1 when the top-1 differs (vLLM lists both)
    both = positions(["a", "Ġanger", "<|im_end|>"], [0, -7, -1])
    both[1]["0"]["rank"] = 5
    both[1]["99"] = {"logprob": -0.2, "rank": 1, "decoded_token": "Ġcalm"}
    both[1] = dict(reversed(list(both[1].items())))   # order must not matter
    assert answer_logprobs(both, "anger") == [-7, -1]
    assert answer_logprobs(positions(bpe, [0] * len(bpe)), "anger") is None
    assert answer_logprobs(positions(["x", "Ġfearful", "<|im_end|>"], [0, -1, -1]), "fear") is None
