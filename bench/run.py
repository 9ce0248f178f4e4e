"""Benchmark of the Agent Sessions service against the thinnest Flask app, under gunicorn and wrk.

From the repository root::

    .venv/bin/python bench/run.py [--quick] [--backends sqlite,memory,postgresql]
                                  [--compare [--floor]] [--scale] [--scale-events]
                                  [--memory] [--profile] [--metrics]

Needs Debian's ``wrk`` (``apt-get install wrk``); ``--profile`` also needs py-spy
in the venv (``.venv/bin/pip install py-spy``). Without a mode it compares.

``--compare``
    The service, every check on (API key, grant, rate limit with headers, body
    validation, durable write, request id), against ``bench/baseline_app.py``.
    Both run under gunicorn with the project's ``gunicorn.conf.py`` and
    ``-w 2`` (access log included, identically) and are driven in turn with
    ``wrk -t2 -c16`` with the very same requests: create (POST, a unique key
    per request), get (one session), list (first page, limit 10), append
    (``POST .../events/batch`` with one ``agent_output`` event, the id chosen
    by the service, under the key's ``events:append``, to a random one of 64
    sessions: one session's writers take turns by contract), newest 20 (``GET
    .../events?order=desc&limit=20`` of a session of 100 events). Targets:
    create >= 0.70 of the baseline's requests/s, get >= 0.80, list >= 0.70,
    append >= 0.70, newest 20 >= 0.70; p99 <= 2x the baseline's; no answer
    but 2xx. The baseline gives the service's answers (the same statuses and
    bodies: 10 sessions, 20 events, what a create or an append stored) with
    none of its work. The throughput ratio of record is instructions per
    request, counted afterwards by ``bench/instructions.py`` with gunicorn
    included (``--instructions N`` requests an operation, 0 for none): it
    judges the targets, and the wall-clock ratio beside it in the one table
    is indicative (on a shared 2-core machine it swings by half between
    rounds).
    With ``--floor``, a third server takes its turn: the baseline sending the
    six response headers the contract requires on every answer
    (``app_with_api_headers``), whose ratio to the baseline is what those
    headers alone cost.
``--scale``
    The same operations on a store of 1,000,000 sessions over 5 agents
    (bulk-loaded through the storage layer, ``bench/stores.py``) against an
    empty store, in turn; get then reads random sessions of the 200,000 of
    the benchmark agent. Also page 1,000 of a walk (limit 10, its page_key
    found by walking) against the first page. Targets: the loaded store
    costs (1 / requests per second) at most 1.25x the empty one's; the deep
    page at most 1.10x the first (i.e. the same, within noise).
``--scale-events``
    A session of 1,000,000 events (``--events``) in a store of 5,000,000
    (``--store-events``; the rest in four more sessions, loaded a batch of
    each in turn through ``load_events``, SQLite's WAL then checkpointed)
    against a fresh store, each behind its own server, taking turns: append
    (to an empty session there), newest 20 and a page of 10 that starts
    100,000 events in (page_key found by walking; there: the first page of a
    100-event session). Target: the loaded cost at most 1.25x. Then the big
    session is exported as JSON Lines, through ``agent-sessions sessions
    export`` when the CLI has it, else ``bench/export_events.py``
    (``iter_events``, the same reading): its events per second, and its RSS
    sampled from the first line written to the end. Target: growth < 50 MB.
``--memory``
    VmRSS of each worker before and after 200,000 requests (create, get,
    list in turn) on the first backend. Target: < 10% growth.
``--metrics``
    The cost of Prometheus metrics: the service with metrics on (the default)
    against the same service with ``AGENT_SESSIONS_METRICS_ENABLED=false``, on
    the same store, taking turns in the same rounds, driven with creates (the
    write path, every counter on it). Target: on >= 0.95 of off's requests/s.
``--profile``
    py-spy on both workers under load, per operation, on the first backend:
    busy microseconds per request by stage (and each stage's share), for the
    service and the baseline, and the costliest functions of the service.

Numbers are medians of several rounds (``--quick``: 3 rounds of 5 s; default
5 rounds of 10 s). The two servers compared take turns within each round, and
the order flips every round, so background load on the machine falls on both.
Absolute numbers depend on the machine; the ratios are the result.

Rate limits stay on: ``SESSION_CREATE_LIMIT`` and ``DEFAULT_LIMIT`` are set to
100000000/minute, so every request is counted and gets its headers, and none
is refused.

``memory://`` keeps one store per worker, out of the CLI's reach:
``bench/memory_app.py`` seeds each worker's store with the agent, the key and
the session to read, identically. ``--scale`` skips it: the memory backend is
for tests and demos, not for a million sessions per worker process.

PostgreSQL takes part when it answers on 127.0.0.1:5432 (user postgres), in
scratch databases (``bench``, ``bench_loaded``, ...) created anew and dropped
at the end (kept, with the server logs, under ``--keep``).
The servers' turns under wrk are ``bench/wrk_driver.py``'s; the compare mode
and its table, ``bench/compare.py``'s.
Results are also written as JSON to ``bench/results/`` (git-ignored). The exit
status is 0 when every target measured is met, 2 when one is missed, 1 when
the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import instructions
import profiling
import stores
from compare import BASELINE_APP, COMPARE_OPS, OPS, compare, print_table
from harness import BENCH, BIN, Gunicorn, Summary, call, reachable, require_wrk
from wrk_driver import BenchError, Load, Plan, Target, alternate, drive, stats, warm_up

SCALE_TARGET = 1.25
DEEP_PAGE_TARGET = 1.10
RSS_TARGET = 0.10
METRICS_TARGET = 0.95
DEEP_PAGE = 1000
BIG_SESSION = "bench-big"
DEEP_EVENTS = 100_000  # the deep events page starts this far in: page 10,001 of 10
EXPORT_RSS_TARGET_MIB = 50


# Modes


def metrics_cost(backends: list[str], plan: Plan, workdir: Path, settings: dict) -> list[dict]:
    """Creates with metrics on against metrics off: same store, same rounds, in turn."""
    rows = []
    for backend in backends:
        print(f"\nmetrics: {backend}", flush=True)
        store = stores.prepare(backend, workdir, "metrics", settings)
        envs = {
            "metrics-on": {**store.env, "AGENT_SESSIONS_METRICS_ENABLED": "true"},
            "metrics-off": {**store.env, "AGENT_SESSIONS_METRICS_ENABLED": "false"},
        }
        with contextlib.ExitStack() as running:
            targets = {
                name: Target(
                    running.enter_context(Gunicorn(f"{name}-{backend}", store.app, env, workdir)),
                    store.token,
                )
                for name, env in envs.items()
            }
            loads = {name: {"create": Load("create")} for name in targets}
            results = alternate(targets, loads, plan)
        on, off = results["metrics-on"]["create"], results["metrics-off"]["create"]
        ratio = on.rps / off.rps
        rows.append(
            {
                "backend": backend,
                "op": "create",
                "on": stats(on),
                "off": stats(off),
                "ratio": ratio,
                "met": ratio >= METRICS_TARGET and not on.non2xx and not off.non2xx,
            }
        )
    print(f"\nMetrics on vs off ({plan.rounds} rounds of {plan.seconds:g} s, medians)")
    print_table(
        ["backend", "op", "on req/s", "on p99", "off req/s", "off p99", "ratio (target)", "met"],
        [
            [
                r["backend"],
                r["op"],
                f"{r['on']['rps']:,.0f}",
                f"{r['on']['p99_ms']:.2f}",
                f"{r['off']['rps']:,.0f}",
                f"{r['off']['p99_ms']:.2f}",
                f"{r['ratio']:.3f} (>={METRICS_TARGET:.2f})",
                "yes" if r["met"] else "NO",
            ]
            for r in rows
        ],
    )
    return rows


def scale(
    backends: list[str], plan: Plan, workdir: Path, settings: dict, sessions: int, agents: int
) -> list[dict]:
    """A loaded store against an empty one, each behind its own server, taking turns."""
    if sessions // agents <= DEEP_PAGE * 10:
        raise BenchError(f"--scale needs over {DEEP_PAGE * 10:,} sessions per agent")
    rows = []
    for backend in backends:
        if backend == "memory":
            print("\nscale: memory:// skipped (one store per worker, for tests and demos)")
            continue
        print(f"\nscale: {backend}", flush=True)
        empty = stores.prepare(backend, workdir, "empty", settings)
        loaded = stores.prepare(backend, workdir, "loaded", settings)
        seconds = stores.bulk_load(loaded.url, sessions=sessions, agents=agents)
        print(f"  loaded {sessions:,} sessions over {agents} agents in {seconds:.0f} s", flush=True)
        with (
            Gunicorn(f"empty-{backend}", empty.app, empty.env, workdir) as empty_server,
            Gunicorn(f"loaded-{backend}", loaded.app, loaded.env, workdir) as loaded_server,
        ):
            started = time.monotonic()
            page_key = walk(loaded_server.url, loaded.token, DEEP_PAGE - 1)
            walked = time.monotonic() - started
            print(f"  walked to page {DEEP_PAGE:,} in {walked:.1f} s", flush=True)
            targets = {
                "empty": Target(empty_server, empty.token),
                "loaded": Target(loaded_server, loaded.token),
            }
            loads = {
                "empty": {op: Load(op) for op in OPS},
                "loaded": {
                    "create": Load("create"),
                    "get": Load("get", random_keys=sessions // agents),
                    "list": Load("list"),
                    "deep list": Load("list", page_key=page_key),
                },
            }
            results = alternate(targets, loads, plan)
        loaded_results = results["loaded"]
        for op in OPS:
            cost = results["empty"][op].rps / loaded_results[op].rps
            rows.append(scale_row(backend, op, results["empty"][op], loaded_results[op], cost))
        deep = loaded_results["list"].rps / loaded_results["deep list"].rps
        rows.append(scale_row(backend, "deep list", None, loaded_results["deep list"], deep))
    if rows:
        print_scale(rows, plan, sessions)
    return rows


def print_scale(rows: list[dict], plan: Plan, sessions: int) -> None:
    print(
        f"\nScale: {sessions:,} sessions vs an empty store "
        f"({plan.rounds} rounds of {plan.seconds:g} s, medians). cost x = empty req/s "
        f"over loaded req/s; for the deep list, first page req/s over page {DEEP_PAGE:,}'s"
    )
    print_scale_table(rows, plan)


def print_scale_table(rows: list[dict], plan: Plan) -> None:
    print_table(
        [
            "backend",
            "op",
            "empty req/s",
            "empty p99",
            "loaded req/s",
            "loaded p50",
            "loaded p99",
            "non-2xx",
            "cost x (target)",
            "met",
        ],
        [
            [
                r["backend"],
                r["op"],
                f"{r['empty']['rps']:,.0f}" if r["empty"] else "-",
                f"{r['empty']['p99_ms']:.2f}" if r["empty"] else "-",
                f"{r['loaded']['rps']:,.0f}",
                f"{r['loaded']['p50_ms']:.2f}",
                f"{r['loaded']['p99_ms']:.2f}",
                str(r["loaded"]["non2xx"] + (r["empty"] or {}).get("non2xx", 0)),
                f"{r['cost']:.2f} (<={r['target']:.2f})",
                "yes" if r["met"] else "NO",
                *([f"{r['floor_ratio']:.2f}"] if plan.floor else []),
            ]
            for r in rows
        ],
    )


def scale_row(backend: str, op: str, empty: Summary | None, loaded: Summary, cost: float) -> dict:
    target = DEEP_PAGE_TARGET if empty is None else SCALE_TARGET
    non2xx = loaded.non2xx + (empty.non2xx if empty else 0)
    return {
        "backend": backend,
        "op": op,
        "empty": stats(empty) if empty else None,
        "loaded": stats(loaded),
        "cost": cost,
        "target": target,
        "met": cost <= target and not non2xx,
    }


def scale_events(
    backends: list[str],
    plan: Plan,
    workdir: Path,
    settings: dict,
    events: int,
    store_events: int,
    export_too: bool,
) -> tuple[list[dict], list[dict]]:
    """A session of ``events`` events in a store of ``store_events`` against a near-empty one.

    The reference is a fresh store: appends go to an empty session, the
    newest-20 and the page read a session of 100 events (so every page is
    full). In the loaded store all three go to the big session, the page
    being the one ``DEEP_EVENTS`` events in (page_key found by walking).
    """
    if events <= DEEP_EVENTS + 10:
        raise BenchError(f"--scale-events needs over {DEEP_EVENTS + 10:,} events")
    rows: list[dict] = []
    exports: list[dict] = []
    for backend in backends:
        if backend == "memory":
            print("\nscale-events: memory:// skipped (one store per worker)")
            continue
        print(f"\nscale-events: {backend}", flush=True)
        empty = stores.prepare(backend, workdir, "evempty", settings)
        loaded = stores.prepare(backend, workdir, "evloaded", settings)
        seconds = stores.bulk_load_history(
            loaded.url, session_key=BIG_SESSION, events=events, store_events=store_events
        )
        print(
            f"  loaded {events:,} events in one session, {store_events:,} in the store, "
            f"in {seconds:.0f} s",
            flush=True,
        )
        with (
            Gunicorn(f"evempty-{backend}", empty.app, empty.env, workdir) as empty_server,
            Gunicorn(f"evloaded-{backend}", loaded.app, loaded.env, workdir) as loaded_server,
        ):
            started = time.monotonic()
            page_key = walk_events(loaded_server.url, loaded.token, BIG_SESSION, DEEP_EVENTS)
            print(f"  walked {DEEP_EVENTS:,} events in {time.monotonic() - started:.1f} s")
            targets = {
                "empty": Target(empty_server, empty.token),
                "loaded": Target(loaded_server, loaded.token),
            }
            loads = {
                "empty": {
                    "append": Load("append"),
                    "newest 20": Load("newest 20"),
                    "deep page": Load("events page"),
                },
                "loaded": {
                    "append": Load("append", session=BIG_SESSION),
                    "newest 20": Load("newest 20", session=BIG_SESSION),
                    "deep page": Load("events page", session=BIG_SESSION, page_key=page_key),
                },
            }
            results = alternate(targets, loads, plan)
        for op in loads["empty"]:
            empty_run, loaded_run = results["empty"][op], results["loaded"][op]
            rows.append(
                scale_row(backend, op, empty_run, loaded_run, empty_run.rps / loaded_run.rps)
            )
        if export_too:
            exports.append(export(backend, loaded, BIG_SESSION, events, workdir))
    if rows:
        print(
            f"\nScale of a history: {events:,} events in one session ({store_events:,} in the "
            f"store) vs a fresh store ({plan.rounds} rounds of {plan.seconds:g} s, medians). "
            f"cost x = empty req/s over loaded req/s; deep page: {DEEP_EVENTS:,} events in, "
            "against the first page of a 100-event session"
        )
        print_scale_table(rows, plan)
    if exports:
        print_exports(exports)
    return rows, exports


def walk_events(url: str, token: str, session_key: str, events: int) -> str:
    """The page_key after the first ``events`` events of a session (pages of 100)."""
    page_key = None
    base = f"{url}/v2/agents/{stores.AGENT}/sessions/{session_key}/events?limit=100"
    for number in range(1, events // 100 + 1):
        status, body = call("GET", base + (f"&page_key={page_key}" if page_key else ""), token)
        if status != 200 or body["metadata"].get("page_key") is None:
            raise BenchError(f"walk: events page {number} answered {status} {str(body)[:300]}")
        page_key = body["metadata"]["page_key"]
    return page_key


def export_command(store: stores.Store, session_key: str) -> tuple[list[str], str]:
    """The operator CLI's export when this tree has it, else bench/export_events.py."""
    cli = [str(BIN / "agent-sessions"), "sessions", "export"]
    env = {**os.environ, **store.env}
    probe = subprocess.run([*cli, "--help"], env=env, capture_output=True, timeout=60)
    if probe.returncode == 0:
        return [*cli, stores.AGENT, session_key], "agent-sessions sessions export"
    script = [sys.executable, str(BENCH / "export_events.py"), store.url]
    return [*script, stores.AGENT, session_key], "bench/export_events.py (iter_events)"


