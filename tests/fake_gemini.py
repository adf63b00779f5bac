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

The Batch API and the Files API, as google-genai speaks them (Gemini Developer API, v1beta):
    POST /upload/v1beta/files                    resumable upload: X-Goog-Upload-Command start
                                                 -> X-Goog-Upload-URL; then "upload[, finalize]"
                                                 chunks at X-Goog-Upload-Offset -> {"file": ...}
    GET  /v1beta/files/{id}                      the File resource
    GET  /v1beta/files/{id}:download?alt=media   a generated file's bytes (uploads can't be read)
    POST /v1beta/models/{model}:batchGenerateContent  {"batch": {"displayName", "inputConfig":
                                                 {"fileName": "files/..."}}} -> an Operation
    GET  /v1beta/batches/{id}, POST /v1beta/batches/{id}:cancel, GET /v1beta/batches?pageSize=
The input file holds `{"key", "request": <GenerateContentRequest>}` lines, each checked like an
online request; the job answers `{"key", "response"}` or `{"key", "error": <google.rpc.Status>}`
lines in `files/batch-<id>` (`metadata.output.responsesFile`). The per-image `plan` applies to
batch lines too: 429/500/503 become that line's error. A job goes PENDING -> RUNNING and is done
after `batch_polls` gets while `batch_hold` is clear; `plan_batch("fail" | "expire")` scripts the
next jobs' ends. `batch_calls` counts create/get/list/cancel/upload/download; `batch_paid` the
answered lines per image key; `create_delay_s` holds the create's answer back (a kill then
leaves a job the client never heard of).
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
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

URLSAFE = str.maketrans("-_", "+/")
PATH = re.compile(r"^/v1beta/models/([\w.\-]+):generateContent$")
BATCH_CREATE = re.compile(r"^/v1beta/models/([\w.\-]+):batchGenerateContent$")
BATCH = re.compile(r"^/v1beta/batches/([\w\-]+)(:cancel)?$")
FILE = re.compile(r"^(?:/download)?/v1beta/files/([\w\-]+)(:download)?$")
BATCH_OUTCOMES = {"succeed", "fail", "expire"}
# google.rpc.Code of the HTTP errors the online fake answers, for a batch line's error
RPC_CODES = {"429": (8, "RESOURCE_EXHAUSTED"), "500": (13, "INTERNAL"),
             "503": (14, "UNAVAILABLE")}
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


# What Google answers for a bad key (not a problem of the client code itself).
BAD_KEY = _google_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                        [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                          "reason": "API_KEY_INVALID"}])


# ---------------------------------------------------------------------------------- Files + Batch

