"""Many `python app.py ...` commands in one interpreter, each with its own stdout, stderr and
exit status (a traceback is caught into its stderr): the CLI's own code path (`app.main`),
without loading torch and the face networks once per command.

    runs = run_commands([["predict", "a.png", "--json"], ["predict", "b.mp4", "--json"]], env)
    runs[0].returncode, runs[0].stdout, runs[0].stderr

Tests that care about the process itself (exit codes seen by a shell) run a real one too.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = """
import contextlib, io, json, sys, traceback
import app
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = app.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print("RESULTS " + json.dumps(results))
"""


def run_commands(commands: list[list[str]], env: dict, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    line = next((out for out in done.stdout.splitlines() if out.startswith("RESULTS ")), None)
    if done.returncode != 0 or line is None:
        raise AssertionError(f"the command driver failed:\n{done.stderr[-3000:]}")
    return [subprocess.CompletedProcess(["app.py", *argv], **run)
            for argv, run in zip(commands, json.loads(line[len("RESULTS "):]))]
