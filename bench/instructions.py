"""Instructions per request, counted by callgrind: a measure that machine load does not move.

From the repository root::

    .venv/bin/python bench/instructions.py [--requests 50] [--backends sqlite,memory,postgresql]
                                           [--ops create,get,list,append,"newest 20"]
    .venv/bin/python bench/instructions.py --check [--backends ...] [--ops ...]
    .venv/bin/python bench/instructions.py --write-reference
    .venv/bin/python bench/instructions.py --in-process [--tree PATH]... [--metrics]

The ratios of record. The service and ``bench/baseline_app.py`` are served
as ``bench/run.py`` serves them (gunicorn with ``gunicorn.conf.py``, started
with ``-w 2``: threaded workers, access log, rate limits on the host counters
file, multiprocess metrics), the gunicorn master under ``valgrind
--tool=callgrind``. The master starts uninstrumented (``--instr-atstart=no``,
fast); then instrumentation is switched on in it (``callgrind_control -i
on``), it is told to keep one worker (SIGTTOU: the counters file stays, as
decided at start for two) and its workers are replaced, so the one it forks
anew is instrumented from its fork. This client, outside valgrind, sends
each operation's requests over one kept-alive connection: ``WARM_UP`` of
them, then ``--requests`` counted ones. The worker is sent SIGWINCH before
and after the counted requests: its Python signal handler calls
``_PyEval_SignalReceived``, on which callgrind dumps (``--dump-before``), so
a dump holds exactly the worker's instructions between the two signals,
every thread of it (reading the request head, the request thread, the
access log, SQLite's checkpoint thread), and nothing of the client's, the
master's or the database server's. Instructions per request is that dump's
total over ``--requests``.

Operations (the requests of ``bench/run.py --compare``, with fixed bodies):
create (a key of fixed length per request), get (one session), list (first
page, limit 10), append (one ``agent_output`` event to one of 64 sessions in
turn), newest 20 (of a 100-event session). Backends: sqlite, memory and
postgresql (when it answers on 127.0.0.1:5432). On PostgreSQL the
instructions are the worker's own; the database server's time is printed
apart: the CPU time its backends for the benchmark's database spent over
the counted requests (``/proc/PID/schedstat``), a clock measure that load
can move.

Stable enough for a 5% guard: the server runs with ``PYTHONHASHSEED=0``,
the bodies and key lengths are fixed, the store is fresh and seeded alike
every run, and warm-up requests fill every cache first. What still varies
is driven by the clock: the per-worker key cache re-reads its key once a
second, a rate-limit window turns over once a minute, SQLite checkpoints
after 1,000 pages. ``--check`` counts the service and fails (exit 1) when
an operation costs more than ``TOLERANCE`` over
``bench/instructions-reference.json`` (written by ``--write-reference``);
instruction counts belong to one kind of machine (Python build, libraries,
the CPU's memcpy), so the reference is the CI machine's.

``--in-process`` is the earlier measure: each request sent straight to the
WSGI application in this process, no gunicorn and no network, for
``--tree`` (another checkout with its own ``.venv``, compared instruction for
instruction) and ``--metrics`` (metrics on against off). ``bench/stages.py``
breaks the in-process count down by stage.

Needs Debian's ``valgrind``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import http.client
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import stores  # noqa: E402
from harness import Gunicorn, reachable  # noqa: E402

OPERATIONS = ("create", "get", "list", "append", "newest 20")
BACKENDS = ("sqlite", "memory", "postgresql")
WARM_UP = 20
REQUESTS = 50
REFERENCE = BENCH / "instructions-reference.json"
TOLERANCE = 0.05
DUMP_AT = "_PyEval_SignalReceived"  # called only by CPython's C signal handler
BASELINE_APP = "bench.baseline_app:app"
BASE = f"/v2/agents/{stores.AGENT}/sessions"
APPEND_BODY = json.dumps(
    {
        "events": [
            {
                "type": "agent_output",
                "content": "The order shipped on Monday and should arrive by Thursday.",
            }
        ]
    }
).encode()


def request_for(op: str, n: int) -> tuple[str, str, str, bytes]:
    """The ``n``-th request of ``op``: method, path, query, body."""
    if op == "create":
        body = {
            "key": f"b{n:07d}",
            "name": "Benchmark session",
            "metadata": {"customer": "c-17", "channel": "web"},
            "tti_minutes": 0,
        }
        return "POST", BASE, "", json.dumps(body).encode()
    if op == "get":
        return "GET", f"{BASE}/{stores.GET_KEY}", "", b""
    if op == "list":
        return "GET", BASE, "limit=10", b""
    if op == "append":
        session = f"{stores.APPEND_KEY}-{n % stores.APPEND_SESSIONS}"
        return "POST", f"{BASE}/{session}/events/batch", "", APPEND_BODY
    if op == "newest 20":
        return "GET", f"{BASE}/{stores.HISTORY_KEY}/events", "order=desc&limit=20", b""
    raise ValueError(f"unknown operation {op!r}")


# Served: gunicorn under callgrind


class Failed(RuntimeError):
    pass


@dataclasses.dataclass
class Served:
    """One server's counts: instructions per request, and the database's µs per request."""

    instructions: dict[str, float]
    database_us: dict[str, float]


class CountedServer:
    """A gunicorn master under callgrind, then serving with one worker instrumented from its fork.

    The master starts uninstrumented with ``-w 2`` (so ``gunicorn.conf.py``
    keeps the host counters file, as served); then it is instrumented, told
    to keep one worker (SIGTTOU) and its workers are replaced, so the one it
    forks anew is instrumented and alone. ``--timeout`` is raised: an
    instrumented worker boots slowly and would be taken for stuck.
    """

    def __init__(self, name: str, app: str, env: dict[str, str], workdir: pathlib.Path):
        self.out = workdir / f"callgrind-{name}"
        (self.out / "tmp").mkdir(parents=True)
        wrapper = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--dump-before={DUMP_AT}",
            f"--callgrind-out-file={self.out}/cg.%p",
            f"--vgdb-prefix={self.out}/vgdb",
        ]
        # TMPDIR: the master's own directories (metrics, counters) go with the workdir.
        env = {**env, "PYTHONHASHSEED": "0", "TMPDIR": str(self.out / "tmp")}
        self.server = Gunicorn(name, app, env, workdir, wrapper, ["--timeout", "900"])
        self.sequence = 0  # numbers the requests: create keys, append sessions

    def __enter__(self) -> CountedServer:
        server = self.server
        server.start(timeout=300)
        assert server.process is not None
        master = server.process.pid
        control = ["callgrind_control", f"--vgdb-prefix={self.out}/vgdb", "-i", "on", str(master)]
        run = subprocess.run(control, capture_output=True, text=True, timeout=120)
        if run.returncode:
            self.__exit__()
            raise Failed(f"callgrind_control: {run.stdout}{run.stderr}")
        old = frozenset(server.worker_pids())
        os.kill(master, signal.SIGTTOU)
        deadline = time.monotonic() + 60
        while len(server.worker_pids()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in old.intersection(server.worker_pids()):
            os.kill(pid, signal.SIGTERM)
        server.wait_ready(600, old, workers=1)
        return self

    def __exit__(self, *exc: object) -> None:
        """Killed, not stopped: the dumps are taken, and a graceful exit under valgrind is slow."""
        process = self.server.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)

    def send(self, conn: http.client.HTTPConnection, op: str, count: int, token: str) -> None:
        for _ in range(count):
            method, path, query, body = request_for(op, self.sequence)
            self.sequence += 1
            headers = {"x-api-key": token} if token else {}
            if body:
                headers["Content-Type"] = "application/json"
            conn.request(method, f"{path}?{query}" if query else path, body or None, headers)
            response = conn.getresponse()
            data = response.read()
            if not 200 <= response.status < 300:
                raise Failed(f"{self.server.name} {op}: {response.status} {data[:300]!r}")

    def holder(self, conn: http.client.HTTPConnection) -> int:
        """The worker that accepted ``conn``: the one with its socket's inode among its fds."""
        assert conn.sock is not None
        ours = conn.sock.getsockname()[1]
        inode = None
        for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (
                int(local.split(":")[1], 16) == self.server.port
                and int(remote.split(":")[1], 16) == ours
            ):
                inode = fields[9]
        for pid in self.server.worker_pids():
            for fd in glob.glob(f"/proc/{pid}/fd/*"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == f"socket:[{inode}]":
                        return pid
        raise Failed(f"{self.server.name}: no worker holds the connection (inode {inode})")

    def dump(self, pid: int) -> int:
        """Signal ``pid`` to dump; the instructions since its previous dump.

        A dump's ``totals`` line (the sum of its functions' own costs) is read,
        not its ``summary``, which a dump taken inside a signal handler can
        overstate.
        """
        parts = [int(p.rsplit(".", 1)[1]) for p in glob.glob(f"{self.out}/cg.{pid}.*")]
        path = pathlib.Path(f"{self.out}/cg.{pid}.{max(parts, default=0) + 1}")
        os.kill(pid, signal.SIGWINCH)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if path.exists():
                found = re.search(r"^totals: (\d+)$", path.read_text(errors="replace"), re.M)
                if found:
                    return int(found.group(1))
            time.sleep(0.05)
        raise Failed(f"{self.server.name}: worker {pid} wrote no {path.name}")

    def count(self, ops: list[str], requests: int, token: str, database: str = "") -> Served:
        served = Served({}, {})
        for op in ops:
            conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=300)
            try:
                self.send(conn, op, WARM_UP, token)
                worker = self.holder(conn)
                self.dump(worker)
                cpu = database_cpu_ns(database)
                self.send(conn, op, requests, token)
                served.instructions[op] = self.dump(worker) / requests
                if database:
                    spent = database_cpu_ns(database)
                    total = sum(ns - cpu.get(pid, 0) for pid, ns in spent.items())
                    served.database_us[op] = total / requests / 1000
            finally:
                conn.close()
        return served