def export(backend: str, store: stores.Store, session_key: str, events: int, workdir: Path) -> dict:
    """Export a session as JSON Lines: RSS (sampled) from its first line to its end; its rate."""
    command, how = export_command(store, session_key)
    print(f"\nexport: {backend}, {events:,} events through {how}", flush=True)
    proc = subprocess.Popen(
        command,
        cwd=BENCH.parent,
        env={**os.environ, **store.env},
        stdout=subprocess.PIPE,
        stderr=open(workdir / f"export-{backend}.err", "wb"),  # noqa: SIM115 - the child's
    )
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError, ValueError, IndexError):  # gone, or a zombie
                status = Path(f"/proc/{proc.pid}/status").read_text()
                samples.append(int(status.split("VmRSS:")[1].split()[0]))
            time.sleep(0.02)

    assert proc.stdout is not None
    first = proc.stdout.readline()
    started, at_first = time.monotonic(), len(samples)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines, last = (1 if first else 0), first
    for last in proc.stdout:  # noqa: B007 - the end line is wanted
        lines += 1
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    code = proc.wait(timeout=60)
    if code != 0 or not samples:
        raise BenchError(f"export exited {code}: {(workdir / f'export-{backend}.err').read_text()}")
    baseline = samples[at_first] if at_first < len(samples) else samples[0]
    growth_mib = (max(samples) - baseline) / 1024
    # Both end with {"end": {"events": n}}; the CLI's export starts with the session's line.
    exported = lines - 2 if how.startswith("agent-sessions") else lines - 1
    try:
        told = json.loads(last)["end"]["events"]
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"export: no end line, last line {last[:200]!r}") from None
    return {
        "backend": backend,
        "how": how,
        "events": exported,
        "seconds": seconds,
        "rate": exported / seconds,
        "rss_start_mib": baseline / 1024,
        "rss_peak_mib": max(samples) / 1024,
        "growth_mib": growth_mib,
        # The session holds the loaded events and what the benchmark appended.
        "met": growth_mib < EXPORT_RSS_TARGET_MIB and exported == told >= events,
    }


