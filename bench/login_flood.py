"""A real sign-in while someone floods /login with wrong passwords (issue 14.11).

    python bench/login_flood.py [--wrong 60] [--threads 8] [--real 5]

Starts `python app.py serve` (prior-only, a temporary store, production argon2 parameters,
EMO_TRUST_FORWARDED=1 so each client can be told apart by its X-Forwarded-For header), then:
1. the real user's sign-in alone (median of --real),
2. the same while --threads threads send --wrong wrong passwords from one other client,
3. the same while the wrong passwords come from --wrong different clients (each client has a
   few free failures; the per-name back-off, counted across both floods, stops them).
The real user signs in from a separate process, so the flood's client threads do not slow it.
Prints the real sign-in's median and worst latency in each case and how many flood attempts
were checked or refused at once.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the app exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/gradio_api/info", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the app did not start")


def client(url: str, ip: str):
    from gradio_client import Client

    return Client(url, verbose=False, headers={"X-Forwarded-For": ip})


def real_sign_ins(url: str, n: int, stop: threading.Event | None = None) -> list[float]:
    c = client(url, "10.0.0.2")
    times = []
    while len(times) < n or (stop is not None and not stop.is_set()):
        start = time.perf_counter()
        c.predict("real", "the-real-password", api_name="/login")
        times.append(time.perf_counter() - start)
        if stop is None and len(times) >= n:
            break
    return times


def flood(url: str, attempts: int, threads: int, distinct_clients: bool) -> dict:
    counts = {"checked": 0, "refused": 0, "other": 0}
    lock = threading.Lock()
    todo = list(range(attempts))

    def worker() -> None:
        clients: dict[str, object] = {}
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            ip = f"10.1.{i // 250}.{i % 250 + 1}" if distinct_clients else "10.0.0.66"
            c = clients.get(ip) or clients.setdefault(ip, client(url, ip))
            try:
                c.predict("someone", f"wrong-{i}", api_name="/login")
                kind = "other"
            except Exception as exc:
                text = str(exc)
                kind = ("refused" if "Too many attempts" in text else
                        "checked" if "wrong password" in text else "other")
            with lock:
                counts[kind] += 1

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return counts


def during(url: str, attempts: int, threads: int, distinct: bool) -> tuple[list[float], dict, float]:
    """The flood from this process; the real user signs in from another one (its own GIL, as
    a real browser would be), until the flood is over."""
    import json

    probe = subprocess.Popen([sys.executable, __file__, "--probe", url], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    probe.stdout.readline()  # "ready": its client is connected
    start = time.perf_counter()
    result = flood(url, attempts, threads, distinct)
    took = time.perf_counter() - start
    out, _ = probe.communicate("stop\n", timeout=120)
    return json.loads(out), result, took


def probe_main(url: str) -> None:
    """--probe URL: sign the real user in again and again until stdin says stop."""
    import json

    c = client(url, "10.0.0.2")
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    times = []
    while not stop.is_set() or not times:
        start = time.perf_counter()
        c.predict("real", "the-real-password", api_name="/login")
        times.append(time.perf_counter() - start)
    print(json.dumps(times), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wrong", type=int, default=60)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--real", type=int, default=5)
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe_main(args.probe)

    from annotation.users import add_user
    from db.session import dispose_engine, init_db

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        url_db = f"sqlite:///{data / 'studio.db'}"
        init_db(url_db)
        add_user("real", "annotator", "the-real-password", url=url_db)
        add_user("someone", "annotator", "someone-else-pass", url=url_db)
        dispose_engine(url_db)
        env = {**os.environ, "EMO_DATA_DIR": str(data), "EMO_DB_URL": url_db,
               "EMO_SECRET_KEY": "bench", "EMO_TRUST_FORWARDED": "1",
               "GRADIO_ANALYTICS_ENABLED": "False"}
        env.pop("EMO_LLAMA_MODEL", None)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(Path(tmp) / "server.log", "w") as log:
            process = subprocess.Popen([sys.executable, "app.py", "serve", "--port", str(port)],
                                       cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_up(url, process)
            alone = real_sign_ins(url, args.real)
            print(f"real sign-in alone: median {statistics.median(alone):.3f} s, "
                  f"worst {max(alone):.3f} s ({len(alone)} runs)")
            for distinct in (False, True):
                times, counts, took = during(url, args.wrong, args.threads, distinct)
                who = f"{args.wrong} clients" if distinct else "one client"
                print(f"during {args.wrong} wrong passwords from {who} ({args.threads} threads, "
                      f"{took:.1f} s): real sign-in median {statistics.median(times):.3f} s, "
                      f"worst {max(times):.3f} s ({len(times)} runs); flood {counts}")
        finally:
            process.terminate()
            process.wait(timeout=20)


if __name__ == "__main__":
    main()
