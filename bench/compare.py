"""The compare mode of ``bench/run.py``: the service against the baseline, in one table.

The instructions per request that ``bench/instructions.py`` counts under gunicorn
are the ratios of record; the wall-clock run beside them is indicative.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import instructions
import stores
from harness import Gunicorn
from instructions import table as print_table
from wrk_driver import Load, Plan, Target, alternate, stats

BASELINE_APP = "bench.baseline_app:app"
FLOOR_APP = "bench.baseline_app:app_with_api_headers"
OPS = ("create", "get", "list")
# Events: append one agent_output event (POST .../events/batch, an events:append
# key), and list the newest 20 (GET .../events?order=desc&limit=20).
EVENT_OPS = ("append", "newest 20")
COMPARE_OPS = OPS + EVENT_OPS
THROUGHPUT_TARGETS = {"create": 0.70, "get": 0.80, "list": 0.70, "append": 0.70, "newest 20": 0.70}
P99_TARGET = 2.0


def compare(backends: list[str], plan: Plan, workdir: Path, settings: dict) -> list[dict]:
    """The service against the baseline, which gets the same requests and ignores the key."""
    rows = []
    for backend in backends:
        print(f"\ncompare: {backend}", flush=True)
        store = stores.prepare(backend, workdir, "compare", settings)
        apps = {"service": store.app, "baseline": BASELINE_APP}
        if plan.floor:
            apps["floor"] = FLOOR_APP
        with contextlib.ExitStack() as running:
            targets = {
                name: Target(
                    running.enter_context(Gunicorn(f"{name}-{backend}", app, store.env, workdir)),
                    store.token,
                )
                for name, app in apps.items()
            }
            loads = {name: {op: compare_load(op) for op in COMPARE_OPS} for name in targets}
            results = alternate(targets, loads, plan)
        for op in COMPARE_OPS:
            ours, base = results["service"][op], results["baseline"][op]
            row = {
                "backend": backend,
                "op": op,
                "service": stats(ours),
                "baseline": stats(base),
                "ratio": ours.rps / base.rps,
                "p99_ratio": ours.p99_ms / base.p99_ms,
            }
            if plan.floor:
                row["floor"] = stats(results["floor"][op])
                row["floor_ratio"] = results["floor"][op].rps / base.rps
            rows.append(row)
    counted = {}
    if plan.instructions:
        print(
            f"\ninstructions: {plan.instructions} requests an operation under callgrind", flush=True
        )
        for r in instructions.ratios(backends, list(COMPARE_OPS), plan.instructions, settings):
            counted[r["backend"], r["op"]] = r
    for row in rows:
        row["instructions"] = counted.get((row["backend"], row["op"]))
        # The ratio of record is the instructions'; without them, the wall-clock one.
        ratio = row["instructions"]["ratio"] if row["instructions"] else row["ratio"]
        row["met"] = (
            ratio >= THROUGHPUT_TARGETS[row["op"]]
            and row["p99_ratio"] <= P99_TARGET
            and not row["service"]["non2xx"]
        )
    print_compare(rows, plan)
    return rows


def compare_load(op: str) -> Load:
    """Appends spread over many sessions; the other operations as they are."""
    return Load(op, random_keys=stores.APPEND_SESSIONS) if op == "append" else Load(op)


def print_compare(rows: list[dict], plan: Plan) -> None:
    """One table: the instructions ratio of record, and the wall-clock run, indicative."""
    print(
        f"\nService vs baseline. Of record: instructions per request under gunicorn "
        f"(callgrind, {plan.instructions} requests an op; bench/instructions.py). Indicative: "
        f"wall-clock, {plan.rounds} rounds of {plan.seconds:g} s, medians (load moves it)."
    )
    if plan.floor:
        print("floor: the baseline sending the API's response headers, as a ratio to the baseline")

    def counted(r: dict, key: str, fmt: str) -> str:
        return format(r["instructions"][key], fmt) if r["instructions"] else "-"

    print_table(
        [
            "backend",
            "op",
            "instr",
            "base instr",
            "instr ratio (target)",
            "db µs",
            "req/s",
            "base req/s",
            "wall ratio",
            "p50 ms",
            "p99 ms",
            "p99 x (<=2)",
            "non-2xx",
            "met",
            *(["floor"] if plan.floor else []),
        ],
        [
            [
                r["backend"],
                r["op"],
                counted(r, "service", ",.0f"),
                counted(r, "baseline", ",.0f"),
                f"{counted(r, 'ratio', '.3f')} (>={THROUGHPUT_TARGETS[r['op']]:.2f})",
                f"{r['instructions']['database_us']:,.0f}"
                if r["instructions"] and r["instructions"]["database_us"] is not None
                else "",
                f"{r['service']['rps']:,.0f}",
                f"{r['baseline']['rps']:,.0f}",
                f"{r['ratio']:.2f}",
                f"{r['service']['p50_ms']:.2f}",
                f"{r['service']['p99_ms']:.2f}",
                f"{r['p99_ratio']:.2f}",
                str(r["service"]["non2xx"]),
                "yes" if r["met"] else "NO",
                *([f"{r['floor_ratio']:.2f}"] if plan.floor else []),
            ]
            for r in rows
        ],
    )
