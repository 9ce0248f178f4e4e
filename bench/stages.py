"""Where a request's instructions go, by stage: the table to cut each stage from.

From the repository root::

    .venv/bin/python bench/stages.py [--backends sqlite,memory] [--requests 20]
                                     [--ops create,get,list,append,"newest 20"]

Each operation of ``bench/instructions.py`` is sent in-process to the service
(as ``bench/instructions.py --in-process`` does: no gunicorn, the host
counters file and multiprocess metrics as under gunicorn), in a Python under
``valgrind --tool=callgrind --collect-atstart=no``. A profile hook
(``bench/stagehook.c``, built here with the system C compiler against
Python's and valgrind's headers) gives every Python frame and every C call a
stage by the rules below, and switches callgrind's collection on only while
the innermost stage is the one being measured; so one pass of ``--requests``
requests counts one stage's instructions, inclusive of everything it calls
that has no stage of its own, and the passes together count every
instruction once. A last pass without the hook counts the request as it
really runs.

The hook costs instructions of its own (it runs on every call and return,
and a profiled interpreter skips its specialised instructions). That extra
cost, the hooked passes' sum less the unhooked count, is taken back out of
each stage in proportion to the hook's calls in it, so the stages add up to
the unhooked count; it is printed (``hook overhead``), and the smaller it is
against the total the closer each stage is to its own cost.

The rules (``RULES``, first match wins), over a frame's file path and
qualified name, or a C function's owner:

=================================  =======================================================
stage                              what runs in it
=================================  =======================================================
Flask/Werkzeug dispatch and        flask/ and werkzeug/ entered from outside the
decorators                         service's code, and the service's endpoint decorator
request id and contract headers    the request id, the corridor's start-of-request check,
                                   the contract headers, the X-RateLimit-* headers
authentication, grant, limiter     auth, the key cache, rate_limits (its decorators and
                                   decisions), flask_limiter/, limits/ but its storage
rate-limit counter                 limits/storage/, host_counters, rate_limits' storages
body read and JSON parse           the service's body reading and JSON parsing (http.py)
Marshmallow load                   a schema's load / loads / validate (Marshmallow's or
                                   the service's own) and all beneath
storage: SQL                       sqlite3 / pysqlite3 / psycopg / sqlite_utils, Python or
                                   C, called from storage
storage: JSON of columns           codec.load_json, orjson and the standard library's
                                   json, called from storage
storage: timestamps                codec's time functions and datetime's C methods,
                                   called from storage
storage: Python around             the rest of storage_backends/
dump / JSON out / response glue    a schema's dump / dumps, json_response and the other
                                   response builders, page keys, ETags
metrics                            sessions_app's metrics and metric files,
                                   prometheus_client/
other service code                 the rest of sessions_app/ (views' own bodies,
                                   idempotency, errors; the schemas' other code runs in
                                   its caller's stage)
outside the app                    this benchmark's own loop
=================================  =======================================================

A frame no rule names (logging, re, the standard library's json outside
storage; Werkzeug called from a stage) runs in the stage of its caller. Paths are matched by
module name wherever a module sits (``sessions_app/auth.py`` or
``sessions_app/corridor/auth.py``).

Needs Debian's ``valgrind`` and a C compiler.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import instructions  # noqa: E402

OUTSIDE = "outside the app"
DISPATCH = "Flask/Werkzeug dispatch and decorators"
REQUEST_ID = "request id and contract headers"
AUTH = "authentication, grant, limiter code"
COUNTER = "rate-limit counter"
BODY = "body read and JSON parse"
LOAD = "Marshmallow load"
SQL = "storage: SQL"
COLUMN_JSON = "storage: JSON of columns"
TIMESTAMPS = "storage: timestamps"
STORAGE = "storage: Python around"
DUMP = "dump / JSON out / response glue"
METRICS = "metrics"
OTHER = "other service code"
STAGES = [
    OUTSIDE,
    DISPATCH,
    REQUEST_ID,
    AUTH,
    COUNTER,
    BODY,
    LOAD,
    SQL,
    COLUMN_JSON,
    TIMESTAMPS,
    STORAGE,
    DUMP,
    METRICS,
    OTHER,
]
IN_STORAGE = {SQL, COLUMN_JSON, TIMESTAMPS, STORAGE}

APP = r"/sessions_app/(?:\w+/)*"
# The service's schemas (sessions_app/schemas.py or schemas/, the event schemas of
# sessions_app/events.py), and their base.
SCHEMAS = r"/marshmallow/|/sessions_app/(schemas\b|events\.py$)"
# (path pattern, qualified-name pattern, rule), first match wins. A rule is a
# stage (the frame runs in it whatever its caller), None (its caller's), or
# (callers, stage): that stage when called from one of those stages, else the caller's.
RULES: list[tuple[str, str, str | tuple[set[str], str] | None]] = [
    ("^" + re.escape(f"{BENCH}/"), r"", OUTSIDE),
    (
        APP + r"http\.py$",
        r"^(request_id|start_request|_encoded_slash|is_service_request|contract_headers)$",
        REQUEST_ID,
    ),  # noqa: E501
    (APP + r"rate_limits\.py$", r"^headers$", REQUEST_ID),
    (
        APP + r"http\.py$",
        r"^(read_body|json_object|parse|_no_duplicates|_bounded_int|_finite_float|_check_strings|_reject_constant|_unsupported)$",
        BODY,
    ),  # noqa: E501
    (
        APP + r"http\.py$",
        r"^(json_response|json_data_response|not_modified|no_content|_?(en|de)code\w*cursor|_cursor_tag|_unpack|_position)$",
        DUMP,
    ),  # noqa: E501
    (APP + r"etags\.py$", r"^(representation|tag)$", DUMP),
    (APP + r"api\.py$", r"^endpoint\.", DISPATCH),
    (SCHEMAS, r"(^|\.)(load|loads|validate)$", LOAD),
    (SCHEMAS, r"(^|\.)(dump|dumps)$", DUMP),
    (SCHEMAS, r"", None),
    (APP + r"(auth|keycache)\.py$", r"", AUTH),
    (
        APP + r"rate_limits\.py$",
        r"\.(incr_with_reset|incr|get|get_expiry|keys|clear|reset|check)$|Storage",
        COUNTER,
    ),  # noqa: E501
    (APP + r"rate_limits\.py$", r"", AUTH),
    (APP + r"host_counters\.py$", r"", COUNTER),
    (APP + r"(metrics|metric_files)\.py$", r"", METRICS),
    (r"/prometheus_client/", r"", METRICS),
    (r"/limits/storage/", r"", COUNTER),
    (r"/(flask_limiter|limits)/", r"", AUTH),
    (r"/python3\.\d+/json/", r"", (IN_STORAGE, COLUMN_JSON)),
    (r"/storage_backends/codec\.py$", r"^(format_ts|parse_ts|utcnow)$", (IN_STORAGE, TIMESTAMPS)),
    (r"/storage_backends/codec\.py$", r"^load_json$", (IN_STORAGE, COLUMN_JSON)),
    (r"/storage_backends/", r"", STORAGE),
    (r"/(sqlite_utils|psycopg|psycopg_pool|sqlite3|pysqlite3)/", r"", (IN_STORAGE, SQL)),
    (r"/(flask|werkzeug)/", r"", ({OUTSIDE}, DISPATCH)),
    (APP, r"", OTHER),
]
# C functions, by the module of the object they are methods of (or their own module).
C_RULES: list[tuple[str, str | tuple[set[str], str] | None]] = [
    (r"^(_?sqlite3|pysqlite3\.\w+|psycopg\w*)$", (IN_STORAGE, SQL)),
    (r"^(datetime)$", (IN_STORAGE, TIMESTAMPS)),
    (r"^orjson$", (IN_STORAGE, COLUMN_JSON)),
]


def maps() -> tuple[list[list[int]], list[int], list[int]]:
    """(maps, the map of each RULES row, of each C_RULES row): map 0 is "the caller's"."""
    index = {name: n for n, name in enumerate(STAGES)}
    table: list[list[int]] = [list(range(len(STAGES)))]

    def map_of(rule) -> int:
        if rule is None:
            return 0
        if isinstance(rule, str):
            row = [index[rule]] * len(STAGES)
        else:
            callers, stage = rule
            row = [index[stage] if name in callers else n for n, name in enumerate(STAGES)]
        table.append(row)
        return len(table) - 1

    rows = [map_of(rule) for _, _, rule in RULES]
    c_rows = [map_of(rule) for _, rule in C_RULES]
    return table, rows, c_rows


def classifiers(rows: list[int], c_rows: list[int]):
    compiled = [(re.compile(p), re.compile(q)) for p, q, _ in RULES]
    c_compiled = [re.compile(p) for p, _ in C_RULES]

    def classify_code(code) -> int:
        path = code.co_filename.replace(os.sep, "/")
        for (path_re, name_re), row in zip(compiled, rows, strict=True):
            if path_re.search(path) and name_re.search(code.co_qualname):
                return row
        return 0

    def classify_c(function) -> int:
        owner = getattr(function, "__self__", None)
        module = getattr(type(owner), "__module__", "") if owner is not None else ""
        if not module or module == "builtins":
            module = getattr(owner, "__name__", "") or getattr(function, "__module__", "") or ""
        for pattern, row in zip(c_compiled, c_rows, strict=True):
            if pattern.search(module):
                return row
        return 0

    return classify_code, classify_c


def build(directory: pathlib.Path) -> pathlib.Path:
    """Compile bench/stagehook.c into ``directory``; the directory to import it from."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("stages: no C compiler (apt-get install gcc)")
    if not pathlib.Path("/usr/include/valgrind/callgrind.h").exists():
        raise SystemExit("stages: valgrind's headers are missing (apt-get install valgrind)")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    command = [
        cc,
        "-O2",
        "-shared",
        "-fPIC",
        f"-I{sysconfig.get_paths()['include']}",
        str(BENCH / "stagehook.c"),
        "-o",
        str(directory / f"stagehook{suffix}"),
    ]
    subprocess.run(command, check=True)
    return directory