def database_cpu_ns(database: str) -> dict[int, int]:
    """CPU nanoseconds so far of each PostgreSQL backend connected to ``database``."""
    if not database:
        return {}
    import psycopg

    with psycopg.connect(stores.PG_ADMIN_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchall()
    spent = {}
    for (pid,) in rows:
        with contextlib.suppress(OSError, ValueError):
            spent[pid] = int(pathlib.Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    return spent


def count_service(
    backend: str, ops: list[str], requests: int, workdir: pathlib.Path, settings: dict
) -> Served:
    store = stores.prepare(backend, workdir, f"instr_{os.getpid()}_{backend}", settings)
    database = store.url.rsplit("/", 1)[1] if backend == "postgresql" else ""
    with CountedServer(f"service-{backend}", store.app, store.env, workdir) as server:
        return server.count(ops, requests, store.token, database)


def count_baseline(ops: list[str], requests: int, workdir: pathlib.Path) -> Served:
    # gunicorn.conf.py builds the service's app in the master to check its settings:
    # give it a store it can open (it opens no connection).
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{workdir}/baseline.db"}
    with CountedServer("baseline", BASELINE_APP, env, workdir) as server:
        return server.count(ops, requests, "")


def available(backends: list[str]) -> list[str]:
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"instructions: unknown backends {sorted(unknown)}; use {BACKENDS}")
    if "postgresql" in backends and not reachable(stores.PG_HOST, stores.PG_PORT):
        print(f"postgresql skipped: nothing answers on {stores.PG_HOST}:{stores.PG_PORT}")
        backends = [b for b in backends if b != "postgresql"]
    return backends


@contextlib.contextmanager
def scratch() -> Iterator[pathlib.Path]:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="agent-sessions-instructions-"))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        stores.drop_pg_databases()