def _now_rfc3339(offset_s: float = 0) -> str:
    moment = datetime.now(timezone.utc) + timedelta(seconds=offset_s)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class BatchEndpoints:
    """The Files and Batch API endpoints of FakeGemini, kept apart from generateContent."""

    def _key_ok(self, handler) -> bool:
        if handler.headers.get("x-goog-api-key") == self.api_key:
            return True
        self._send(handler, 400, BAD_KEY)
        return False

    @staticmethod
    def _body(handler) -> bytes:
        return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))

    def _upload(self, handler) -> None:
        query = parse_qs(urlparse(handler.path).query)
        command = (handler.headers.get("X-Goog-Upload-Command") or "").replace(" ", "")
        if command == "start":
            if not self._key_ok(handler):
                return
            if handler.headers.get("X-Goog-Upload-Protocol") != "resumable":
                return self._send(handler, 400, self._problem("upload: not the resumable protocol"))
            meta = json.loads(self._body(handler) or b"{}").get("file", {})
            upload_id = uuid.uuid4().hex
            with self._lock:
                self.batch_calls["upload"] += 1
                self._uploads[upload_id] = {
                    "meta": meta, "data": bytearray(),
                    "size": int(handler.headers.get("X-Goog-Upload-Header-Content-Length", -1)),
                    "mime": handler.headers.get("X-Goog-Upload-Header-Content-Type")}
            return self._send_raw(handler, 200, b"", {
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-URL": f"{self.url}/upload/v1beta/files?upload_id={upload_id}"
                                     "&upload_protocol=resumable"})
        upload = self._uploads.get((query.get("upload_id") or [""])[0])
        if upload is None or not command.startswith("upload"):
            return self._send(handler, 400, self._problem(f"upload: bad chunk ({command})"))
        chunk = self._body(handler)
        if int(handler.headers.get("X-Goog-Upload-Offset", -1)) != len(upload["data"]):
            return self._send(handler, 400, self._problem("upload: the offset does not match"))
        upload["data"].extend(chunk)
        if command != "upload,finalize":
            return self._send_raw(handler, 200, b"", {"X-Goog-Upload-Status": "active"})
        if len(upload["data"]) != upload["size"]:
            return self._send(handler, 400, self._problem("upload: size differs from the start"))
        name = f"files/{uuid.uuid4().hex[:12]}"
        meta = self._file_meta(name, bytes(upload["data"]), upload["mime"] or "text/plain",
                               upload["meta"].get("displayName"), "UPLOADED")
        with self._lock:
            self.files[name] = {"meta": meta, "data": bytes(upload["data"])}
        body = json.dumps({"file": meta}).encode()
        self._send_raw(handler, 200, body, {"X-Goog-Upload-Status": "final",
                                            "Content-Type": "application/json; charset=UTF-8"})

    def _file_meta(self, name, data, mime, display_name, source) -> dict:
        meta = {"name": name, "mimeType": mime, "sizeBytes": str(len(data)),
                "createTime": _now_rfc3339(), "updateTime": _now_rfc3339(),
                "expirationTime": _now_rfc3339(48 * 3600),
                "sha256Hash": base64.b64encode(hashlib.sha256(data).hexdigest().encode()).decode(),
                "uri": f"{self.url}/v1beta/{name}", "state": "ACTIVE", "source": source}
        if display_name:
            meta["displayName"] = display_name
        if source == "GENERATED":
            meta["downloadUri"] = f"{self.url}/download/v1beta/{name}:download?alt=media"
        return meta

    def _get(self, handler) -> None:
        path = urlparse(handler.path).path
        if not self._key_ok(handler):
            return
        if path == "/v1beta/batches":
            return self._list(handler)
        match = FILE.match(path)
        if match:
            stored = self.files.get(f"files/{match.group(1)}")
            if stored is None:
                return self._send(handler, 404, _google_error(404, "NOT_FOUND", "No such file."))
            if not match.group(2):
                return self._send(handler, 200, stored["meta"])
            if stored["meta"]["source"] != "GENERATED":
                return self._send(handler, 400, _google_error(
                    400, "INVALID_ARGUMENT", "Only generated files can be downloaded."))
            with self._lock:
                self.batch_calls["download"] += 1
            return self._send_raw(handler, 200, stored["data"],
                                  {"Content-Type": "application/octet-stream"})
        match = BATCH.match(path)
        if match and not match.group(2):
            job = self.batches.get(f"batches/{match.group(1)}")
            if job is None:
                return self._send(handler, 404, _google_error(404, "NOT_FOUND", "No such batch."))
            with self._lock:
                self.batch_calls["get"] += 1
                self._advance(job)
            return self._send(handler, 200, self._operation(job))
        self._send(handler, 404, self._problem(f"unexpected GET {handler.path}"))

    def _list(self, handler) -> None:
        query = parse_qs(urlparse(handler.path).query)
        size = int((query.get("pageSize") or ["50"])[0])
        start = int((query.get("pageToken") or ["0"])[0])
        with self._lock:
            self.batch_calls["list"] += 1
            jobs = sorted(self.batches.values(), key=lambda j: j["created"], reverse=True)
            page = [self._operation(j) for j in jobs[start:start + size]]
        body = {"operations": page}
        if start + size < len(jobs):
            body["nextPageToken"] = str(start + size)
        self._send(handler, 200, body)

    def _batch_post(self, handler) -> None:
        path = handler.path.split("?")[0]
        if not self._key_ok(handler):
            return
        match = BATCH.match(path)
        if match:  # :cancel
            job = self.batches.get(f"batches/{match.group(1)}")
            self._body(handler)
            if job is None:
                return self._send(handler, 404, _google_error(404, "NOT_FOUND", "No such batch."))
            with self._lock:
                self.batch_calls["cancel"] += 1
                if job["state"] in ("PENDING", "RUNNING"):
                    job["state"], job["end"] = "CANCELLED", _now_rfc3339()
            return self._send(handler, 200, {})
        model = BATCH_CREATE.match(path).group(1)
        try:
            batch = json.loads(self._body(handler))["batch"]
            file_name = batch["inputConfig"]["fileName"]
        except (ValueError, KeyError, TypeError):
            return self._send(handler, 400, self._problem("not a batchGenerateContent body"))
        stored = self.files.get(file_name)
        if stored is None:
            return self._send(handler, 400, self._problem(f"no input file {file_name}"))
        lines = []
        for number, text in enumerate(stored["data"].decode().splitlines(), 1):
            try:
                entry = json.loads(text)
                lines.append((str(entry["key"]), entry["request"]))
            except (ValueError, KeyError, TypeError):
                return self._send(handler, 400, self._problem(f"input line {number} is not "
                                                              "{key, request}"))
        name = f"batches/{uuid.uuid4().hex[:16]}"
        with self._lock:
            self.batch_calls["create"] += 1
            outcome = self._batch_plans.pop(0) if self._batch_plans else "succeed"
            job = {"name": name, "model": model, "display_name": batch.get("displayName"),
                   "input_file": file_name, "lines": lines, "state": "PENDING",
                   "outcome": outcome, "polls": 0, "created": time.monotonic(),
                   "create_time": _now_rfc3339(), "end": None, "output": None, "stats": None}
            self.batches[name] = job
        if self.create_delay_s:
            time.sleep(self.create_delay_s)  # created at "Google"; the client hears it late
        self._send(handler, 200, self._operation(job))

    def _advance(self, job) -> None:
        """One get: PENDING -> RUNNING -> (after batch_polls gets, unless held) the planned end."""
        if job["state"] not in ("PENDING", "RUNNING"):
            return
        job["state"] = "RUNNING"
        if self.batch_hold.is_set():
            return
        job["polls"] += 1
        if job["polls"] < self.batch_polls:
            return
        job["end"] = _now_rfc3339()
        if job["outcome"] == "fail":
            job["state"] = "FAILED"
        elif job["outcome"] == "expire":
            job["state"] = "EXPIRED"
        else:
            self._answer_batch(job)
            job["state"] = "SUCCEEDED"

    def _answer_batch(self, job) -> None:
        """Answer every line as generateContent would (the lock is held by the caller)."""
        out, failed = [], 0
        for key, request in job["lines"]:
            self._lock.release()  # _check_request / _next_behaviour take the lock themselves
            try:
                image, facts, error = self._check_request(request, job["model"])
                behaviour = self._next_behaviour(image) if error is None else None
            finally:
                self._lock.acquire()
            if image is not None:
                self.requests[image] += 1
                if facts:
                    self.facts[image].append({**facts, "batch": True})
                    self.prompts[image].append(facts["prompt"])
                    self.images[image].append(facts["images"])
                    self.models[facts["model"]] += 1
            if error is not None:
                out.append({"key": key, "error": {"code": 3, "message": error["error"]["message"]}})
                failed += 1
            elif behaviour in RPC_CODES:
                code, status = RPC_CODES[behaviour]
                out.append({"key": key, "error": {"code": code, "status": status,
                                                  "message": f"{status} (batch request)"}})
                failed += 1
            else:
                self.batch_paid[image] += 1
                out.append({"key": key, "response": self._answer(behaviour, facts)})
        data = "".join(json.dumps(line) + "\n" for line in out).encode()
        name = f"files/batch-{job['name'].split('/')[-1]}"
        self.files[name] = {"meta": self._file_meta(name, data, "application/jsonl", None,
                                                    "GENERATED"), "data": data}
        job["output"] = name
        job["stats"] = (len(out), len(out) - failed, failed)

    def _operation(self, job) -> dict:
        """The batch as Google returns it: a long-running Operation with GenerateContentBatch
        metadata (state BATCH_STATE_*; the SDK maps it to JOB_STATE_*)."""
        n = len(job["lines"])
        total, ok, failed = job["stats"] or (n, 0, 0)
        meta = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1beta."
                         "GenerateContentBatch",
                "name": job["name"], "model": f"models/{job['model']}",
                "displayName": job["display_name"],
                "inputConfig": {"fileName": job["input_file"]},
                "createTime": job["create_time"], "updateTime": _now_rfc3339(),
                "state": f"BATCH_STATE_{job['state']}",
                "batchStats": {"requestCount": str(n), "successfulRequestCount": str(ok),
                               "failedRequestCount": str(failed),
                               "pendingRequestCount": str(n - ok - failed)}}
        operation = {"name": job["name"], "metadata": meta}
        if job["end"]:
            meta["endTime"] = job["end"]
            operation["done"] = True
        if job["output"]:
            meta["output"] = {"responsesFile": job["output"]}
            operation["response"] = {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta."
                         "GenerateContentBatchOutput", "responsesFile": job["output"]}
        elif job["state"] == "FAILED":
            operation["error"] = {"code": 13, "message": "The batch job failed."}
        return operation

    @staticmethod
    def _send_raw(handler, status: int, data: bytes, headers: dict) -> None:
        try:
            handler.send_response(status)
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


