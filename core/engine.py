"""The shared inference core: one model per process, serving every tab and command at once.

    engine = shared_engine()                       # EMO_LLAMA_MODEL, or prior-only mode
    engine.predict("photo.jpg")                    # the prediction JSON of DESIGN.md §3
    for event in engine.stream("clip.mp4"):        # analysis, text pieces, done
        ...

How a request flows:
  submit ──► preprocessing pool (decode, sample frames, faces, model.prepare)   [N threads]
         ──► model queue ──► model thread: continuous (iteration-level) batching. Between two
             decoding steps, the requests that became ready (up to `max_batch` decoding at once)
             get ONE batched label-scoring pass (their "analysis" events), then join the running
             generation batch in ONE prefill pass (core/model/decoding.py: their KV cache merged
             into the running one); every step decodes one token for every row and streams each
             request's text to its own event queue; a finished or cancelled row leaves at once.
             When nothing is decoding, the first request waits up to `batch_window_ms` for
             company. `continuous=False` is static batching: nothing joins a running batch.
A request is bound at submit to the version (and face analyser) serving then, and is decoded,
analysed, prepared and run on those: `swap()` changes what new requests get, never what one in
flight runs on. Preparing is done once per request: one decode, one face pass (all frames through
the prior network together), one image-processor pass and one vision-tower pass shared by the
scoring prompt and the conversation prompt (EmoLlama.prepare_media).
A full queue answers EngineBusy at once (back-pressure, not unbounded memory). A request whose
client goes away (its iterator closed) is dropped at the next decoding step. A failing request
fails alone: a scoring or prefill pass that raises is retried one request at a time, and so is
every row of a decoding step that raises (each decoded alone from its start; text already
streamed is not sent twice). Versions never share a decode batch: each has its own, stepped in
turn. `health()["batch_sizes"]` counts decode batch sizes, once per decoding step.

Without a checkpoint the engine serves `PriorOnlyModel` (core/model/prior_only.py) behind the
same model interface: labels and scores come from the face prior network (largest face; videos:
mean over the frames with a face), `explanation` is "" and `note` says plainly that no
checkpoint is loaded and how to load one (the UI shows the note in the explanation panel). It
answers in the preprocessing pool, from the faces (`answers_from_faces`): no scoring or decoding
pass. A file with no face gives label None, scores {} and a "No face found" note: nothing is
invented.

`aligned=True` (predict/stream) says the file is a face crop, as FER datasets ship them: the
analyser skips detection and takes the whole image as the face (core/faces.py). What the face
analysis has to say comes first in `note` ("8 of 30 faces shown, largest first", "too small to
find a face", "low confidence: this may not be a face"); `faces_found` counts the faces detected
before the per-frame cap, `media.aligned` echoes the flag.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace


from core.errors import UserError
from core.faces import FaceConfig, shared_analyzer
from core.media import DEFAULT_LIMITS, MediaLimits, load_media
from core.model.prior_only import PRIOR_ONLY_NOTE, PriorOnlyModel
from core.model.recipe import frames as recipe_frames

log = logging.getLogger(__name__)

ZERO_SHOT_NOTE = ("Zero-shot: {vlm} answers as released, without EMO-LLaMA's fine-tuning, face "
                  "tokens or age/gender sentence: a baseline, not a trained model.")
TINY_NOTE = ("TEST FIXTURE: this answer comes from a tiny randomly initialised checkpoint, not a "
             "trained model. Its labels and text are meaningless.")


class EngineBusy(UserError):
    """The queue is full."""


class RequestTimeout(UserError):
    """A request took longer than its timeout."""


@dataclass
class EngineConfig:
    max_batch: int = 8  # the most requests decoding at once (all versions together)
    # True: requests join the running decode batch at the next step; False: static batching, a
    # request waits until the whole running batch is done (bench/engine_throughput.py compares).
    continuous: bool = True
    batch_window_ms: float = 20.0
    max_queue: int = 64
    request_timeout_s: float = 120.0
    preprocess_workers: int = 2
    # None: the serving checkpoint's recipe (config.json num_frames / max_new_tokens), so videos are
    # sampled as the version was trained; a number (--frames, --max-new-tokens) overrides it.
    num_frames: int | None = None
    max_new_tokens: int | None = None
    limits: MediaLimits = field(default_factory=lambda: DEFAULT_LIMITS)
    device: str = "auto"
    # "8bit" / "4bit": the frozen LLM through bitsandbytes (optional; for a smaller GPU).
    quantization: str | None = field(default_factory=lambda: os.environ.get("EMO_QUANTIZATION") or None)


@dataclass
class _Request:
    id: int
    media: str
    question: str | None
    label_set: list[str] | None
    explain: bool
    aligned: bool = False  # the file is a face crop: no detection, the whole image is the face
    submitted: float = field(default_factory=time.perf_counter)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: dict = field(default_factory=dict)
    score_input: object = None
    text_input: object = None
    ready: float = 0.0
    started: float = 0.0  # when the model thread took it (its scoring pass)
    finished: bool = False
    # What the client has been sent, so that a batch retried one by one repeats nothing.
    analysis_sent: bool = False
    streamed: str = ""
    attempt_text: str = ""
    face_notes: list[str] = field(default_factory=list)  # "8 of 30 faces shown", "too small"...
    # The version and face analyser serving when the request was submitted: it is prepared and
    # run on these, whatever is swapped in meanwhile (token ids and face embeddings of one
    # version mean nothing to another).
    model: object = None
    analyzer: object = None
    frames: list = field(default_factory=list)  # the sampled RGB frames, for the UI to draw on


@dataclass(frozen=True)
class Serving:
    """What the engine serves: compare `name` (the registry's version name, or the checkpoint's
    config version) instead of parsing `info["model_version"]`, which is for display."""
    name: str
    folder: str | None  # the checkpoint folder or hub id it was loaded from; None in prior-only mode
    mode: str           # "checkpoint" | "zero-shot" | "tiny-test-fixture" | "prior-only"


class Engine:
    def __init__(self, model: str | None = None, config: EngineConfig | None = None):
        self.config = replace(config or EngineConfig())  # num_frames is filled in below: a copy
        self._frames_override = self.config.num_frames
        self.device, self.dtype = _pick_device(self.config.device)
        self._model = self._load(model) if model else PriorOnlyModel()
        self._folder = str(model) if model else None
        self._apply_recipe(self._model)
        self.faces = _analyzer_for(self._model)
        self._swap_lock = threading.Lock()
        self._retired: list = []  # versions swapped out that share the base; released between batches
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._pool = ThreadPoolExecutor(self.config.preprocess_workers, thread_name_prefix="engine-prep")
        self._ids = itertools.count(1)
        self._pending: dict[int, _Request] = {}  # submitted and not finished: the queue bound, close()
        self._count_lock = threading.Lock()  # guards the counters, the histogram and _pending
        self._closed = threading.Event()  # set by close(); no new requests after it
        self._started = time.time()
        self._latencies: deque[float] = deque(maxlen=2000)
        self._batch_sizes: Counter[int] = Counter()
        self._stats = Counter()
        self._thread = threading.Thread(target=self._model_loop, name="engine-model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ model versions
    def _apply_recipe(self, model) -> None:
        """Frames per video: the override, else the serving checkpoint's (8 in prior-only mode)."""
        self.config.num_frames = recipe_frames(getattr(model, "config", None), self._frames_override)

    def _load(self, name_or_path: str):
        from core.model.loading import load_model

        return load_model(name_or_path, device=self.device, dtype=self.dtype,
                          quantization=self.config.quantization)

    @property
    def serving(self) -> Serving:
        """The version answering new requests now (see Serving)."""
        with self._swap_lock:
            model, folder = self._model, self._folder
        if _prior_only(model):
            return Serving("prior-only", None, "prior-only")
        return Serving(model.version, folder, _version_info(model)["mode"])

    def swap(self, folder_or_id: str, name: str | None = None) -> Serving:
        """The one way to change what serves: load a version beside the serving one, then
        switch; a failure (ModelLoadError, a missing prior network) leaves serving untouched.

        A version built on the serving base loads only its adapter and modules onto that base.
        Requests already submitted finish on the version (and face analyser) they were prepared
        for; an old adapter is released by the model thread once no such request is left. A
        version with another prior network gets its own analyser, loaded before the switch.
        """
        from core.errors import ModelLoadError

        current, model = self._model, None
        if hasattr(current, "load_version"):
            try:
                model = current.load_version(folder_or_id).eval()
            except ModelLoadError as exc:
                if "built on base" not in str(exc):
                    raise
        if model is None:
            model = self._load(folder_or_id)
        if name:
            model.config.version = name
        try:
            analyzer = _analyzer_for(model)
        except Exception:
            if model.llm is not None and model.llm is current.llm:
                model.release()  # the adapter loaded onto the shared base: not kept
            raise
        with self._swap_lock:
            old, self._model, self._folder, self.faces = self._model, model, str(folder_or_id), analyzer
            self._apply_recipe(model)
            if old.llm is not None and old.llm is model.llm:
                self._retired.append(old)
        log.info("now serving %s", self.info["model_version"])
        return self.serving

    def load_version(self, folder_or_id: str, name: str | None = None) -> Serving:
        """The older name of `swap()`."""
        return self.swap(folder_or_id, name)

    @property
    def info(self) -> dict:
        with self._swap_lock:
            model, analyzer = self._model, self.faces
        return _mode_info(model, analyzer)

    # ------------------------------------------------------------------ public API
    def predict(self, media, *, question: str | None = None, label_set: list[str] | None = None,
                explain: bool = True, timeout: float | None = None, aligned: bool = False) -> dict:
        result = None
        with self.stream(media, question=question, label_set=label_set, explain=explain,
                         timeout=timeout, aligned=aligned) as events:
            for event in events:
                if event["event"] == "done":
                    result = event["result"]
        return result

    def stream(self, media, *, question: str | None = None, label_set: list[str] | None = None,
               explain: bool = True, timeout: float | None = None,
               aligned: bool = False) -> "RequestStream":
        """Submit now (EngineBusy is raised here) and iterate the request's events:
        {"event": "analysis", "result", "frames"}, {"event": "text", "text"} ...,
        {"event": "done", "result", "frames"}; `frames` are the sampled RGB uint8 frames the
        result's boxes refer to (one for an image; `faces[i]["frame"]` indexes them in a video),
        so a caller draws on them without decoding the file again. `result` stays plain JSON.
        Closing the stream early cancels the request and frees its slot at once. `aligned`: the
        file is a face crop (FER2013, RAF-DB aligned): detection is skipped, the image is the face."""
        request = self._submit(str(media), question, label_set, explain, aligned)
        return RequestStream(self, request, timeout or self.config.request_timeout_s)

    def health(self) -> dict:
        with self._count_lock:
            latencies, batch_sizes, stats = sorted(self._latencies), dict(self._batch_sizes), dict(self._stats)

        def pct(q: float) -> float | None:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

        return {"model_version": self.info["model_version"], "mode": self.info["mode"],
                "queue_depth": self._queue.qsize(), "in_flight": len(self._pending),
                "max_queue": self.config.max_queue, "batch_sizes": dict(sorted(batch_sizes.items())),
                "latency_ms_p50": pct(0.5), "latency_ms_p95": pct(0.95),
                **{k: stats.get(k, 0) for k in ("served", "failed", "cancelled", "rejected_busy")},
                "device": str(self.device), "quantization": self.config.quantization,
                "uptime_s": round(time.time() - self._started, 1)}

    def close(self) -> None:
        """Stop the model thread; requests still waiting fail with a clear error."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout=5)
        with self._count_lock:
            pending = list(self._pending.values())
        for request in pending:
            self._finish(request, "error", UserError("the engine was shut down before this request ran"))

    # ------------------------------------------------------------------ request life
    def _submit(self, media: str, question, label_set, explain, aligned: bool = False) -> _Request:
        if self._closed.is_set():
            raise UserError("the engine is shut down")
        request = _Request(next(self._ids), media, question, label_set, explain, bool(aligned))
        # Bound to the version serving now, under the swap lock and registered as pending in the
        # same breath, so the model thread never releases a version a request still needs.
        with self._swap_lock, self._count_lock:
            if len(self._pending) >= self.config.max_queue:
                self._stats["rejected_busy"] += 1
                raise EngineBusy("the model is busy with other requests; retry in a few seconds")
            request.model, request.analyzer = self._model, self.faces
            self._pending[request.id] = request
        try:
            self._pool.submit(self._preprocess, request)
        except RuntimeError:  # the pool was shut down between the check above and now
            self._finish(request, "error", UserError("the engine is shut down"))
        return request

    def _finish(self, request: _Request, kind: str, payload) -> None:
        """Free the request's slot and send its last event; only the first call counts."""
        with self._count_lock:
            if request.finished:
                return
            request.finished = True
            self._pending.pop(request.id, None)
            self._stats[{"done": "served", "error": "failed"}.get(kind, "cancelled")] += 1
            if kind == "done":
                self._latencies.append((time.perf_counter() - request.submitted) * 1000)
        request.events.put((kind, payload))

    def _preprocess(self, request: _Request) -> None:
        """Decode + faces (+ model inputs) on a pool thread; prior-only requests finish here."""
        if request.cancelled.is_set():
            return self._finish(request, "cancelled", None)
        try:
            started = time.perf_counter()
            model = request.model  # frames are sampled as this version was trained (its recipe)
            num_frames = recipe_frames(getattr(model, "config", None), self._frames_override)
            media = load_media(request.media, num_frames=num_frames, limits=self.config.limits)
            decoded = time.perf_counter()
            request.frames = media.frames
            faces = request.analyzer.analyze_frames(media.frames, aligned=request.aligned)
            analysed = time.perf_counter()
            request.face_notes = _face_notes(media.kind, faces)
            request.result = {
                "faces": _faces_json(media, faces),
                # Faces detected before the per-frame cap (`faces` lists at most max_faces each).
                "faces_found": sum(getattr(fs, "found", len(fs)) for fs in faces),
                "agr_sentence": _agr_sentence(faces, model),
                "media": {"kind": media.kind, **{k: media.meta[k] for k in
                                                 ("width", "height", "original_size", "frame_count", "fps",
                                                  "duration_s")
                                                 if k in media.meta}, "aligned": request.aligned},
                "timings_ms": {"decode": _ms(started, decoded), "faces": _ms(decoded, analysed)}}
            if _prior_only(model):
                answer = model.answer(faces, request.label_set, list(request.analyzer.prior.labels))
                result = {**request.result, **_version_info(model, request.analyzer), **answer}
                result["note"] = _join_notes(request.face_notes, result["note"])
                result["timings_ms"]["model"] = 0.0
                return self._finish(request, "done", result)
            from core.model.recipe import category_question, conversation_question

            labels = request.label_set or model.config.label_set
            request.label_set = labels
            # Prepare once: the frames and faces go through the image processor here, once, and
            # the vision tower once at batch time; both prompts below share that pass.
            prepared = model.prepare_media(media.frames, faces)
            request.score_input = model.prepare(prepared, faces,
                                                category_question(labels, media.kind, model.config))
            if request.explain:
                # The checkpoint's first training phrasing: asked as it was trained.
                text_question = request.question or conversation_question(media.kind, model.config)
                request.text_input = model.prepare(prepared, faces, text_question)
            request.result["timings_ms"]["prepare"] = _ms(analysed, time.perf_counter())
            request.ready = time.perf_counter()
            self._queue.put(request)
        except UserError as exc:
            self._finish(request, "error", exc)
        except Exception as exc:  # a bug must fail this request, not the pool
            log.exception("preprocessing failed for %s", request.media)
            self._finish(request, "error", UserError(f"could not process the file ({type(exc).__name__})"))

    # ------------------------------------------------------------------ the model thread
    def _next_batch(self, room: int, idle: bool) -> list[_Request]:
        """Up to `room` prepared requests. Idle: wait for the first, then up to `batch_window_ms`
        for company while others are on their way (a lone request runs at once). While rows are
        decoding: only the requests already here, so the running rows never wait."""
        if room <= 0:
            return []
        try:
            first = self._queue.get(timeout=0.2) if idle else self._queue.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.perf_counter() + self.config.batch_window_ms / 1000
        while len(batch) < room:
            # Wait for company only while other requests are on their way (in preprocessing).
            waiting_for_more = idle and len(self._pending) > len(batch) + self._queue.qsize()
            remaining = deadline - time.perf_counter() if waiting_for_more else 0
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                if remaining <= 0:
                    break
        live = []
        for request in batch:
            if request.cancelled.is_set():
                self._finish(request, "cancelled", None)
            else:
                live.append(request)
        return live

    def _model_loop(self) -> None:
        """Iteration-level scheduling: between two decoding steps, requests that became ready
        are scored and join the running decode batch; finished or cancelled rows leave at once.
        Each version has its own decode batch (adapters differ), stepped in turn."""
        from core.model.decoding import DecodeBatch

        running: dict[int, DecodeBatch] = {}  # id(model) -> that version's decode batch
        while not self._closed.is_set():
            self._release_retired()
            rows = sum(len(decoder) for decoder in running.values())
            # Static batching (continuous=False, or a cache that cannot be re-padded, e.g. sliding
            # window layers): nothing joins until the whole running batch is done.
            joinable = self.config.continuous and all(getattr(d, "joinable", True)
                                                      for d in running.values())
            room = self.config.max_batch - rows if joinable or not rows else 0
            groups: dict[int, list[_Request]] = {}
            for request in self._next_batch(room, idle=not rows):
                groups.setdefault(id(request.model), []).append(request)
            for key, group in groups.items():
                # A model may bring its own (core/model/remote.py: a vLLM server batches itself).
                batch_type = getattr(group[0].model, "decode_batch_type", DecodeBatch)
                decoder = running.setdefault(key, batch_type(group[0].model))
                self._admit(group, decoder)
            for key, decoder in list(running.items()):
                if decoder:
                    self._step(decoder)
                if not decoder:
                    del running[key]  # holds its version: retired ones are released once idle

    def _release_retired(self) -> None:
        """Drop the adapters of swapped-out versions no submitted request still needs (the model
        thread calls this between decoding steps; a decoding request is still pending)."""
        with self._swap_lock, self._count_lock:
            needed = {id(r.model) for r in self._pending.values()}
            done = [old for old in self._retired if id(old) not in needed]
            self._retired = [old for old in self._retired if id(old) in needed]
        for old in done:
            try:
                old.release()
            except Exception:  # a leaked adapter costs memory, not answers
                log.exception("could not release version %s", old.version)

    def _admit(self, group: list[_Request], decoder) -> None:
        try:
            self._start(group, decoder)
        except Exception:
            # One bad request must not cost the others their answers: find it by running the
            # group's requests alone (a failed prefill left the running rows untouched).
            log.warning("a batch of %d failed; retrying its requests one by one", len(group))
            for request in group:
                if not request.finished:
                    self._guarded(request, lambda: self._start([request], decoder))

    def _start(self, group: list[_Request], decoder) -> None:
        """One label-scoring pass per label set (the "analysis" events), then the requests that
        explain join the decode batch in one prefill pass; the others are answered."""
        import torch

        model = decoder.model
        started = time.perf_counter()
        info = _version_info(model)
        by_labels: dict[tuple, list[_Request]] = {}
        for request in group:
            by_labels.setdefault(tuple(request.label_set), []).append(request)
        with torch.inference_mode():
            for labels, part in by_labels.items():
                scores = model.score_labels([r.score_input for r in part], list(labels))
                for request, s in zip(part, scores):
                    request.started = started
                    request.result.update(info, label=max(s, key=s.get), scores=s, explanation="")
                    if not request.result["faces"]:
                        request.result["note"] = ((info.get("note") or "") + " No face found: the model "
                                                  "answered from the whole frame.").strip()
                    request.result["note"] = _join_notes(request.face_notes, request.result.get("note"))
                    request.result["timings_ms"]["queue"] = _ms(request.ready, started)
                    if not request.analysis_sent:
                        request.analysis_sent = True
                        request.events.put(("analysis", dict(request.result)))
            talkers = [r for r in group if r.explain and not r.cancelled.is_set()]
            for request in talkers:
                request.attempt_text = ""
            decoder.add([r.text_input for r in talkers], talkers, max_new_tokens=self.config.max_new_tokens,
                        on_text=_send_text, is_active=lambda r: not r.cancelled.is_set())
        decoding = {id(r) for r in talkers}
        for request in group:
            _forget_features(request)  # the prompts have been through the LLM: free the device memory
            if id(request) not in decoding:
                self._answered(request)

    def _step(self, decoder) -> None:
        import torch

        rows = list(decoder.rows)
        with self._count_lock:
            self._batch_sizes[len(rows)] += 1  # the decode batch size, once per step
        try:
            with torch.inference_mode():
                finished = decoder.step()
        except Exception:
            log.warning("a decoding step of %d rows failed; retrying them one by one", len(rows))
            decoder.clear()
            for row in rows:
                self._guarded(row.key, lambda: self._generate_alone(decoder.model, row.key))
            return
        for row in finished:
            row.key.result["explanation"] = row.answer
            self._answered(row.key)

    def _generate_alone(self, model, request: _Request) -> None:
        """A request of a failed step, decoded on its own from the start (greedy decoding repeats
        the text already streamed; _send_text skips it)."""
        import torch

        request.attempt_text = ""
        with torch.inference_mode():
            (text,) = model.generate([request.text_input], self.config.max_new_tokens,
                                     on_text=lambda i, piece: _send_text(request, piece),
                                     is_active=lambda i: not request.cancelled.is_set())
        _forget_features(request)
        request.result["explanation"] = text
        self._answered(request)

    def _guarded(self, request: _Request, run) -> None:
        """Run one request's work; whatever it raises fails that request alone."""
        try:
            run()
        except UserError as exc:
            self._finish(request, "error", exc)
        except Exception as exc:
            log.exception("request %s failed", request.media)
            self._finish(request, "error", UserError(f"the model failed on this input ({type(exc).__name__})"))

    def _answered(self, request: _Request) -> None:
        request.result["timings_ms"]["model"] = _ms(request.started, time.perf_counter())
        if request.cancelled.is_set():
            self._finish(request, "cancelled", None)
        else:
            self._finish(request, "done", request.result)