def ratios(
    backends: list[str], ops: list[str], requests: int, settings: dict | None = None
) -> list[dict]:
    """Per backend and operation: the service's and the baseline's instructions per request."""
    with scratch() as workdir:
        baseline = count_baseline(ops, requests, workdir)
        rows = []
        for backend in backends:
            service = count_service(backend, ops, requests, workdir, settings or {})
            for op in ops:
                rows.append(
                    {
                        "backend": backend,
                        "op": op,
                        "service": service.instructions[op],
                        "baseline": baseline.instructions[op],
                        "ratio": baseline.instructions[op] / service.instructions[op],
                        "database_us": service.database_us.get(op),
                    }
                )
    return rows


def print_ratios(rows: list[dict], requests: int) -> None:
    print(
        f"\nInstructions per request, gunicorn worker included (callgrind; {requests} requests "
        f"after {WARM_UP} warm-up); ratio = baseline / service"
    )
    table(
        ["backend", "op", "service", "baseline", "ratio", "database µs/request"],
        [
            [
                r["backend"],
                r["op"],
                f"{r['service'] / 1000:,.0f}k",
                f"{r['baseline'] / 1000:,.0f}k",
                f"{r['ratio']:.3f}",
                "" if r["database_us"] is None else f"{r['database_us']:,.0f}",
            ]
            for r in rows
        ],
    )


