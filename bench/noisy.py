"""The noisy neighbour: each attack of issue 27 against another agent's appends.

A gunicorn with 4 workers serves a fresh store (SQLite, PostgreSQL). The victim,
an agent of its own, appends one event at a time to its session, one request
after the other, for ``--seconds``: first alone, then during each attack by
another agent's key. Printed per attack: the victim's p50 and p99 against the
victim alone (and their ratio), its 5xx answers, the attacker's answers, and
whether gunicorn logged a WORKER TIMEOUT. Rate limits are set out of reach, so
that the attacks are as hard as the storage lets them be.

    .venv/bin/python bench/noisy.py [--backends sqlite,postgresql] [--seconds 10]
    .venv/bin/python bench/run.py --noisy      (the same, from the benchmark's entry point)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402
import stores  # noqa: E402
from harness import BIN, ROOT, Gunicorn  # noqa: E402

from storage_backends import Event, Session, storage_from_url  # noqa: E402
from storage_backends.codec import utcnow  # noqa: E402

WORKERS = 4
VICTIM, NOISY = "victim", "noisy"
SCOPES = "sessions:create,sessions:read,sessions:update,sessions:delete,events:create,events:append"
BIG_EVENT = 4000  # bytes of content of each event of the session the forks copy
WIDE_EVENT = 255 * 1024  # events of the pages nobody reads


class Server(Gunicorn):
    """The harness's gunicorn with 4 workers, as the attack of the issue ran."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, options=["-w", str(WORKERS)], **kwargs)

    def wait_ready(self, timeout: float, replaced: frozenset[int] = frozenset(), workers: int = 0):
        return super().wait_ready(timeout, replaced, WORKERS)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def victim(url: str, token: str, seconds: float) -> dict:
    """One client appending one event a request to its session; latencies and statuses."""
    batch = f"{url}/v2/agents/{VICTIM}/sessions/victim-s/events/batch"
    headers = {"x-api-key": token}
    latencies, statuses = [], collections.Counter()
    with requests.Session() as http:
        stop = time.monotonic() + seconds
        n = 0
        while time.monotonic() < stop:
            n += 1
            body = {"events": [{"type": "agent_output", "content": f"turn {n}"}]}
            began = time.perf_counter()
            try:
                status = http.post(batch, json=body, headers=headers, timeout=60).status_code
            except requests.RequestException:
                status = 0  # reset, or no answer in 60 s
            latencies.append(time.perf_counter() - began)
            statuses[status] += 1
    return {
        "p50": 1000 * statistics.median(latencies),
        "p99": 1000 * percentile(latencies, 0.99),
        "statuses": dict(statuses),
    }


@contextlib.contextmanager
def attackers(count: int, attack: Callable[[int, threading.Event, collections.Counter], None]):
    """``count`` threads running ``attack`` until the block ends; their answers, counted."""
    stop, seen = threading.Event(), collections.Counter()
    threads = [threading.Thread(target=attack, args=(n, stop, seen)) for n in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield seen
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)


def fork_flood(url: str, token: str) -> Callable:
    def attack(n: int, stop: threading.Event, seen: collections.Counter) -> None:
        with requests.Session() as http:
            while not stop.is_set():
                body = {"name": "fork", "from_session": {"session_key": "big"}}
                answer = http.post(
                    f"{url}/v2/agents/{NOISY}/sessions", json=body,
                    headers={"x-api-key": token}, timeout=120,
                )  # fmt: skip
                seen[answer.status_code] += 1

    return attack


def fork_compact_delete(url: str, token: str) -> Callable:
    """Each round makes a large session (a fork), compacts it, and deletes it."""

    def attack(n: int, stop: threading.Event, seen: collections.Counter) -> None:
        sessions = f"{url}/v2/agents/{NOISY}/sessions"
        headers = {"x-api-key": token}
        with requests.Session() as http:
            while not stop.is_set():
                key = f"tmp-{n}-{uuid.uuid4().hex[:8]}"
                body = {"key": key, "name": key, "from_session": {"session_key": "big"}}
                made = http.post(sessions, json=body, headers=headers, timeout=120)
                seen[f"fork {made.status_code}"] += 1
                if made.status_code != 201:
                    continue
                compact = {"type": "compact", "summary_text": "so far"}
                done = http.post(f"{sessions}/{key}/events", json=compact, headers=headers)
                seen[f"compact {done.status_code}"] += 1
                gone = http.delete(f"{sessions}/{key}", headers=headers, timeout=120)
                seen[f"delete {gone.status_code}"] += 1

    return attack