def print_exports(rows: list[dict]) -> None:
    print("\nExport of a session (RSS from the first line written to the end, sampled every 20 ms)")
    print_table(
        [
            "backend",
            "through",
            "events",
            "events/s",
            "RSS start MiB",
            "peak MiB",
            f"growth MiB (< {EXPORT_RSS_TARGET_MIB})",
            "met",
        ],
        [
            [
                r["backend"],
                r["how"],
                f"{r['events']:,}",
                f"{r['rate']:,.0f}",
                f"{r['rss_start_mib']:.1f}",
                f"{r['rss_peak_mib']:.1f}",
                f"{r['growth_mib']:.1f}",
                "yes" if r["met"] else "NO",
            ]
            for r in rows
        ],
    )


def walk(url: str, token: str, pages: int) -> str:
    """Follow page_key through ``pages`` pages of 10; the page_key of the page after them."""
    page_key = None
    for number in range(1, pages + 1):
        query = "limit=10" + (f"&page_key={page_key}" if page_key else "")
        status, body = call("GET", f"{url}/v2/agents/{stores.AGENT}/sessions?{query}", token)
        if status != 200 or body["metadata"].get("page_key") is None:
            raise BenchError(f"walk: page {number} answered {status} {str(body)[:300]}")
        page_key = body["metadata"]["page_key"]
    return page_key