def table(headers: list[str], rows: list[list[str]], left: int = 2) -> None:
    """Columns padded to their widest cell; the first ``left`` ones aligned left."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    for line in [headers, ["-" * w for w in widths], *rows]:
        cells = [
            str(cell).ljust(width) if column < left else str(cell).rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


# The guard


def measure_service(backends: list[str], ops: list[str], requests: int) -> dict[str, dict]:
    with scratch() as workdir:
        return {
            backend: count_service(backend, ops, requests, workdir, {}).instructions
            for backend in backends
        }


def write_reference(
    backends: list[str], ops: list[str], requests: int, path: pathlib.Path = REFERENCE
) -> None:
    """Count the service and merge its counts into the reference file (same request count)."""
    counts = measure_service(backends, ops, requests)
    old = json.loads(path.read_text()) if path.exists() else {}
    if old.get("requests") != requests:
        old = {}
    merged = old.get("backends", {})
    for backend, by_op in counts.items():
        merged.setdefault(backend, {}).update({op: round(n) for op, n in by_op.items()})
    body = {"requests": requests, "warm_up": WARM_UP, "backends": merged}
    path.write_text(json.dumps(body, indent=1) + "\n")
    print(f"wrote {path}")
    for backend, by_op in counts.items():
        print(f"  {backend}: " + ", ".join(f"{op} {n / 1000:,.0f}k" for op, n in by_op.items()))


def compare(reference: dict, counts: dict[str, dict[str, float]]) -> tuple[list[list[str]], list]:
    """The table rows of ``counts`` against ``reference``, and the (backend, op) that grew."""
    rows, grown = [], []
    for backend, by_op in counts.items():
        for op, now in by_op.items():
            before = reference["backends"][backend][op]
            change = now / before - 1
            verdict = "ok"
            if change > TOLERANCE:
                verdict = "GREW"
                grown.append((backend, op))
            elif change < -TOLERANCE:
                verdict = "ok (lower: --write-reference)"
            rows.append([backend, op, f"{before:,.0f}", f"{now:,.0f}", f"{change:+.1%}", verdict])
    return rows, grown


def check(backends: list[str], ops: list[str], path: pathlib.Path = REFERENCE) -> int:
    """0 when no operation grew more than ``TOLERANCE`` over the reference, else 1."""
    if not path.exists():
        print(f"instructions: no {path}; make it with --write-reference")
        return 1
    reference = json.loads(path.read_text())
    missing = [
        (b, op) for b in backends for op in ops if op not in reference["backends"].get(b, {})
    ]
    if missing:
        print(f"instructions: {path} has no count for {missing}")
        return 1
    requests = reference["requests"]
    rows, grown = compare(reference, measure_service(backends, ops, requests))
    print(f"Instructions per request against {path} ({requests} requests; limit +{TOLERANCE:.0%})")
    table(["backend", "op", "reference", "now", "change", "verdict"], rows)
    if grown:
        names = ", ".join(f"{b} {op}" for b, op in grown)
        print(f"\ninstructions: more than {TOLERANCE:.0%} over the reference: {names}")
        return 1
    return 0


# In-process: the WSGI application called directly, under callgrind


def environ(method: str, path: str, query: str = "", body: bytes = b"", token: str = "") -> dict:
    env = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "localhost",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if token:
        env["HTTP_X_API_KEY"] = token
    if body:
        env["CONTENT_TYPE"] = "application/json"
        env["CONTENT_LENGTH"] = str(len(body))
    return env


def requests(op: str, count: int, start: int, token: str) -> Iterator[dict]:
    for n in range(start, start + count):
        method, path, query, body = request_for(op, n)
        yield environ(method, path, query, body, token)


def service_app(backend: str, workdir: str, metrics: str = "true"):
    """The service as gunicorn serves it: host counters file, multiprocess metrics; seeded."""
    os.environ["AGENT_SESSIONS_METRICS_ENABLED"] = metrics
    if metrics == "true":
        os.makedirs(f"{workdir}/metrics")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = f"{workdir}/metrics"
    os.environ["_AGENT_SESSIONS_RATELIMIT_COUNTERS"] = f"{workdir}/counters.db"
    os.environ["AGENT_SESSIONS_STORAGE_URL"] = (
        "memory://" if backend == "memory" else f"sqlite:///{workdir}/bench.db"
    )
    os.environ["AGENT_SESSIONS_SESSION_CREATE_LIMIT"] = stores.HIGH_LIMIT
    os.environ["AGENT_SESSIONS_DEFAULT_LIMIT"] = stores.HIGH_LIMIT
    sys.path.insert(0, os.getcwd())
    from sessions_app import create_app

    try:
        from sessions_app.corridor.auth import hash_secret
    except ImportError:  # older trees kept it at the package's top
        from sessions_app.auth import hash_secret
    from storage_backends import Agent, ApiKey, Grant, Session
    from storage_backends.codec import utcnow

    app = create_app()
    storage = app.extensions["agent_sessions"].storage
    now = utcnow()
    storage.create_agent(
        agent=Agent(key=stores.AGENT, name=stores.AGENT, created_at=now, updated_at=now)
    )
    storage.create_api_key(
        api_key=ApiKey(
            id="ak_bench",
            name="benchmark",
            secret_hash=hash_secret("secret"),
            grants=[Grant(stores.AGENT, tuple(stores.SCOPES.split(",")))],
            created_at=now,
        )
    )
    storage.create_session(
        session=Session(
            key=stores.GET_KEY,
            agent_key=stores.AGENT,
            name="Benchmark session",
            metadata={"customer": "c-17", "channel": "web"},
            created_at=now,
            updated_at=now,
        )
    )
    stores.seed_events(storage)
    return app, "ak_bench.secret"


def in_process_app(target: str, backend: str, workdir: str):
    """(WSGI app, token) for ``service[:metrics]`` or ``baseline``."""
    if target.startswith("service"):
        _, _, metrics = target.partition(":")
        return service_app(backend, workdir, metrics or "true")
    from baseline_app import app

    return app, ""


def sender(app):
    """A function that sends environs to ``app``; the statuses it answered go in its list."""
    statuses: list[str] = []

    def start_response(status, headers, exc_info=None):
        statuses.append(status)

    def send(envs) -> None:
        for env in envs:
            body = app(env, start_response)
            for _ in body:
                pass
            getattr(body, "close", lambda: None)()

    send.statuses = statuses
    return send


def measure(target: str, backend: str, count: int, out: str) -> None:
    """Runs inside callgrind: warm up, zero, ``count`` requests, dump; per operation."""
    with tempfile.TemporaryDirectory() as workdir:
        app, token = in_process_app(target, backend, workdir)
        send = sender(app)
        pid = str(os.getpid())
        start = 0
        for op in OPERATIONS:
            send(list(requests(op, WARM_UP, start, token)))
            start += WARM_UP
            batch = list(requests(op, count, start, token))
            start += count
            send.statuses.clear()
            subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
            send(batch)
            subprocess.run(
                ["callgrind_control", "-d", op.replace(" ", "_"), pid],
                check=True,
                capture_output=True,
            )
            bad = [s for s in send.statuses if not s.startswith("2")]
            if bad:
                raise SystemExit(f"{target} {op}: answers {sorted(set(bad))}")
        pathlib.Path(out).write_text("ok")


def counted(
    tree: pathlib.Path, target: str, backend: str, count: int, keep: pathlib.Path | None = None
) -> dict[str, float]:
    """Instructions per request for each operation, from one in-process callgrind run."""
    with tempfile.TemporaryDirectory() as scratch_dir:
        done = pathlib.Path(scratch_dir, "done")
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={scratch_dir}/cg.%p",
            str(tree / ".venv/bin/python"),
            str(ROOT / "bench/instructions.py"),
            "--inside",
            f"{target},{backend},{count},{done}",
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        run = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env)
        if run.returncode or not done.exists():
            raise SystemExit(f"{tree} {target} {backend}: failed\n{run.stderr[-3000:]}")
        per_request = {}
        if keep:
            target_dir = keep / f"{tree.name}-{target.replace(':', '-')}-{backend}"
            target_dir.mkdir(parents=True, exist_ok=True)
            for dump in pathlib.Path(scratch_dir).glob("cg.*"):
                (target_dir / dump.name).write_bytes(dump.read_bytes())
        for dump in pathlib.Path(scratch_dir).glob("cg.*.*"):
            text = dump.read_text(errors="replace")
            trigger = next(line for line in text.splitlines() if line.startswith("desc: Trigger"))
            summary = next(line for line in text.splitlines() if line.startswith("summary:"))
            op = trigger.rsplit(" ", 1)[1].replace("_", " ")
            per_request[op] = int(summary.split()[1]) / count
        return per_request


def in_process(args: argparse.Namespace, backends: list[str]) -> int:
    if args.metrics:
        print("metrics on against off (instructions off / instructions on), in-process")
        for backend in backends:
            off = counted(ROOT, "service:false", backend, args.requests, args.keep)
            on = counted(ROOT, "service:true", backend, args.requests, args.keep)
            for op in OPERATIONS:
                print(
                    f"{backend:>8} {op:<9} {off[op] / on[op]:.3f} "
                    f"(off {off[op] / 1000:,.0f}k, on {on[op] / 1000:,.0f}k)"
                )
        return 0
    trees = [ROOT, *(t.resolve() for t in args.tree)]
    baseline = counted(ROOT, "baseline", "none", args.requests)
    print(
        f"baseline: {', '.join(f'{op} {baseline[op]:,.0f}' for op in OPERATIONS)} "
        "instr/request, in-process"
    )
    header = "".join(f"  {str(t):>28}" for t in trees)
    print(
        f"\nratio to the baseline (baseline instructions / service instructions)\n{'':18}{header}"
    )
    for backend in backends:
        results = [counted(tree, "service", backend, args.requests, args.keep) for tree in trees]
        for op in OPERATIONS:
            cells = "".join(
                f"  {baseline[op] / r[op]:>8.3f} ({r[op] / 1000:>9,.0f}k)" for r in results
            )
            print(f"{backend:>8} {op:<9}{cells}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, help=f"counted per operation ({REQUESTS})")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--ops", default=",".join(OPERATIONS), help="comma-separated")
    parser.add_argument("--check", action="store_true", help=f"fail over {REFERENCE.name}")
    parser.add_argument("--write-reference", action="store_true", help=f"write {REFERENCE.name}")
    parser.add_argument("--reference", type=pathlib.Path, default=REFERENCE, help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help="no gunicorn: the WSGI app")
    parser.add_argument("--tree", action="append", default=[], type=pathlib.Path)
    parser.add_argument("--keep", type=pathlib.Path, help="in-process: copy callgrind's dumps here")
    parser.add_argument("--metrics", action="store_true", help="in-process: metrics on vs off")
    parser.add_argument("--json", type=pathlib.Path, help="also write the ratios here")
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        target, backend, count, out = args.inside.split(",")
        measure(target, backend, int(count), out)
        return 0
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    if set(ops) - set(OPERATIONS):
        raise SystemExit(f"instructions: unknown operations {sorted(set(ops) - set(OPERATIONS))}")
    backends = available([b.strip() for b in args.backends.split(",") if b.strip()])
    try:
        if args.in_process or args.metrics or args.tree:
            args.requests = args.requests or 100
            return in_process(args, [b for b in backends if b != "postgresql"])
        if args.check:
            return check(backends, ops, args.reference)
        requests_count = args.requests or REQUESTS
        if args.write_reference:
            write_reference(backends, ops, requests_count, args.reference)
            return 0
        rows = ratios(backends, ops, requests_count)
    except (Failed, RuntimeError) as err:
        print(f"instructions: {err}", file=sys.stderr)
        return 2
    print_ratios(rows, requests_count)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