def inside(backend: str, ops: list[str], count: int, out: pathlib.Path) -> None:
    """Runs under callgrind: per operation, one pass per stage, then one unhooked."""
    import stagehook

    table, rows, c_rows = maps()
    classify_code, classify_c = classifiers(rows, c_rows)
    with tempfile.TemporaryDirectory() as workdir:
        app, token = instructions.in_process_app("service", backend, workdir)
        send = instructions.sender(app)
        stagehook.start_instrumentation()
        start = 0
        lines = []

        def batch(op: str, n: int) -> list[dict]:
            nonlocal start
            start += n
            return list(instructions.requests(op, n, start - n, token))

        for op in ops:
            send(batch(op, instructions.WARM_UP))  # caches warm, unhooked
            stagehook.install(classify_code, classify_c, table)
            send(batch(op, instructions.WARM_UP))  # every code object classified
            for number in range(len(STAGES)):
                envs = batch(op, count)
                stagehook.take_events()
                stagehook.zero()
                stagehook.set_target(number)
                send(envs)
                stagehook.set_target(-1)
                stagehook.dump(f"{op}|{number}")
                lines.append(f"events {op}|{number} {stagehook.take_events()[number]}")
            stagehook.uninstall()
            envs = batch(op, count)
            stagehook.zero()
            stagehook.toggle_collect()
            send(envs)
            stagehook.toggle_collect()
            stagehook.dump(f"{op}|total")
        bad = [s for s in send.statuses if not s.startswith("2")]
        if bad:
            raise SystemExit(f"stages: answers {sorted(set(bad))}")
        out.write_text("\n".join(lines) + "\n")