def unread_pages(url: str, token: str) -> Callable:
    """16 requests for 25 MB pages whose answers are never read, held open."""

    def attack(n: int, stop: threading.Event, seen: collections.Counter) -> None:
        host, port = url.removeprefix("http://").split(":")
        path = f"/v2/agents/{NOISY}/sessions/wide/events?limit=100"
        while not stop.is_set():
            with socket.create_connection((host, int(port))) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nx-api-key: {token}\r\n\r\n"
                sock.sendall(head.encode())
                seen["held"] += 1
                stop.wait(35)  # past gunicorn's timeout, never reading

    return attack


def idempotent_batches(url: str, token: str) -> Callable:
    """3.5 MB batches, each with an Idempotency-Key of its own."""
    events = [{"type": "agent_output", "content": "b" * (250 * 1024)} for _ in range(14)]

    def attack(n: int, stop: threading.Event, seen: collections.Counter) -> None:
        batch = f"{url}/v2/agents/{NOISY}/sessions/flood-{n}/events/batch"
        with requests.Session() as http:
            while not stop.is_set():
                headers = {"x-api-key": token, "Idempotency-Key": uuid.uuid4().hex}
                answer = http.post(batch, json={"events": events}, headers=headers, timeout=120)
                seen[answer.status_code] += 1

    return attack