def memory(backend: str, plan: Plan, workdir: Path, settings: dict, requests: int) -> dict:
    """Worker RSS after a warm-up, then after ``requests`` more requests."""
    print(f"\nmemory: {backend}, {requests:,} requests", flush=True)
    if backend == "memory":
        print("  note: on memory:// the created sessions live in the workers, so RSS grows")
    store = stores.prepare(backend, workdir, "rss", settings)
    with Gunicorn(f"rss-{backend}", store.app, store.env, workdir) as server:
        target = Target(server, store.token)
        for op in OPS:
            warm_up("service", target, Load(op), plan.warmup)
        before = server.rss_kib()
        served = non2xx = reported = 0
        for op in itertools.cycle(OPS):
            if served >= requests:
                break
            result = drive(target, Load(op), 10)
            served += result.requests
            non2xx += result.non2xx + result.socket_errors
            if served >= reported + requests / 10:
                reported = served
                print(f"  {served:,} requests, RSS {server.rss_kib()} KiB", flush=True)
        after = server.rss_kib()
    growth = {pid: after[pid] / before[pid] - 1 for pid in before}
    met = max(growth.values()) < RSS_TARGET and not non2xx
    print(f"\nWorker RSS over {served:,} requests on {backend} (non-2xx: {non2xx})")
    print_table(
        ["worker", "before MiB", "after MiB", "growth (target < 10%)", "met"],
        [
            [
                str(pid),
                f"{before[pid] / 1024:.1f}",
                f"{after[pid] / 1024:.1f}",
                f"{growth[pid]:+.1%}",
                "yes" if growth[pid] < RSS_TARGET else "NO",
            ]
            for pid in before
        ],
    )
    return {
        "backend": backend,
        "requests": served,
        "before_kib": before,
        "after_kib": after,
        "non2xx": non2xx,
        "met": met,
    }