def run(backend: str, ops: list[str], count: int) -> dict[str, dict[str, float]]:
    """Per operation: stage -> instructions per request, and the hook's overhead."""
    with tempfile.TemporaryDirectory() as scratch:
        where = build(pathlib.Path(scratch))
        out = pathlib.Path(scratch, "events")
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--collect-atstart=no",
            f"--callgrind-out-file={scratch}/cg.%p",
            sys.executable,
            str(BENCH / "stages.py"),
            "--inside",
            f"{backend},{count},{out}",
            "--ops",
            ",".join(ops),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(where)}
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
        if done.returncode or not out.exists():
            raise SystemExit(f"stages: {backend} failed\n{done.stderr[-3000:]}")
        events = {}
        for line in out.read_text().splitlines():
            key, n = line.removeprefix("events ").rsplit(" ", 1)
            events[key] = int(n)
        costs = {}
        for dump in pathlib.Path(scratch).glob("cg.*.*"):
            text = dump.read_text(errors="replace")
            key = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M).group(1)
            costs[key] = int(re.search(r"^totals: (\d+)$", text, re.M).group(1))
    result = {}
    for op in ops:
        raw = {stage: costs[f"{op}|{n}"] for n, stage in enumerate(STAGES)}
        calls = {stage: events[f"{op}|{n}"] for n, stage in enumerate(STAGES)}
        total = costs[f"{op}|total"]
        overhead = sum(raw.values()) - total
        per_call = overhead / max(sum(calls.values()), 1)
        stages = {stage: (raw[stage] - calls[stage] * per_call) / count for stage in STAGES}
        stages["total"] = total / count
        stages["hook overhead"] = overhead / count
        result[op] = stages
    return result


def print_table(backend: str, ops: list[str], result: dict[str, dict[str, float]]) -> None:
    print(f"\n{backend}: instructions per request by stage, in-process (k)")
    names = [*STAGES[1:], STAGES[0], "total", "hook overhead"]
    headers = ["stage", *ops]
    rows = [[name, *(f"{result[op][name] / 1000:,.0f}" for op in ops)] for name in names]
    instructions.table(headers, rows, left=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backends", default="sqlite,memory")
    parser.add_argument("--requests", type=int, default=20, help="per stage and operation")
    parser.add_argument("--ops", default=",".join(instructions.OPERATIONS))
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    if args.inside:
        backend, count, out = args.inside.split(",")
        inside(backend, ops, int(count), pathlib.Path(out))
        return 0
    for backend in args.backends.split(","):
        if backend not in ("sqlite", "memory"):
            raise SystemExit(f"stages: {backend}: in-process stages run on sqlite and memory")
        print_table(backend, ops, run(backend, ops, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
