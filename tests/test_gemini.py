"""annotation/gemini/ piece by piece: settings, prompts, validation, rate limiter, retries over the
real google-genai SDK against tests/fake_gemini.py, and gemini_explain's cache.

    pytest tests/test_gemini.py -q
"""
from __future__ import annotations

import logging
import random
import threading

import numpy as np
import pytest

from annotation.gemini.client import CallError, GeminiError, GenAIClient, Reply, TransientError
from annotation.gemini.explain import gemini_explain
from annotation.gemini.limits import RateLimiter, RetryPolicy, call_with_retry
from annotation.gemini.media import encode_jpeg
from annotation.gemini.prompts import generation_prompt, response_schema
from annotation.gemini.settings import PROMPT_VERSION, GeminiSettings, estimate_cost, gemini_settings
from annotation.gemini.validation import validate
from core.errors import UserError
from core.labels import BASIC7
from tests.fake_gemini import FakeGemini, image_key

KEY = "AIzaTEST-secret-key-0123456789"
FAST = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture
def fake():
    with FakeGemini(api_key=KEY, slow_s=1.0) as server:
        yield server


@pytest.fixture
def gemini_env(monkeypatch, fake):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_MODEL", raising=False)
    monkeypatch.setenv("GEMINI_BASE_URL", fake.url)
    return fake


def face(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 32, 3), dtype=np.uint8)


def answer(label="happiness", explanation="Raised cheeks and pulled lip corners (AU6, AU12).",
           finish="STOP") -> Reply:
    import json
    return Reply(json.dumps({"label": label, "explanation": explanation,
                             "action_units": ["AU6", "AU12"]}), finish, 300, 80)


# -- settings -----------------------------------------------------------------------------------