def profile(backend: str, plan: Plan, workdir: Path, settings: dict) -> dict:
    """Per operation, where the service's and the baseline's time goes."""
    print(f"\nprofile: {backend}, {plan.profile_seconds:g} s per op and server", flush=True)
    store = stores.prepare(backend, workdir, "profile", settings)
    report: dict[str, Any] = {}
    service = Gunicorn(f"profile-{backend}", store.app, store.env, workdir)
    baseline = Gunicorn(f"profile-baseline-{backend}", BASELINE_APP, store.env, workdir)
    with service, baseline:
        for op in COMPARE_OPS:
            report[op] = {}
            for name, target in (
                ("service", Target(service, store.token)),
                ("baseline", Target(baseline, store.token)),
            ):
                warm_up(name, target, Load(op), plan.warmup)
                report[op][name] = profile_one(target, op, plan.profile_seconds, workdir)
            print_profile(op, report[op])
    return report


def request_path_us(stages: dict[str, float]) -> float:
    return sum(us for name, us in stages.items() if name != profiling.OTHER_THREADS)


def profile_one(target: Target, op: str, seconds: float, workdir: Path) -> dict:
    """Sample both workers for ``seconds`` while wrk drives them; µs per request by stage."""
    server = target.server
    recorders: list = []

    def attach() -> None:
        time.sleep(1)  # let wrk connect first
        pids = server.worker_pids()
        recorders.extend(profiling.start(pids, seconds, workdir, f"{server.name}-{op}"))

    result = drive(target, Load(op), seconds + 2, during=attach)
    stages, functions = profiling.per_request_us(profiling.finish(recorders), result.rps * seconds)
    return {"rps": result.rps, "stages": stages, "functions": functions}