def slow_import(env: dict[str, str]) -> Callable:
    """``sessions import`` from a pipe that gives a line every 50 ms."""

    def attack(n: int, stop: threading.Event, seen: collections.Counter) -> None:
        process = subprocess.Popen(
            [str(BIN / "agent-sessions"), "sessions", "import", "-"],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert process.stdin is not None
        when = "2026-12-01T10:00:00.000Z"
        session = {
            "key": f"imported-{uuid.uuid4().hex[:8]}", "agent_key": NOISY, "name": "i",
            "metadata": {}, "enabled": True, "tti_minutes": 0, "created_at": when,
            "updated_at": when,
        }  # fmt: skip
        first = {"format": "agent-sessions/session", "version": 1, "session": session}
        process.stdin.write((json.dumps(first) + "\n").encode())
        count = 0
        while not stop.wait(0.05):
            event = {"id": f"aev_{count}", "type": "agent_output", "created_at": when,
                     "content": "i" * 1000}  # fmt: skip
            process.stdin.write((json.dumps({"event": event}) + "\n").encode())
            process.stdin.flush()
            count += 1
        process.stdin.write((json.dumps({"end": {"events": count}}) + "\n").encode())
        _, err = process.communicate(timeout=300)
        seen[f"import exit {process.returncode}"] += 1

    return attack


def events(count: int, size: int, prefix: str) -> Iterator[Event]:
    start = utcnow() - dt.timedelta(hours=1)
    for n in range(count):
        yield Event(
            id=f"aev_{prefix}{n}", session_key="", type="agent_output",
            fields={"content": "e" * size}, created_at=start + dt.timedelta(milliseconds=n),
        )  # fmt: skip


def prepare(backend: str, workdir: Path, big: int) -> tuple[dict[str, str], str, str]:
    """The store: the victim and the noisy agent, each with a key; the sessions attacked."""
    url = stores.fresh_url(backend, workdir, "noisy")
    env = {
        "AGENT_SESSIONS_STORAGE_URL": url,
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": stores.HIGH_LIMIT,
        "AGENT_SESSIONS_DEFAULT_LIMIT": stores.HIGH_LIMIT,
    }
    tokens = []
    for agent in (VICTIM, NOISY):
        stores.cli(env, "agents", "create", agent, "--name", agent)
        out = stores.cli(env, "keys", "create", "--name", agent, "--grant", f"{agent}={SCOPES}")
        tokens.append(out.strip().splitlines()[-1])
    storage = storage_from_url(url)
    try:
        now = utcnow()
        keys = ["victim-s"], ["big", "wide", *(f"flood-{n}" for n in range(4))]
        for agent, names in zip((VICTIM, NOISY), keys, strict=True):
            for key in names:
                storage.create_session(
                    session=Session(agent_key=agent, key=key, name=key, created_at=now,
                                    updated_at=now)
                )  # fmt: skip
        storage.load_events(agent_key=NOISY, session_key="big", events=events(big, BIG_EVENT, "b"))
        storage.load_events(
            agent_key=NOISY, session_key="wide", events=events(100, WIDE_EVENT, "w")
        )
    finally:
        storage.close()
    return env, tokens[0], tokens[1]


PREPARED = frozenset({"big", "wide", *(f"flood-{n}" for n in range(4))})


def reset(url: str) -> None:
    """What an attack stored beyond the prepared sessions removed, so that the next one
    starts under the noisy agent's quota again."""
    storage = storage_from_url(url)
    try:
        now = utcnow()
        after = None
        while True:
            page = storage.list_sessions(agent_key=NOISY, limit=100, after=after, now=now)
            for found in page.items:
                if found.key not in PREPARED:
                    storage.delete_session(agent_key=NOISY, session_key=found.key, now=now)
                elif found.key.startswith("flood-"):
                    storage.clear_events(agent_key=NOISY, session_key=found.key, now=now)
            if page.next_cursor is None:
                break
            after = page.next_cursor
        storage.purge_expired_idempotency_keys(now=now + dt.timedelta(days=3650))
    finally:
        storage.close()


def run(backends: list[str], seconds: float, big: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="noisy-") as tmp:
        workdir = Path(tmp)
        for backend in backends:
            env, victim_token, noisy_token = prepare(backend, workdir, big)
            with Server("noisy", "wsgi:app", env, workdir) as server:
                alone = victim(server.url, victim_token, seconds)
                rows.append({"backend": backend, "attack": "(victim alone)", **alone})
                attacks = [
                    ("fork flood (4 clients)", 4, fork_flood(server.url, noisy_token)),
                    ("fork, compact, delete", 2, fork_compact_delete(server.url, noisy_token)),
                    ("16 unread 25 MB pages", 16, unread_pages(server.url, noisy_token)),
                    ("Idempotency-Key 3.5 MB batches", 4,
                     idempotent_batches(server.url, noisy_token)),
                    ("import from a slow pipe", 1, slow_import({**server.env})),
                ]  # fmt: skip
                for name, count, attack in attacks:
                    with attackers(count, attack) as seen:
                        time.sleep(0.5)  # the attack under way first
                        during = victim(server.url, victim_token, seconds)
                    rows.append(
                        {"backend": backend, "attack": name, **during, "attacker": dict(seen),
                         "p99_ratio": during["p99"] / alone["p99"],
                         "p50_ratio": during["p50"] / alone["p50"],
                         "worker_timeouts": server.log_tail(10**7).count("WORKER TIMEOUT")}
                    )  # fmt: skip
                    print_row(rows[-1], flush=True)
                    reset(env["AGENT_SESSIONS_STORAGE_URL"])
            if backend == "postgresql":
                stores.drop_pg_databases()
    return rows


def print_row(row: dict, flush: bool = False) -> None:
    statuses = row["statuses"]
    bad = sum(n for status, n in statuses.items() if status >= 500 or status == 0)
    print(
        f"{row['backend']:10} {row['attack']:32} p50 {row['p50']:7.1f} ms "
        f"({row.get('p50_ratio', 1):5.2f}x)  p99 {row['p99']:7.1f} ms "
        f"({row.get('p99_ratio', 1):5.2f}x)  victim 5xx {bad}  "
        f"attacker {row.get('attacker', {})}  worker timeouts {row.get('worker_timeouts', 0)}",
        flush=flush,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--big", type=int, default=20_000, help="events of the forked session")
    args = parser.parse_args(argv)
    rows = run(args.backends.split(","), args.seconds, args.big)
    print()
    for row in rows:
        print_row(row)


if __name__ == "__main__":
    main()