class RequestStream:
    """The events of one request, in order; an iterator that cancels its request when closed."""

    def __init__(self, engine: Engine, request: _Request, timeout_s: float):
        self._engine, self._request, self._timeout_s = engine, request, timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._done = False

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        try:
            kind, payload = self._request.events.get(timeout=max(0.0, self._deadline - time.monotonic()))
        except queue.Empty:
            self.close()
            raise RequestTimeout(f"no answer within {self._timeout_s:.0f} s; the request was cancelled") from None
        if kind == "error":
            self._done = True
            raise payload
        if kind == "cancelled":
            self._done = True
            raise StopIteration
        if kind == "done":
            self._done = True
        if kind == "text":
            return {"event": "text", "text": payload}
        return {"event": kind, "result": payload, "frames": self._request.frames}

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._request.cancelled.set()
            self._engine._finish(self._request, "cancelled", None)

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _forget_features(request: _Request) -> None:
    if request.score_input is not None and request.score_input.media is not None:
        request.score_input.media.forget_features()


def _send_text(request: _Request, piece: str) -> None:
    """Stream a piece, skipping text a failed batch attempt already sent (greedy decoding
    repeats it when the request is retried alone)."""
    request.attempt_text += piece
    if len(request.attempt_text) > len(request.streamed):
        new = request.attempt_text[len(request.streamed):]
        request.streamed = request.attempt_text
        request.events.put(("text", new))


