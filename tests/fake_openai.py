"""A fake vLLM OpenAI-compatible server on 127.0.0.1, in vLLM's wire format.

    with FakeVLLM(models=["Qwen/Qwen2.5-VL-3B-Instruct"], api_key="sk-test") as fake:
        os.environ["EMO_VLLM_URL"] = fake.url                 # http://127.0.0.1:PORT/v1
        fake.plan("500", "slow")                              # the next requests fail so, then ok
        ... drive it through the real `openai` client ...
        fake.requests[-1]["body"], fake.aborted, fake.problems

GET  /v1/models             {"object": "list", "data": [{"id", "object": "model", "owned_by":
                            "vllm", "root", "parent", "max_model_len", ...}]}
POST /v1/chat/completions   vLLM's ChatCompletionRequest: OpenAI's fields plus its extra params
                            (add_generation_prompt, continue_final_message, prompt_logprobs, ...)
                            checked as vLLM's validators do; images as `image_url` data URLs,
                            decoded with PIL (one that does not decode: 400, as vLLM answers).
    stream=false  {"id", "object": "chat.completion", "model", "choices": [{"index": 0,
                   "message": {"role": "assistant", "content"}, "logprobs": null,
                   "finish_reason": "stop" | "length", "stop_reason": null}], "usage",
                   "prompt_logprobs": [null, {"<token id>": {"logprob", "rank",
                   "decoded_token"}}, ...]}          (the last only when prompt_logprobs is set)
    stream=true   SSE: `data: {"object": "chat.completion.chunk", "choices": [{"index": 0,
                   "delta": {"role"?, "content"}, "finish_reason"}]}` per token, then
                   `data: [DONE]`; `stream_delay_s` between chunks. A client that goes away
                   mid-stream is counted in `aborted` (vLLM aborts the request then).
Errors are vLLM's ErrorResponse `{"error": {"message", "type", "param", "code"}}`; a wrong or
missing bearer key gets 401 `{"error": "Unauthorized"}` as vLLM's --api-key middleware answers.

What it answers is a deterministic function of the images: the label of the reference colour
nearest to their mean colour (`label_of`), so a test knows the right answer for a solid-colour
file. The prompt is rendered with a Qwen2-VL-like chat template (`render`) and tokenised by a toy
tokenizer (`tokenize`: words in chunks of at most 5 letters, a leading space kept, special tokens
whole). Prompt logprobs follow these rules (what a test computes its expected scores from):
    the assistant answer's tokens      ANSWER_RIGHT each when the answer is the true label,
                                       ANSWER_WRONG otherwise
    the <|im_end|> right after it      END_RIGHT / END_WRONG
    every other prompt token           OTHER (the question's own label words included)
Each position lists the prompt token and, when it is not the most likely one, the top-1
alternative (as vLLM does for prompt_logprobs=1; the prompt token first, with its rank).

Behaviours (`plan(...)` consumes them per chat request in order, then `default`;
`plan_streams(...)` the same for streaming requests only, before `plan`'s):
    ok, 500 (InternalServerError body), slow (sleep `slow_s` first), malformed (a 200 whose JSON
    is cut short), no_logprobs (no prompt_logprobs in the answer: a server without the extension),
    no_text (decoded_token null everywhere, as vLLM started with --skip-tokenizer-init answers)
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

BEHAVIOURS = {"ok", "500", "slow", "malformed", "no_logprobs", "no_text"}
# The reference colours the fake "sees" (mean RGB of the images -> nearest one).
COLOURS = {"neutral": (128, 128, 128), "happiness": (240, 200, 40), "sadness": (40, 60, 200),
           "surprise": (250, 250, 250), "fear": (120, 40, 160), "disgust": (40, 160, 60),
           "anger": (210, 30, 30)}
ANSWER_RIGHT, ANSWER_WRONG = -0.1, -2.5
END_RIGHT, END_WRONG = -0.05, -1.5
OTHER = -4.0
TOP1_LOGPROB, TOP1_TOKEN = -0.5, " the"   # the alternative listed where the prompt token is not top-1
EXPLANATION = ("The person shows {label}: the inner brows, the eyelids and the lip corners carry "
               "the expression, and the cheeks and the mouth agree with it (AU6, AU12, AU25).")
SYSTEM = "You are a helpful assistant."
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_TOKEN = re.compile(r"<\|[a-z_]+\|>| ?[A-Za-z]{1,5}| ?\d|\s|[^\sA-Za-z\d]")


def tokenize(text: str) -> list[str]:
    """The toy tokenizer: every character lands in exactly one token."""
    return _TOKEN.findall(text)


def token_id(token: str) -> int:
    return zlib.crc32(token.encode()) % 150_000 + 1000


def label_of(images: list[Image.Image]) -> str:
    """The label the fake sees in these images: nearest reference colour to their mean."""
    mean = np.mean([np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
                    for im in images], axis=0)
    return min(COLOURS, key=lambda label: float(np.sum((mean - np.array(COLOURS[label])) ** 2)))


def answer_logprobs(label: str, truth: str) -> list[float]:
    """Log-probs of an assistant answer `label` and the <|im_end|> after it, as the fake scores them."""
    right = label == truth
    return [ANSWER_RIGHT if right else ANSWER_WRONG] * len(tokenize(label)) + [END_RIGHT if right else END_WRONG]


def render(messages: list[dict], add_generation_prompt: bool, continue_final_message: bool) -> tuple[str, int | None]:
    """The prompt text, and where the final assistant message starts in it (None if there is none)."""
    text, answer_at = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", None
    for n, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, list):
            content = "".join(IMAGE if part["type"] == "image_url" else part["text"] for part in content)
        text += f"<|im_start|>{message['role']}\n"
        last = n == len(messages) - 1
        if last and message["role"] == "assistant":
            answer_at = len(text)
        text += content
        if not (last and continue_final_message):
            text += "<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text, answer_at


class FakeVLLM:
    def __init__(self, models: list[str] | None = None, api_key: str | None = None,
                 slow_s: float = 2.0, stream_delay_s: float = 0.0, delay_s: float = 0.0,
                 max_images: int = 8, port: int = 0):
        self.models = list(models or ["Qwen/Qwen2.5-VL-3B-Instruct"])
        self.api_key, self.slow_s, self.stream_delay_s, self.max_images = api_key, slow_s, stream_delay_s, max_images
        self.delay_s, self.port = delay_s, port   # delay_s: every chat request takes that long
        self.in_flight = self.max_in_flight = 0   # chat requests being answered at once
        self.default = "ok"
        self.requests: list[dict] = []     # every chat request that got past auth: path, body, images
        self.problems: list[str] = []      # why a request was answered 4xx
        self.aborted = 0                   # streams the client closed before the end
        self.chunks_sent: list[int] = []   # content chunks written, per finished or aborted stream
        self._plans: list[str] = []
        self._stream_plans: list[str] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None

    # -- scripting ------------------------------------------------------------------------------

    def plan(self, *behaviours: str) -> None:
        assert not set(behaviours) - BEHAVIOURS, f"unknown behaviours {set(behaviours) - BEHAVIOURS}"
        with self._lock:
            self._plans.extend(behaviours)

    def plan_streams(self, *behaviours: str) -> None:
        assert not set(behaviours) - BEHAVIOURS, f"unknown behaviours {set(behaviours) - BEHAVIOURS}"
        with self._lock:
            self._stream_plans.extend(behaviours)

    def _next_behaviour(self, stream: bool) -> str:
        with self._lock:
            if stream and self._stream_plans:
                return self._stream_plans.pop(0)
            return self._plans.pop(0) if self._plans else self.default

    # -- serving --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeVLLM":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn; SSE ends with the connection

            def do_GET(self):  # noqa: N802 (http.server's naming)
                fake._get(self)

            def do_POST(self):  # noqa: N802
                fake._post(self)

            def log_message(self, *args):  # keep test output clean
                pass

        self._server = _Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeVLLM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests -------------------------------------------------------------------------------

    def _authorised(self, handler) -> bool:
        if self.api_key is None or handler.headers.get("Authorization") == f"Bearer {self.api_key}":
            return True
        _send(handler, 401, {"error": "Unauthorized"})
        return False

    def _get(self, handler) -> None:
        if handler.path.split("?")[0] != "/v1/models":
            return _send(handler, 404, {"detail": "Not Found"})
        if not self._authorised(handler):
            return
        now = int(time.time())
        _send(handler, 200, {"object": "list", "data": [
            {"id": name, "object": "model", "created": now, "owned_by": "vllm", "root": name,
             "parent": None, "max_model_len": 32768, "permission": []} for name in self.models]})

    def _bad(self, handler, status: int, message: str, kind: str = "BadRequestError", param=None) -> None:
        with self._lock:
            self.problems.append(message)
        _send(handler, status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

    def _post(self, handler) -> None:
        if handler.path.split("?")[0] != "/v1/chat/completions":
            return _send(handler, 404, {"detail": "Not Found"})
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._chat(handler)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _chat(self, handler) -> None:
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        if not self._authorised(handler):
            return
        try:
            body = json.loads(raw)
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            return self._bad(handler, 400, "the body is not a ChatCompletionRequest")
        images, error = self._images(messages)
        with self._lock:
            self.requests.append({"path": handler.path, "body": body, "images": len(images or [])})
        if error:
            return self._bad(handler, 400, error)
        error = self._validate(body, len(images))
        if error:
            return self._bad(handler, 404 if "does not exist" in error else 400, error,
                             "NotFoundError" if "does not exist" in error else "BadRequestError")
        behaviour = self._next_behaviour(bool(body.get("stream")))
        time.sleep(self.delay_s)
        if behaviour == "500":
            return _send(handler, 500, {"error": {"message": "EngineCore encountered an issue.",
                                                  "type": "InternalServerError", "param": None, "code": 500}})
        if behaviour == "slow":
            time.sleep(self.slow_s)
        truth = label_of(images)
        if body.get("stream"):
            return self._stream(handler, body, truth)
        answer = self._completion(body, truth, behaviour)
        if behaviour == "malformed":
            data = json.dumps(answer).encode()
            return _send_raw(handler, 200, data[: len(data) // 2])
        _send(handler, 200, answer)

    @staticmethod
    def _images(messages) -> tuple[list[Image.Image], str | None]:
        images = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            for part in content if isinstance(content, list) else []:
                if part.get("type") != "image_url":
                    continue
                url = (part.get("image_url") or {}).get("url", "")
                match = re.match(r"^data:image/[\w.+-]+;base64,(.*)$", url, re.S)
                if not match:
                    return [], "only data URLs are served here"
                try:
                    image = Image.open(io.BytesIO(base64.b64decode(match.group(1), validate=True)))
                    image.load()
                except (binascii.Error, ValueError, OSError):
                    return [], "Failed to load image: cannot identify image file"
                images.append(image)
        return images, None

    def _validate(self, body: dict, images: int) -> str | None:
        """What vLLM's ChatCompletionRequest validators and model lookup refuse."""
        if body.get("model") not in self.models:
            return f"The model `{body.get('model')}` does not exist."
        if body.get("continue_final_message") and body.get("add_generation_prompt", True):
            return "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        prompt_logprobs = body.get("prompt_logprobs")
        if prompt_logprobs is not None and (prompt_logprobs < 0 or (body.get("stream") and prompt_logprobs > 0)):
            return "`prompt_logprobs` are not available when `stream=True`." if prompt_logprobs >= 0 \
                else "`prompt_logprobs` must be a positive value."
        if (body.get("top_logprobs") or 0) > 0 and not body.get("logprobs"):
            return "when using `top_logprobs`, `logprobs` must be set to true."
        if images > self.max_images:
            return f"At most {self.max_images} image(s) may be provided in one prompt."
        if not images:
            return "this fake serves vision requests only: no image in the request"
        return None

    def _answer_tokens(self, body: dict, truth: str) -> tuple[list[str], str]:
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 10_000
        tokens = tokenize(EXPLANATION.format(label=truth))
        return tokens[:limit], "length" if len(tokens) > limit else "stop"

    def _prompt_logprobs(self, body: dict, truth: str) -> tuple[list, int]:
        text, answer_at = render(body["messages"], body.get("add_generation_prompt", True),
                                 body.get("continue_final_message", False))
        tokens, positions, offset = tokenize(text), [None], 0
        answer = body["messages"][-1]["content"] if answer_at is not None else None
        answer_tokens = tokenize(answer) if isinstance(answer, str) else []
        rules = answer_logprobs(answer, truth) if answer_tokens else []
        starts = []
        for token in tokens:
            starts.append(offset)
            offset += len(token)
        first = starts.index(answer_at) if answer_tokens else None
        for n, token in enumerate(tokens[1:], start=1):
            logprob = OTHER
            if first is not None and first <= n <= first + len(answer_tokens):
                if n < first + len(answer_tokens) or (not body.get("continue_final_message")):
                    logprob = rules[n - first]
            entry = {str(token_id(token)): {"logprob": logprob, "rank": 1 if logprob >= TOP1_LOGPROB else 7,
                                            "decoded_token": token}}
            if logprob < TOP1_LOGPROB:
                entry[str(token_id(TOP1_TOKEN))] = {"logprob": TOP1_LOGPROB, "rank": 1,
                                                    "decoded_token": TOP1_TOKEN}
            positions.append(entry)
        return positions, len(tokens)

    def _completion(self, body: dict, truth: str, behaviour: str) -> dict:
        tokens, finish = self._answer_tokens(body, truth)
        positions, prompt_tokens = self._prompt_logprobs(body, truth)
        answer = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                  "created": int(time.time()), "model": body["model"],
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(tokens),
                                                       "tool_calls": []},
                               "logprobs": None, "finish_reason": finish, "stop_reason": None}],
                  "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                            "total_tokens": prompt_tokens + len(tokens), "prompt_tokens_details": None},
                  "prompt_logprobs": None, "kv_transfer_params": None}
        if behaviour == "no_text":
            for entry in (e for p in positions if p for e in p.values()):
                entry["decoded_token"] = None
        if behaviour != "no_logprobs" and body.get("prompt_logprobs") is not None:
            answer["prompt_logprobs"] = positions
        return answer

    def _stream(self, handler, body: dict, truth: str) -> None:
        tokens, finish = self._answer_tokens(body, truth)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body["model"]}

        def chunk(delta: dict, finish_reason=None) -> bytes:
            data = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]}
            return f"data: {json.dumps(data)}\n\n".encode()

        sent = 0
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(chunk({"role": "assistant", "content": ""}))
            for token in tokens:
                if self.stream_delay_s:
                    time.sleep(self.stream_delay_s)
                handler.wfile.write(chunk({"content": token}))
                handler.wfile.flush()
                sent += 1
            handler.wfile.write(chunk({"content": ""}, finish) + b"data: [DONE]\n\n")
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            with self._lock:
                self.aborted += 1
        finally:
            handler.close_connection = True
            with self._lock:
                self.chunks_sent.append(sent)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a batch's requests connect at once (socketserver's 5 drops SYNs)


def _send(handler, status: int, body: dict) -> None:
    _send_raw(handler, status, json.dumps(body).encode())


def _send_raw(handler, status: int, data: bytes) -> None:
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up waiting (a timeout test)