def print_profile(op: str, report: dict) -> None:
    ours, base = report["service"], report["baseline"]
    total, base_total = request_path_us(ours["stages"]), request_path_us(base["stages"])
    print(
        f"\n{op}: service {total:,.0f} µs busy per request at {ours['rps']:,.0f} req/s; "
        f"baseline {base_total:,.0f} µs at {base['rps']:,.0f} req/s"
    )
    names = list(ours["stages"]) + [n for n in base["stages"] if n not in ours["stages"]]
    rows = []
    for name in names:
        us = ours["stages"].get(name, 0)
        share = "" if name == profiling.OTHER_THREADS else f"{us / total:.1%}"
        rows.append([name, f"{us:.0f}", share, f"{base['stages'].get(name, 0):.0f}"])
    print_table(["stage", "service µs", "share", "baseline µs"], rows, left=1)
    # Frames under the WSGI call but not the ones every sample passes through.
    top = [(frame, us) for frame, us in ours["functions"].items() if us < 0.6 * total][:15]
    print_table(
        ["function (service, inclusive)", "µs"], [[f, f"{us:.0f}"] for f, us in top], left=1
    )


# Output


def save(results: dict) -> Path:
    directory = BENCH / "results"
    directory.mkdir(exist_ok=True)
    path = directory / f"{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    return path


# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the service against the thinnest Flask app (see the docstring)."
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5 s")
    parser.add_argument(
        "--backends",
        default=",".join(stores.BACKENDS),
        help="comma-separated; postgresql only when it answers (default: %(default)s)",
    )
    parser.add_argument("--compare", action="store_true", help="service vs baseline (default)")
    parser.add_argument("--scale", action="store_true", help="1M sessions vs an empty store")
    parser.add_argument(
        "--scale-events", action="store_true", help="a 1M-event session vs an empty one, and export"
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="for --scale-events")
    parser.add_argument(
        "--store-events", type=int, default=5_000_000, help="for --scale-events: in the store"
    )
    parser.add_argument("--memory", action="store_true", help="worker RSS over many requests")
    parser.add_argument("--profile", action="store_true", help="py-spy: where time goes")
    parser.add_argument("--metrics", action="store_true", help="creates, metrics on vs off")
    parser.add_argument(
        "--floor", action="store_true", help="compare: also the baseline with the API's headers"
    )
    parser.add_argument(
        "--instructions",
        type=int,
        default=instructions.REQUESTS,
        help="compare: requests an op counted under callgrind (0: wall-clock only)",
    )
    parser.add_argument("--rounds", type=int, help="rounds per measurement")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run")
    parser.add_argument("--sessions", type=int, default=1_000_000, help="for --scale")
    parser.add_argument("--agents", type=int, default=5, help="for --scale")
    parser.add_argument("--requests", type=int, default=200_000, help="for --memory")
    parser.add_argument("--ratelimit-storage", help="RATELIMIT_STORAGE_URI (default memory://)")
    parser.add_argument("--sqlite-synchronous", help="SQLITE_SYNCHRONOUS (default NORMAL)")
    parser.add_argument("--keep", action="store_true", help="keep the server logs and stores")
    args = parser.parse_args(argv)
    if not (args.scale or args.scale_events or args.memory or args.profile or args.metrics):
        args.compare = True
    return args


def selected_backends(spec: str) -> list[str]:
    backends = [b.strip() for b in spec.split(",") if b.strip()]
    unknown = set(backends) - set(stores.BACKENDS)
    if unknown:
        raise SystemExit(f"bench: unknown backends {sorted(unknown)}; use {stores.BACKENDS}")
    if "postgresql" in backends and not reachable(stores.PG_HOST, stores.PG_PORT):
        print(f"postgresql skipped: nothing answers on {stores.PG_HOST}:{stores.PG_PORT}")
        backends.remove("postgresql")
    if not backends:
        raise SystemExit("bench: no backend to run")
    return backends


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if "--noisy" in given:  # the noisy-neighbour mode: bench/noisy.py, its own options
        import noisy

        noisy.main([arg for arg in given if arg != "--noisy"])
        return 0
    args = parse_args(argv)
    require_wrk()
    if args.compare and args.instructions and shutil.which("callgrind_control") is None:
        sys.exit("bench: valgrind is not installed (apt-get install valgrind); or --instructions 0")
    backends = selected_backends(args.backends)
    plan = Plan(rounds=3, seconds=5, warmup=1, profile_seconds=6)
    if not args.quick:
        plan = Plan(rounds=5, seconds=10, warmup=2, profile_seconds=15)
    plan.rounds = args.rounds or plan.rounds
    plan.seconds = args.seconds or plan.seconds
    plan.floor = args.floor
    plan.instructions = args.instructions
    settings = {}
    if args.ratelimit_storage:
        settings["AGENT_SESSIONS_RATELIMIT_STORAGE_URI"] = args.ratelimit_storage
    if args.sqlite_synchronous:
        settings["AGENT_SESSIONS_SQLITE_SYNCHRONOUS"] = args.sqlite_synchronous
    workdir = Path(tempfile.mkdtemp(prefix="agent-sessions-bench-"))
    results: dict[str, Any] = {"plan": dataclasses.asdict(plan), "settings": settings}
    print(f"backends: {', '.join(backends)}; work files in {workdir}", flush=True)
    try:
        if args.compare:
            results["compare"] = compare(backends, plan, workdir, settings)
        if args.scale:
            results["scale"] = scale(backends, plan, workdir, settings, args.sessions, args.agents)
        if args.scale_events:
            results["scale_events"], results["export"] = scale_events(
                backends, plan, workdir, settings, args.events, args.store_events, True
            )
        if args.memory:
            results["memory"] = memory(backends[0], plan, workdir, settings, args.requests)
        if args.profile:
            results["profile"] = profile(backends[0], plan, workdir, settings)
        if args.metrics:
            results["metrics"] = metrics_cost(backends, plan, workdir, settings)
    except (BenchError, instructions.Failed) as err:
        print(f"bench: {err}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            stores.drop_pg_databases()
    print(f"\nresults written to {save(results).relative_to(BENCH.parent)}")
    modes = ("compare", "scale", "scale_events", "export", "metrics")
    checks = [r["met"] for mode in modes for r in results.get(mode, [])]
    checks += [results["memory"]["met"]] if "memory" in results else []
    return 0 if all(checks) else 2


if __name__ == "__main__":
    sys.exit(main())