class FakeGemini(BatchEndpoints):
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
        self.facts: dict[str, list[dict]] = defaultdict(list)   # what each request asked for
        self.images: dict[str, list[int]] = defaultdict(list)   # images per request
        self.models: Counter = Counter()
        self.problems: list[str] = []
        self._expected: dict[str, str] = {}
        self._plans: dict[str, list[str]] = defaultdict(list)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        # Files and Batch API state
        self.files: dict[str, dict] = {}          # "files/<id>" -> {"meta", "data"}
        self._uploads: dict[str, dict] = {}       # upload id -> {"meta", "data", "size"}
        self.batches: dict[str, dict] = {}        # "batches/<id>" -> job
        self.batch_calls: Counter = Counter()
        self.batch_paid: Counter = Counter()
        self.batch_hold = threading.Event()       # set: jobs stay RUNNING
        self.batch_polls = 2
        self.create_delay_s = 0.0
        self._batch_plans: list[str] = []

    # -- scripting --------------------------------------------------------------------------

    def expect(self, key: str, label: str) -> None:
        """Requests for this image must name `label` in their prompt; answers use it."""
        self._expected[key] = label

    def plan(self, key: str, *behaviours: str) -> None:
        unknown = set(behaviours) - BEHAVIOURS
        assert not unknown, f"unknown behaviours {unknown}"
        with self._lock:
            self._plans[key].extend(behaviours)

    def plan_batch(self, *outcomes: str) -> None:
        """How the next batch jobs end: succeed (default), fail, expire."""
        assert not set(outcomes) - BATCH_OUTCOMES, f"unknown outcomes {outcomes}"
        with self._lock:
            self._batch_plans.extend(outcomes)

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
                path = self.path.split("?")[0]
                if path.startswith("/upload/"):
                    return fake._upload(self)
                if BATCH_CREATE.match(path) or BATCH.match(path):
                    return fake._batch_post(self)
                fake._handle(self)

            def do_GET(self):  # noqa: N802
                fake._get(self)

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
            return None, {}, BAD_KEY
        try:
            body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        except (ValueError, KeyError, TypeError):
            return None, {}, self._problem("the body is not a generateContent request")
        return self._check_request(body, match.group(1))

    def _check_request(self, body, model: str) -> tuple[str | None, dict, dict | None]:
        """One GenerateContentRequest (a POST body, or a batch line's "request"): the checks
        are the same for both, so batch mode must send what online mode sends."""
        try:
            parts = [p for c in body["contents"] for p in c["parts"]]
        except (KeyError, TypeError):
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
        config = body.get("generationConfig") or body.get("generation_config") or {}
        mime = config.get("responseMimeType") or config.get("response_mime_type")
        schema = (config.get("responseSchema") or config.get("responseJsonSchema")
                  or config.get("response_schema"))
        if mime != "application/json" or not schema:
            return key, {}, self._problem("structured JSON output was not requested")
        system = body.get("systemInstruction") or body.get("system_instruction") or {}
        system_text = " ".join(p.get("text", "") for p in system.get("parts", []))
        label = self._expected.get(key)
        if label is not None and f'"{label}"' not in prompt:
            return key, {}, self._problem(f"the prompt does not name the label {label!r}")
        return key, {"model": model, "prompt": prompt, "images": len(images),
                     "label": label or self.explain_label, "system": system_text,
                     "config": config}, None

    def _handle(self, handler) -> None:
        arrived = time.monotonic()
        key, facts, error = self._parse(handler)
        if key is not None:
            with self._lock:
                self.requests[key] += 1
                self.times[key].append(arrived)
                if facts:
                    self.facts[key].append(facts)
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

