"""The wrk driver of ``bench/run.py``: servers taking turns under ``wrk``, round by round.

A :class:`Target` is a running gunicorn and the key its store accepts; a
:class:`Load` is one kind of request. :func:`alternate` runs every target's
loads in rounds, the order flipping each round, so that background load on the
machine falls on both sides of a comparison.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
from typing import Any

import instructions
import stores
from harness import Gunicorn, Summary, WrkResult, wrk


class BenchError(RuntimeError):
    pass


@dataclasses.dataclass
class Plan:
    rounds: int
    seconds: float
    warmup: float
    profile_seconds: float
    floor: bool = False  # --compare also measures the baseline with the API's headers
    instructions: int = instructions.REQUESTS  # --compare: counted per op under callgrind; 0: none


@dataclasses.dataclass
class Target:
    """A running server and the API key its store accepts."""

    server: Gunicorn
    token: str


@dataclasses.dataclass
class Load:
    """One kind of request for wrk: an operation and what it needs."""

    op: str
    random_keys: int = 0  # get: random bulk sessions among this many; append: bench-append-N
    page_key: str | None = None  # list, events page: start here instead of the first page
    session: str | None = None  # events: the session (default: the store's seeded ones)


_create_runs = itertools.count()
_run_tag = secrets.token_hex(2)


def drive(target: Target, load: Load, seconds: float, during: Any = None) -> WrkResult:
    base = f"{target.server.url}/v2/agents/{stores.AGENT}/sessions"
    token = target.token
    if load.op == "create":
        tag = f"{_run_tag}r{next(_create_runs)}"
        return wrk(base, "create", [token, tag], seconds, during)
    if load.op == "get" and load.random_keys:
        args = [token, stores.BULK_KEY_PREFIX, str(load.random_keys)]
        return wrk(base + "/", "get", args, seconds, during)
    if load.op == "get":
        return wrk(f"{base}/{stores.GET_KEY}", "get", [token], seconds, during)
    if load.op == "append" and load.session is None and load.random_keys:
        args = [token, f"{stores.APPEND_KEY}-", str(load.random_keys)]
        return wrk(base + "/", "append", args, seconds, during)
    if load.op == "append":
        return wrk(
            f"{base}/{load.session or stores.APPEND_KEY}/events/batch",
            "append",
            [token],
            seconds,
            during,
        )
    if load.op == "newest 20":
        url = f"{base}/{load.session or stores.HISTORY_KEY}/events?order=desc&limit=20"
        return wrk(url, "list", [token], seconds, during)
    query = "limit=10" + (f"&page_key={load.page_key}" if load.page_key else "")
    if load.op == "events page":
        url = f"{base}/{load.session or stores.HISTORY_KEY}/events?{query}"
        return wrk(url, "list", [token], seconds, during)
    return wrk(f"{base}?{query}", "list", [token], seconds, during)


def warm_up(name: str, target: Target, load: Load, seconds: float) -> None:
    """A short run that also proves the requests succeed before anything is measured."""
    result = drive(target, load, seconds)
    if result.non2xx or result.socket_errors or not result.requests:
        raise BenchError(
            f"{name} {load.op}: warm-up got statuses {result.statuses} and "
            f"{result.socket_errors} socket errors\n{target.server.log_tail()}"
        )


def alternate(
    targets: dict[str, Target], loads: dict[str, dict[str, Load]], plan: Plan
) -> dict[str, dict[str, Summary]]:
    """Rounds in which every target runs every one of its loads, taking turns."""
    for name, target in targets.items():
        for load in loads[name].values():
            warm_up(name, target, load, plan.warmup)
    names = list(targets)
    ops = list(dict.fromkeys(op for name in names for op in loads[name]))
    runs: dict[str, dict[str, list[WrkResult]]] = {name: {} for name in names}
    for number in range(plan.rounds):
        order = names if number % 2 == 0 else names[::-1]
        line = []
        for op in ops:
            for name in order:
                if op in loads[name]:
                    result = drive(targets[name], loads[name][op], plan.seconds)
                    runs[name].setdefault(op, []).append(result)
                    line.append(f"{name} {op} {result.rps:,.0f}/s")
        print(f"  round {number + 1}/{plan.rounds}: " + ", ".join(line), flush=True)
    return {name: {op: Summary(r) for op, r in by_op.items()} for name, by_op in runs.items()}


def stats(summary: Summary) -> dict:
    return {
        "rps": summary.rps,
        "p50_ms": summary.p50_ms,
        "p99_ms": summary.p99_ms,
        "non2xx": summary.non2xx,
        "statuses": summary.statuses,
        "runs": [dataclasses.asdict(r) for r in summary.runs],
    }