def test_settings_need_a_key_and_name_the_variables(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(UserError) as err:
        gemini_settings()
    message = str(err.value)
    assert "GEMINI_API_KEY" in message and "GOOGLE_API_KEY" in message and "\n" not in message


def test_settings_from_environment_never_show_the_key(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    monkeypatch.setenv("GEMINI_MODEL", "gemini-2.0-flash")
    monkeypatch.setenv("GEMINI_BASE_URL", "http://127.0.0.1:9")
    settings = gemini_settings()
    assert (settings.api_key, settings.model, settings.base_url) == \
        (KEY, "gemini-2.0-flash", "http://127.0.0.1:9")
    assert KEY not in repr(settings) and KEY not in str(settings)
    assert gemini_settings("models/gemini-2.5-pro").model == "gemini-2.5-pro"
    with pytest.raises(UserError, match="expected an id"):
        gemini_settings("gemini flash; rm -rf /")


def test_cost_estimate_uses_the_price_table():
    # gemini-2.5-flash: $0.30 in, $2.50 out per 1M tokens
    assert estimate_cost("gemini-2.5-flash", 1_000_000, 100_000) == pytest.approx(0.55)
    # the longest prefix wins: flash-lite is not priced as flash
    assert estimate_cost("gemini-2.5-flash-lite-preview", 1_000_000, 0) == pytest.approx(0.10)
    assert estimate_cost("some-future-model", 10, 10) is None


# -- prompts and validation ---------------------------------------------------------------------

def test_generation_prompt_carries_label_options_and_scene():
    image = generation_prompt("anger", BASIC7)
    assert '"anger"' in image and ", ".join(BASIC7) in image and "Scene description" not in image
    video = generation_prompt("fear", BASIC7, "video", 1, "  A dark corridor at night. ")
    assert "middle frame" in video and "Scene description: A dark corridor at night." in video
    assert "4 images" in generation_prompt("fear", BASIC7, "video", 4)
    schema = response_schema(BASIC7)
    assert schema["properties"]["label"]["enum"] == BASIC7
    assert set(schema["required"]) == {"label", "explanation", "action_units"}


@pytest.mark.parametrize("reply, code", [
    (answer(), None),
    (answer(label="Happy"), None),                       # a synonym normalises to the set's name
    (answer(label="sadness"), "wrong_label"),
    (answer(label="boredom"), "label_not_in_set"),
    (answer(explanation="   "), "empty_explanation"),
    (answer(explanation="This person is happy."), "no_facial_evidence"),
    (Reply('{"label": "happiness"}', "STOP"), "missing_field"),
    (Reply('{"label": "happiness", "expl', "STOP"), "malformed_json"),
    (Reply('["happiness"]', "STOP"), "malformed_json"),
    (Reply(None, "SAFETY"), "blocked"),
    (Reply(None, "PROMPT_SAFETY"), "blocked"),
    (Reply('{"label": "happi', "MAX_TOKENS"), "truncated"),
    (Reply(None, "STOP"), "no_answer"),
    (Reply("{}", "OTHER"), "finish_reason"),
])
def test_validate(reply, code):
    verdict = validate(reply, BASIC7, truth="happiness")
    assert verdict.code == code
    assert verdict.status == ("ok" if code is None else "rejected")
    if code is None:
        assert verdict.label == "happiness" and "AU6" in verdict.explanation
    else:
        assert verdict.reason.startswith(code + ":")


def test_validate_without_ground_truth_accepts_any_label_in_the_set():
    assert validate(answer(label="sadness"), BASIC7).status == "ok"


# -- rate limiter (a fake clock: no real waiting) -----------------------------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_rate_limiter_requests_per_minute():
    clock = Clock()
    limiter = RateLimiter(rpm=3, tpm=None, clock=clock, sleep=clock.sleep)
    starts = []
    for _ in range(7):
        limiter.acquire()
        starts.append(clock.now)
    assert starts == [0, 0, 0, 60, 60, 60, 120]


def test_rate_limiter_tokens_per_minute_uses_actual_usage():
    clock = Clock()
    limiter = RateLimiter(rpm=None, tpm=1000, clock=clock, sleep=clock.sleep)
    first = limiter.acquire(400)
    clock.now = 10
    limiter.settle(first, 900)           # the reply used more than estimated
    limiter.acquire(400)                 # 900 + 400 > 1000: waits for the first to expire
    assert clock.now == 60
    clock.now = 70
    limiter.acquire(5000)                # bigger than the budget: goes once the window is empty
    assert clock.now == 120


def test_rate_limiter_is_shared_by_threads():
    clock_lock = threading.Lock()
    clock = Clock()

    def sleep(seconds):
        with clock_lock:
            clock.now += seconds

    limiter = RateLimiter(rpm=5, tpm=None, clock=clock, sleep=sleep)
    threads = [threading.Thread(target=limiter.acquire) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clock.now == 0 and len(limiter._sent) == 5   # five fit; none waited
    limiter.acquire()
    assert clock.now >= 60


def test_backoff_grows_and_honours_retry_after():
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0)
    rng = random.Random(0)
    for attempt in range(6):
        delay = policy.delay(attempt, None, rng)
        assert 0 <= delay <= min(8.0, 2 ** attempt)
    assert policy.delay(0, 5.0, rng) >= 5.0


# -- the SDK against the fake server ------------------------------------------------------------

def client_for(fake, timeout_s: float = 10.0, key: str = KEY) -> GenAIClient:
    return GenAIClient(GeminiSettings(api_key=key, model="gemini-2.5-flash", base_url=fake.url),
                       timeout_s=timeout_s)


def ask(client, jpeg, label="happiness", policy=FAST, **kwargs):
    prompt = generation_prompt(label, BASIC7)
    return call_with_retry(lambda: client.generate([jpeg], prompt, response_schema(BASIC7)),
                           policy, **kwargs)


def test_sdk_request_reaches_the_fake_in_the_wire_format(fake):
    jpeg = encode_jpeg(face(1))
    key = image_key(jpeg)
    fake.expect(key, "happiness")
    result = ask(client_for(fake), jpeg)
    assert fake.problems == []                       # key header, image part, label, JSON asked
    assert result.attempts == 1 and fake.requests[key] == 1
    assert fake.models == {"gemini-2.5-flash": 1}
    verdict = validate(result.reply, BASIC7, "happiness")
    assert verdict.status == "ok", verdict.reason
    assert result.reply.input_tokens > 258 and result.reply.output_tokens > 7


def test_retries_429_500_503_then_succeeds(fake):
    fake.retry_after = 1
    jpeg = encode_jpeg(face(2))
    key = image_key(jpeg)
    fake.plan(key, "429", "500", "503")
    result = ask(client_for(fake), jpeg)
    assert result.attempts == 4 and fake.requests[key] == 4 and fake.paid[key] == 1
    times = fake.times[key]
    assert times[1] - times[0] >= 0.95                # Retry-After: 1 honoured
    assert times[3] - times[1] < 0.9                  # 5xx used the (small) backoff instead


def test_timeout_is_retried(fake):
    fake.slow_s = 1.0
    jpeg = encode_jpeg(face(3))
    key = image_key(jpeg)
    fake.plan(key, "slow")
    result = ask(client_for(fake, timeout_s=0.3), jpeg)
    assert result.attempts == 2 and fake.requests[key] == 2


def test_gives_up_after_the_attempts_with_the_last_error(fake):
    jpeg = encode_jpeg(face(4))
    key = image_key(jpeg)
    fake.plan(key, "500", "500", "503", "500")
    with pytest.raises(TransientError) as err:
        ask(client_for(fake), jpeg)
    assert err.value.code.startswith("500") and fake.requests[key] == 4


def test_no_retry_for_a_bad_request(fake):
    jpeg = encode_jpeg(face(5))
    fake.expect(image_key(jpeg), "anger")            # the prompt will name happiness instead
    with pytest.raises(CallError) as err:
        ask(client_for(fake), jpeg)
    assert err.value.code.startswith("400") and fake.requests[image_key(jpeg)] == 1


def test_a_rejected_key_stops_and_is_never_echoed(fake, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "AIzaWRONG-key-9876543210"
    jpeg = encode_jpeg(face(6))
    client, calls = client_for(fake, key=wrong), []

    def call():
        calls.append(1)
        return client.generate([jpeg], generation_prompt("happiness", BASIC7),
                               response_schema(BASIC7))

    with pytest.raises(GeminiError) as err:
        call_with_retry(call, FAST)
    assert "API key" in str(err.value) and len(calls) == 1   # not retried
    assert wrong not in str(err.value) and wrong not in caplog.text and KEY not in caplog.text


@pytest.mark.parametrize("behaviour, code", [("safety", "blocked"), ("prompt_blocked", "blocked"),
                                             ("max_tokens", "truncated"),
                                             ("malformed", "malformed_json"),
                                             ("wrong_label", "wrong_label"),
                                             ("missing_field", "missing_field"),
                                             ("empty_explanation", "empty_explanation")])
def test_bad_answers_are_read_and_rejected(fake, behaviour, code):
    jpeg = encode_jpeg(face(7))
    fake.plan(image_key(jpeg), behaviour)
    result = ask(client_for(fake), jpeg)
    assert result.attempts == 1                      # an answer, however bad, is not retried
    assert validate(result.reply, BASIC7, "happiness").code == code


# -- gemini_explain -----------------------------------------------------------------------------

def test_gemini_explain_is_cached_by_content(gemini_env, db_url, tmp_path):
    from PIL import Image

    fake = gemini_env
    fake.explain_label = "surprise"
    rgb = face(8)
    first = gemini_explain(rgb, url=db_url)
    assert (first["label"], first["cached"]) == ("surprise", False)
    assert first["source"] == "gemini:gemini-2.5-flash" and "brows" in first["explanation"]
    again = gemini_explain(rgb.copy(), url=db_url)
    assert again["cached"] is True and again["explanation"] == first["explanation"]
    assert sum(fake.requests.values()) == 1
    # A file is hashed by its bytes: two paths with the same content share one call.
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(face(9)).save(a)
    b.write_bytes(a.read_bytes())
    assert gemini_explain(a, url=db_url)["cached"] is False
    assert gemini_explain(b, url=db_url)["cached"] is True
    assert sum(fake.requests.values()) == 2
    prompt = next(iter(fake.prompts.values()))[0]
    assert "Choose one" in prompt and "ground truth" not in prompt


def test_gemini_explain_errors_are_user_errors_and_not_cached(gemini_env, db_url):
    fake = gemini_env
    rgb = face(10)
    key = image_key(encode_jpeg(rgb))
    fake.plan(key, "safety")
    with pytest.raises(GeminiError, match="blocked"):
        gemini_explain(rgb, url=db_url, retry=FAST)
    fake.plan(key, "503", "503", "503")
    with pytest.raises(GeminiError, match="not answering"):
        gemini_explain(rgb, url=db_url, retry=RetryPolicy(attempts=3, base_delay_s=0.01))
    assert gemini_explain(rgb, url=db_url, retry=FAST)["cached"] is False
    with pytest.raises(UserError, match="no such file"):
        gemini_explain("/nonexistent/face.jpg", url=db_url)


def test_prompt_version_is_stable():
    # Stored suggestions are keyed by it: a change must be a deliberate bump, not an accident.
    assert PROMPT_VERSION == "ferid-v1"
