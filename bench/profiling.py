"""Where a request's time goes: py-spy samples of the gunicorn workers, grouped by stage.

py-spy (``.venv/bin/pip install py-spy``; not a project dependency) samples
both workers while wrk drives them, without pausing them (``--nonblocking``)
and counting only samples in which a worker is busy. A sample lands in the
stages its stack passes through, outermost first, so "authentication >
storage" is the key lookup and "storage" alone is the view's own storage call.
Dividing the busy time by the requests answered meanwhile gives microseconds
per request. "Busy" means on the CPU or waiting for it, or blocked inside a
request (a sync worker can do nothing else meanwhile); on a loaded machine
waiting for the CPU inflates every stage alike, so read the shares. Samples of
other threads (such as the expiry timer of limits' memory storage, which
py-spy counts as busy while it sleeps) are listed but left out of the total.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from harness import BIN

RATE_HZ = 250

# (stage, pattern over one frame, "function (package/file.py)"), first match wins.
STAGES = [
    (name, re.compile(pattern))
    for name, pattern in (
        ("request id", r"^request_id \(sessions_app/corridor/request_id\.py\)"),
        ("authentication", r"^authenticate \(sessions_app/corridor/auth\.py\)"),
        ("routing-error hook", r"^.*hook \(sessions_app/__init__\.py\)"),
        ("rate limit", r"\(sessions_app/corridor/rate_limits\.py\)"),
        ("Flask-Limiter hooks", r"\(flask_limiter/"),
        ("body parse", r"^(json_object|read_body|parse) \(sessions_app/corridor/http\.py\)"),
        ("schema load", r"^(\w+\.)?load \(marshmallow/"),
        ("schema dump", r"^(\w+\.)?dump \((marshmallow/|sessions_app/schemas/__init__\.py)"),
        ("timestamps", r"^(format_ts|parse_ts|utcnow) \(storage_backends/codec\.py\)"),
        ("storage", r"\(storage_backends/"),
        ("url_for", r"^url_for \(flask/"),
        (
            "JSON response",
            r"^json_response \(sessions_app/corridor/http\.py\)|\(flask/json/provider\.py\)",
        ),
        ("after-request headers", r"^contract_headers \(sessions_app/corridor/http\.py\)"),
    )
]
OTHER_THREADS = "other threads (off the request path)"
IN_APP = re.compile(r"^Flask\.(__call__|wsgi_app) \(flask/app\.py\)")
ACCESS_LOG = re.compile(r"\(gunicorn/glogging\.py\)")


def py_spy() -> str:
    path = BIN / "py-spy"
    found = str(path) if path.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("bench: py-spy is missing; install it with: .venv/bin/pip install py-spy")
    return found


def start(pids: list[int], seconds: float, out_dir: Path, tag: str) -> list[tuple]:
    """Start one py-spy per worker; returns what :func:`finish` needs."""
    started = []
    for pid in pids:
        out = out_dir / f"{tag}-{pid}.txt"
        command = [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            f"{seconds:g}",
            "--rate",
            str(RATE_HZ),
            "--format",
            "raw",
            "--nolineno",
            "--nonblocking",
            "--output",
            str(out),
        ]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append((proc, out))
    return started


def finish(started: list[tuple]) -> Counter:
    """Wait for the recorders; the collapsed stacks of all workers with their sample counts."""
    stacks: Counter = Counter()
    for proc, out in started:
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace').strip()}")
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            stacks[stack] += int(count)
    return stacks


def stage_of(frames: list[str]) -> str:
    if frames[0].startswith("Thread._bootstrap "):
        # Not the worker's main thread, so not on the request path (such as
        # the expiry timer of limits' memory storage, mostly sleeping).
        return OTHER_THREADS
    if not any(IN_APP.search(frame) for frame in frames):
        if any(ACCESS_LOG.search(frame) for frame in frames):
            return "gunicorn: access log"
        return "gunicorn: HTTP parse/write, worker loop"
    path: list[str] = []
    for frame in frames:
        for name, pattern in STAGES:
            if pattern.search(frame):
                if not path or path[-1] != name:
                    path.append(name)
                break
    return " > ".join(path) or "Flask/Werkzeug dispatch (rest)"


def per_request_us(stacks: Counter, requests: float) -> tuple[dict[str, float], dict[str, float]]:
    """(stage -> µs per request, function -> inclusive µs per request), largest first.

    Functions count the request path only (the worker's main thread).
    """
    scale = 1e6 / RATE_HZ / max(requests, 1)
    stages: Counter = Counter()
    functions: Counter = Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        stage = stage_of(frames)
        stages[stage] += count
        if stage != OTHER_THREADS:
            for frame in set(frames):
                functions[frame] += count
    return (
        {name: n * scale for name, n in stages.most_common()},
        {name: n * scale for name, n in functions.most_common()},
    )