def _prior_only(model) -> bool:
    return getattr(model, "answers_from_faces", False)


def _analyzer_for(model):
    """The face analyser of a version: its embeddings must come from the prior network the
    checkpoint was trained with (prior-only mode: the default prior)."""
    return shared_analyzer(FaceConfig(prior=model.config.prior))


def _mode_info(model, analyzer) -> dict:
    return {**_version_info(model, analyzer), "face_pipeline": analyzer.describe()}


def _version_info(model, analyzer=None) -> dict:
    if _prior_only(model):
        prior = analyzer.prior.name if analyzer is not None else model.config.prior
        return {"model_version": f"prior-only:{prior}", "mode": "prior-only", "is_tiny": False,
                "note": PRIOR_ONLY_NOTE}
    if model.config.is_tiny:
        return {"model_version": f"tiny-test-fixture:{model.version}", "mode": "tiny-test-fixture",
                "is_tiny": True, "note": TINY_NOTE}
    if getattr(model.config, "zero_shot", False):
        return {"model_version": model.version, "mode": "zero-shot", "is_tiny": False,
                "note": ZERO_SHOT_NOTE.format(vlm=model.config.vlm)}
    return {"model_version": model.version, "mode": "checkpoint", "is_tiny": False, "note": ""}


def _face_notes(kind: str, faces: list[list]) -> list[str]:
    """What the face analysis said about the frames (FaceList.notes), once each; in a video, a
    note that holds for some frames only names them."""
    frames: dict[str, list[int]] = {}
    for index, frame_faces in enumerate(faces):
        for note in getattr(frame_faces, "notes", ()):
            frames.setdefault(note, []).append(index)
    if kind != "video":
        return list(frames)
    return [note if len(where) == len(faces) else
            f"{note} (frame{'s' if len(where) > 1 else ''} {', '.join(map(str, where))})"
            for note, where in frames.items()]


