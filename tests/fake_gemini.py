"""A fake Gemini API on 127.0.0.1 speaking the REST wire format of generateContent.

    with FakeGemini(api_key="test-key") as fake:
        os.environ["GEMINI_BASE_URL"] = fake.url
        fake.expect(image_key(jpeg), "happiness")    # the ground truth the prompt must carry
        fake.plan(image_key(jpeg), "429", "500")     # scripted faults, then normal answers
        ... run the real google-genai SDK against it ...
        fake.requests[key], fake.paid[key], fake.problems

POST /v1beta/models/{model}:generateContent with a JSON body
    {"contents": [{"role": "user", "parts": [{"inlineData": {"mime_type": "image/jpeg",
                                                              "data": "<base64>"}},
                                             {"text": "<prompt>"}]}],
     "systemInstruction": {...}, "generationConfig": {"responseMimeType": "application/json",
                                                       "responseSchema": {...}, ...}}
and the API key in the `x-goog-api-key` header. The answer is
    {"candidates": [{"content": {"parts": [{"text": "<json>"}], "role": "model"},
                     "finishReason": "STOP", "index": 0}],
     "usageMetadata": {"promptTokenCount": n, "candidatesTokenCount": m, "totalTokenCount": ...},
     "modelVersion": "<model>"}
and errors are Google's `{"error": {"code", "message", "status", "details"}}`.

Each request is checked (key header, an image part that decodes, the prompt naming the
expected label, JSON output asked for); a bad one is answered 400 and listed in `problems`.
Requests are keyed by the sha256 of their first image's bytes, so a test can count what each
sample cost: `requests` counts every request, `paid` the ones answered 200 (Google bills those,
even when the client had already given up waiting).

Behaviours (`plan(key, ...)` consumes them in order, then `default` applies):
    ok, slow (sleep `slow_s`, then ok), 429 (with Retry-After: `retry_after`), 500, 503,
    malformed (JSON text cut short), safety (finishReason SAFETY, no content), prompt_blocked
    (promptFeedback.blockReason), max_tokens (truncated text, finishReason MAX_TOKENS),
    wrong_label, missing_field, empty_explanation
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

URLSAFE = str.maketrans("-_", "+/")
PATH = re.compile(r"^/v1beta/models/([\w.\-]+):generateContent$")
BEHAVIOURS = {"ok", "slow", "429", "500", "503", "malformed", "safety", "prompt_blocked",
              "max_tokens", "wrong_label", "missing_field", "empty_explanation"}
EXPLANATION = ("The person shows {label}: the inner brows and the eyelids, the mouth and the "
               "lip corners, and the cheeks carry the expression (AU6, AU12).")


def image_key(image: bytes) -> str:
    """The fake's name for a request: sha256 of the first image's bytes."""
    return hashlib.sha256(image).hexdigest()


def _google_error(code: int, status: str, message: str, details: list | None = None) -> dict:
    return {"error": {"code": code, "message": message, "status": status,
                      **({"details": details} if details else {})}}


class FakeGemini:
    def __init__(self, api_key: str = "test-key", retry_after: float = 1, slow_s: float = 1.0,
                 default: str = "ok", explain_label: str = "happiness"):
        self.api_key = api_key
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.default = default
        self.explain_label = explain_label   # the answer when no ground truth is expected
        self.requests: Counter = Counter()
        self.paid: Counter = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)  # arrival times per key
        self.prompts: dict[str, list[str]] = defaultdict(list)
        self.images: dict[str, list[int]] = defaultdict(list)   # images per request
        self.models: Counter = Counter()
        self.problems: list[str] = []
        self._expected: dict[str, str] = {}
        self._plans: dict[str, list[str]] = defaultdict(list)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- scripting --------------------------------------------------------------------------

    def expect(self, key: str, label: str) -> None:
        """Requests for this image must name `label` in their prompt; answers use it."""
        self._expected[key] = label

    def plan(self, key: str, *behaviours: str) -> None:
        unknown = set(behaviours) - BEHAVIOURS
        assert not unknown, f"unknown behaviours {unknown}"
        with self._lock:
            self._plans[key].extend(behaviours)

    def _next_behaviour(self, key: str) -> str:
        with self._lock:
            return self._plans[key].pop(0) if self._plans[key] else self.default

    # -- serving ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeGemini":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                fake._handle(self)

            def log_message(self, *args):  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()  # a short poll: stop() returns at once
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeGemini":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- one request --------------------------------------------------------------------------

    def _problem(self, text: str) -> dict:
        with self._lock:
            self.problems.append(text)
        return _google_error(400, "INVALID_ARGUMENT", text)

    def _parse(self, handler) -> tuple[str | None, dict, dict | None]:
        """(key, request facts, an error body if the request is wrong)."""
        match = PATH.match(handler.path.split("?")[0])
        if not match:
            return None, {}, self._problem(f"unexpected path {handler.path}")
        if handler.headers.get("x-goog-api-key") != self.api_key:
            # What Google answers for a bad key (not a problem of the client code itself).
            return None, {}, _google_error(400, "INVALID_ARGUMENT", "API key not valid. Please "
                                           "pass a valid API key.",
                                           [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                             "reason": "API_KEY_INVALID"}])
        try:
            body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
            parts = [p for c in body["contents"] for p in c["parts"]]
        except (ValueError, KeyError, TypeError):
            return None, {}, self._problem("the body is not a generateContent request")
        images, texts = [], []
        for part in parts:
            inline = part.get("inlineData") or part.get("inline_data")
            if inline:
                mime = inline.get("mimeType") or inline.get("mime_type")
                try:
                    # The SDK sends URL-safe base64; the API takes either alphabet.
                    data = base64.b64decode(inline["data"].translate(URLSAFE), validate=True)
                    Image.open(io.BytesIO(data)).verify()
                except (KeyError, binascii.Error, ValueError, OSError):
                    return None, {}, self._problem("an inline image does not decode")
                if mime not in ("image/jpeg", "image/png"):
                    return None, {}, self._problem(f"unexpected image type {mime}")
                images.append(data)
            elif "text" in part:
                texts.append(part["text"])
        if not images:
            return None, {}, self._problem("no image part in the request")
        key, prompt = image_key(images[0]), "\n".join(texts)
        config = body.get("generationConfig", {})
        if config.get("responseMimeType") != "application/json" or not (
                config.get("responseSchema") or config.get("responseJsonSchema")):
            return key, {}, self._problem("structured JSON output was not requested")
        label = self._expected.get(key)
        if label is not None and f'"{label}"' not in prompt:
            return key, {}, self._problem(f"the prompt does not name the label {label!r}")
        return key, {"model": match.group(1), "prompt": prompt, "images": len(images),
                     "label": label or self.explain_label}, None

    def _handle(self, handler) -> None:
        arrived = time.monotonic()
        key, facts, error = self._parse(handler)
        if key is not None:
            with self._lock:
                self.requests[key] += 1
                self.times[key].append(arrived)
                if facts:
                    self.prompts[key].append(facts["prompt"])
                    self.images[key].append(facts["images"])
                    self.models[facts["model"]] += 1
        if error is not None:
            return self._send(handler, 400, error)
        behaviour = self._next_behaviour(key)
        if behaviour == "429":
            return self._send(handler, 429, _google_error(
                429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).",
                [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                  "retryDelay": f"{self.retry_after}s"}]),
                headers={"Retry-After": str(self.retry_after)})
        if behaviour == "500":
            return self._send(handler, 500, _google_error(500, "INTERNAL",
                                                          "An internal error has occurred."))
        if behaviour == "503":
            return self._send(handler, 503, _google_error(503, "UNAVAILABLE",
                                                          "The model is overloaded."))
        if behaviour == "slow":
            time.sleep(self.slow_s)
        with self._lock:
            self.paid[key] += 1
        self._send(handler, 200, self._answer(behaviour, facts))

    def _answer(self, behaviour: str, facts: dict) -> dict:
        label = facts["label"]
        prompt_tokens = 258 * facts["images"] + len(facts["prompt"]) // 4
        answer = {"label": label, "explanation": EXPLANATION.format(label=label),
                  "action_units": ["AU6", "AU12"]}
        finish, text = "STOP", None
        if behaviour == "wrong_label":
            answer["label"] = "sadness" if label != "sadness" else "happiness"
        elif behaviour == "missing_field":
            del answer["explanation"]
        elif behaviour == "empty_explanation":
            answer["explanation"] = "  "
        text = json.dumps(answer)
        if behaviour == "malformed":
            text = text[: len(text) // 2]
        elif behaviour == "max_tokens":
            finish, text = "MAX_TOKENS", text[: len(text) // 3]
        usage = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": len(text) // 4,
                 "thoughtsTokenCount": 7,
                 "totalTokenCount": prompt_tokens + len(text) // 4 + 7}
        if behaviour == "prompt_blocked":
            return {"promptFeedback": {"blockReason": "SAFETY"},
                    "usageMetadata": {"promptTokenCount": prompt_tokens,
                                      "totalTokenCount": prompt_tokens}}
        if behaviour == "safety":
            return {"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
                 "blocked": True}]}],
                "usageMetadata": {"promptTokenCount": prompt_tokens,
                                  "totalTokenCount": prompt_tokens},
                "modelVersion": facts["model"]}
        return {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                                "finishReason": finish, "index": 0}],
                "usageMetadata": usage, "modelVersion": facts["model"]}

    @staticmethod
    def _send(handler, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json; charset=UTF-8")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (a timeout test); Google would still bill it
