"""Peak memory per request for normal, big-but-allowed and header-declared-huge uploads.

    python bench/upload_memory.py                 # decode, engine and API paths, all files
    python bench/upload_memory.py --paths api --json

Three paths, each measured in its own process so one file's garbage never counts for the next:
  decode  core.media.load_image in a fresh process (no model): what decoding costs;
  engine  Engine().predict (prior-only mode: MTCNN + the face prior) after a warm-up request:
          decoding, the scale-down and face detection together, as the CLI runs them;
  api     `python app.py serve` (prior-only) and gradio_client: the server's RSS sampled every
          5 ms during each /predict_image call, against its RSS just before. This is the path
          the issue measured (+1.5-1.8 GB for a 5 KB 7000x5700 PNG before the fix).
Peak = the highest RSS seen during the request minus the RSS before it (psutil, 5 ms samples;
ru_maxrss where the process is fresh). Numbers go into the README's limits section.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_files(folder: Path) -> dict[str, Path]:
    """The uploads measured: {description: path}."""
    import numpy as np
    from PIL import Image

    from tests.media_files import face_photo, png_claiming

    folder.mkdir(parents=True, exist_ok=True)
    photo = face_photo()
    files = {}
    normal = folder / "normal_512.jpg"
    Image.fromarray(photo).save(normal, quality=90)
    files["normal 512x512 JPEG"] = normal
    # 7000 x 5700 (39.9 MP, just under the 40 MP limit): a flat PNG of a few KB, as in the
    # issue, and a photo-like JPEG of the same size (the face tiled).
    flat = folder / "flat_7000x5700.png"
    Image.new("L", (7000, 5700), 128).save(flat, optimize=True)
    files["big allowed 7000x5700 PNG (flat)"] = flat
    tiled = np.tile(photo, (12, 14, 1))[:5700, :7000]
    jpeg = folder / "photo_7000x5700.jpg"
    Image.fromarray(tiled).save(jpeg, quality=85)
    files["big allowed 7000x5700 JPEG (photo)"] = jpeg
    del tiled
    big = folder / "flat_13000x13000.png"
    Image.new("1", (13000, 13000), 1).save(big, optimize=True)  # 169 MP: over the limit
    files["over the limit 13000x13000 PNG"] = big
    files["declared 30000x30000 PNG (header only)"] = png_claiming(folder / "declared_huge.png",
                                                                   30000, 30000)
    return files


class RssSampler:
    """Highest RSS of a process (and its children) seen every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.005):
        import psutil

        self._process = psutil.Process(pid)
        self.interval, self.peak = interval, self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = self._process.memory_info().rss
        for child in self._process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except Exception:
                pass
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def child(path: str, mode: str) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import resource

    from core.errors import UserError

    warm = None
    if mode == "engine":
        from core.engine import Engine

        engine = Engine()
        from tests.media_files import face_photo, write_image

        warm = write_image(Path(tempfile.mkdtemp()) / "warm.jpg", face_photo())
        engine.predict(str(warm))  # the model and detector are loaded and have run once
        run = lambda: engine.predict(path)  # noqa: E731
    else:
        from core.media import load_image

        run = lambda: load_image(path).shape  # noqa: E731
    before_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    with RssSampler(os.getpid()) as sampler:
        before = sampler.peak
        try:
            answer = run()
            outcome = ("ok: " + (f"{len(answer['faces'])} face(s), label {answer['label']}"
                                 if isinstance(answer, dict) else f"{answer[1]}x{answer[0]}"))
        except UserError as exc:
            outcome = f"refused: {exc}"
    ms = (time.perf_counter() - started) * 1000
    after_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_mb": round((sampler.peak - before) / 2**20, 1),
                      "maxrss_growth_mb": round((after_peak - before_peak) / 2**20, 1),
                      "rss_before_mb": round(before / 2**20, 1), "ms": round(ms),
                      "outcome": outcome}))


def run_child(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--mode", mode],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"outcome": f"child failed: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def measure_api(files: dict[str, Path], root: Path) -> dict[str, dict]:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EMO_DATA_DIR": str(root / "data"), "GRADIO_TEMP_DIR": str(root / "tmp"),
           "EMO_SECRET_KEY": "bench", "GRADIO_ANALYTICS_ENABLED": "False"}
    for key in ("EMO_LLAMA_MODEL", "GEMINI_API_KEY", "GOOGLE_API_KEY"):
        env.pop(key, None)
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, "app.py", "serve", "--port", str(port)], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        deadline = time.monotonic() + 300
        client = None
        while client is None and time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: see {root / 'server.log'}")
            try:
                client = Client(url, verbose=False, download_files=str(root / "downloads"))
            except Exception:
                time.sleep(1)
        warm = files["normal 512x512 JPEG"]
        client.predict(handle_file(str(warm)), api_name="/predict_image")
        for name, path in files.items():
            time.sleep(1.0)  # let the previous request's memory settle
            with RssSampler(server.pid) as sampler:
                before = sampler.peak
                started = time.perf_counter()
                try:
                    answer = client.predict(handle_file(str(path)), api_name="/predict_image")[0]
                    outcome = f"ok: {len(answer['faces'])} face(s), label {answer['label']}"
                except AppError as exc:
                    outcome = f"refused: {exc}"
                ms = (time.perf_counter() - started) * 1000
            results[name] = {"peak_mb": round((sampler.peak - before) / 2**20, 1),
                             "rss_before_mb": round(before / 2**20, 1),
                             "rss_after_mb": round(sampler.rss() / 2**20, 1),
                             "ms": round(ms), "outcome": outcome}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default="decode,engine,api")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--mode", default="decode")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.mode)
    from core.media import DEFAULT_LIMITS

    root = Path(tempfile.mkdtemp(prefix="upload-memory-"))
    try:
        report = measure(root, args.paths)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # ~10 MB of files and a data dir per run
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"limits: {DEFAULT_LIMITS.max_image_pixels / 1e6:.0f} MP refused from the header; "
          f"longest side scaled to {DEFAULT_LIMITS.max_side} px after decoding\n")
    for mode in (m for m in ("decode", "engine", "api") if m in report):
        print(f"| {mode} path | file size | peak MB over before | ms | outcome |")
        print("|---|---:|---:|---:|---|")
        for name, row in report[mode].items():
            size = report["files"][name]
            print(f"| {name} | {size / 1024:.0f} KB | {row.get('peak_mb', '-')} | "
                  f"{row.get('ms', '-')} | {row['outcome'][:90]} |")
        print()


def measure(root: Path, paths: str) -> dict:
    from core.media import DEFAULT_LIMITS

    files = make_files(root / "files")
    report = {"limits": {"max_image_pixels": DEFAULT_LIMITS.max_image_pixels,
                         "max_side": DEFAULT_LIMITS.max_side,
                         "max_file_bytes": DEFAULT_LIMITS.max_file_bytes},
              "files": {name: path.stat().st_size for name, path in files.items()}}
    for mode in paths.split(","):
        if mode == "api":
            report["api"] = measure_api(files, root)
        else:
            report[mode] = {name: run_child(path, mode) for name, path in files.items()}
    return report


if __name__ == "__main__":
    main()