def _join_notes(face_notes: list[str], note: str | None) -> str:
    """The face analysis' sentences first (they are about this file), then the mode's note."""
    sentences = [n[:1].upper() + n[1:] + ("" if n.endswith(".") else ".") for n in face_notes]
    return " ".join(sentences + ([note] if note else []))


def _agr_sentence(faces: list[list], model) -> str:
    """The age-gender sentence the model's prompt carries (prepare() takes it from the first
    frame's largest face with attributes; prior-only: what a checkpoint would be told); "" when
    no face has attributes or the checkpoint was built without AGR."""
    from core.model.prompt import agr_sentence

    if not model.config.use_agr:
        return ""
    attributes = next((fs[0].attributes for fs in faces if fs and fs[0].attributes is not None), None)
    return agr_sentence(attributes) if attributes is not None else ""


def _faces_json(media, faces: list[list]) -> list[dict]:
    out = []
    for index, frame_faces in enumerate(faces):
        for face in frame_faces:
            entry = face.to_json()
            if media.kind == "video":
                entry["frame"] = index
            out.append(entry)
    return out


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 1)


def _pick_device(requested: str):
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        return torch.device(requested), (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.device(requested), torch.float32


_shared: Engine | None = None
_shared_lock = threading.Lock()


def shared_engine() -> Engine:
    """The process's engine, created from the environment on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Engine(os.environ.get("EMO_LLAMA_MODEL") or None)
        return _shared


def running_engine() -> Engine | None:
    """The process's engine if one was started, else None (never starts one: a swap or a
    status read in a CLI process must not load a model)."""
    with _shared_lock:
        return _shared


def set_shared_engine(engine: Engine | None) -> None:
    global _shared
    with _shared_lock:
        _shared = engine
