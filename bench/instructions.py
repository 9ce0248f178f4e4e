"""Instructions per request, counted by callgrind: a measure that machine load does not move.

From the repository root::

    .venv/bin/python bench/instructions.py [--requests 200] [--backends sqlite,memory]
                                           [--tree PATH]... [--keep DIR] [--metrics]

Each operation of ``bench/run.py --compare`` (create, get, list with limit 10)
is sent straight to the WSGI application, in-process, with no server and no
network, once to the service (every check on, as in ``bench/run.py``) and once
to ``bench/baseline_app.py``. The process runs under ``valgrind
--tool=callgrind``; the counters are zeroed after a warm-up and dumped after
``--requests`` requests of one operation, so start-up is never counted. The
ratio printed is the baseline's instructions per request over the service's:
the throughput ratio one core would give if instructions were all that
mattered (they leave out waiting for the disk and gunicorn's own share, which
``bench/run.py`` measures).

Every ``--tree`` (another checkout of this repository, with its own
``.venv``) is measured in the same run with this same script, so two
versions of the code compare instruction for instruction; the first
column is this checkout.
``--metrics`` instead compares this checkout with metrics on (prometheus_client
in its multiprocess mode, as under gunicorn) against metrics off, and prints
the ratio of their instructions per request (the issue's budget: create at
least 0.95).

Needs Debian's ``valgrind``; a run takes about a minute per tree and backend.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
OPERATIONS = ("create", "get", "list")
AGENT = "bench-agent"
SESSION = "bench-session"
WARM_UP = 20


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


def requests(op: str, count: int, start: int, token: str):
    base = f"/v2/agents/{AGENT}/sessions"
    for n in range(start, start + count):
        if op == "create":
            body = json.dumps(
                {
                    "key": f"k{n}",
                    "name": f"Benchmark session {n}",
                    "metadata": {"customer": "c-17", "channel": "web"},
                    "tti_minutes": 0,
                }
            ).encode()
            yield environ("POST", base, body=body, token=token)
        elif op == "get":
            yield environ("GET", f"{base}/{SESSION}", token=token)
        else:
            yield environ("GET", base, query="limit=10", token=token)


def service_app(backend: str, workdir: str, metrics: str = ""):
    """The service as ``bench/run.py`` serves it, seeded through the storage interface."""
    if metrics:
        os.environ["AGENT_SESSIONS_METRICS_ENABLED"] = metrics
        if metrics == "true":
            os.makedirs(f"{workdir}/metrics")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = f"{workdir}/metrics"
    os.environ["AGENT_SESSIONS_STORAGE_URL"] = (
        "memory://" if backend == "memory" else f"sqlite:///{workdir}/bench.db"
    )
    os.environ["AGENT_SESSIONS_SESSION_CREATE_LIMIT"] = "100000000/minute"
    os.environ["AGENT_SESSIONS_DEFAULT_LIMIT"] = "100000000/minute"
    sys.path.insert(0, os.getcwd())
    from sessions_app import create_app

    try:
        from sessions_app.corridor.auth import hash_secret
    except ImportError:  # older trees kept it at the package's top
        from sessions_app.auth import hash_secret
    from storage_backends import Agent, ApiKey, Grant, Session

    try:
        from storage_backends.codec import utcnow
    except ImportError:  # older trees kept it in base
        from storage_backends.base import utcnow

    app = create_app()
    storage = app.extensions["agent_sessions"].storage
    now = utcnow()
    storage.create_agent(agent=Agent(key=AGENT, name=AGENT, created_at=now, updated_at=now))
    storage.create_api_key(
        api_key=ApiKey(
            id="ak_bench",
            name="benchmark",
            secret_hash=hash_secret("secret"),
            grants=[Grant(AGENT, ("sessions:create", "sessions:read"))],
            created_at=now,
        )
    )
    for key in [SESSION, *(f"seed{n}" for n in range(20))]:
        storage.create_session(
            session=Session(
                key=key,
                agent_key=AGENT,
                name="Benchmark session",
                metadata={"customer": "c-17", "channel": "web"},
                created_at=now,
                updated_at=now,
            )
        )
    return app, "ak_bench.secret"


def measure(target: str, backend: str, count: int, out: str) -> None:
    """Runs inside callgrind: warm up, zero, ``count`` requests, dump; per operation."""
    with tempfile.TemporaryDirectory() as workdir:
        if target.startswith("service"):
            _, _, metrics = target.partition(":")
            app, token = service_app(backend, workdir, metrics)
        else:
            sys.path.insert(0, str(ROOT / "bench"))
            from baseline_app import app

            token = ""
        statuses: list[str] = []

        def start_response(status, headers, exc_info=None):
            statuses.append(status)

        def send(envs) -> None:
            for env in envs:
                body = app(env, start_response)
                for _ in body:
                    pass
                getattr(body, "close", lambda: None)()

        pid = str(os.getpid())
        start = 0
        for op in OPERATIONS:
            send(list(requests(op, WARM_UP, start, token)))
            start += WARM_UP
            batch = list(requests(op, count, start, token))
            start += count
            statuses.clear()
            subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
            send(batch)
            subprocess.run(["callgrind_control", "-d", op, pid], check=True, capture_output=True)
            bad = [s for s in statuses if not s.startswith("2")]
            if bad:
                raise SystemExit(f"{target} {op}: answers {sorted(set(bad))}")
        pathlib.Path(out).write_text("ok")


def counted(
    tree: pathlib.Path, target: str, backend: str, count: int, keep: pathlib.Path | None = None
) -> dict[str, float]:
    """Instructions per request for each operation, from one callgrind run in ``tree``."""
    with tempfile.TemporaryDirectory() as scratch:
        done = pathlib.Path(scratch, "done")
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={scratch}/cg.%p",
            str(tree / ".venv/bin/python"),
            str(ROOT / "bench/instructions.py"),
            "--inside",
            f"{target},{backend},{count},{done}",
        ]
        run = subprocess.run(command, cwd=tree, capture_output=True, text=True)
        if run.returncode or not done.exists():
            raise SystemExit(f"{tree} {target} {backend}: failed\n{run.stderr[-3000:]}")
        per_request = {}
        if keep:
            target_dir = keep / f"{tree.name}-{target.replace(':', '-')}-{backend}"
            target_dir.mkdir(parents=True, exist_ok=True)
            for dump in pathlib.Path(scratch).glob("cg.*"):
                (target_dir / dump.name).write_bytes(dump.read_bytes())
        for dump in pathlib.Path(scratch).glob("cg.*.*"):
            text = dump.read_text(errors="replace")
            trigger = next(line for line in text.splitlines() if line.startswith("desc: Trigger"))
            summary = next(line for line in text.splitlines() if line.startswith("summary:"))
            op = trigger.rsplit(" ", 1)[1]
            per_request[op] = int(summary.split()[1]) / count
        return per_request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--backends", default="sqlite,memory")
    parser.add_argument("--tree", action="append", default=[], type=pathlib.Path)
    parser.add_argument(
        "--keep", type=pathlib.Path, help="copy callgrind's dumps here (for callgrind_annotate)"
    )
    parser.add_argument("--metrics", action="store_true", help="metrics on against off")
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        target, backend, count, out = args.inside.split(",")
        measure(target, backend, int(count), out)
        return 0
    if args.metrics:
        print("metrics on against off (instructions off / instructions on)")
        for backend in args.backends.split(","):
            off = counted(ROOT, "service:false", backend, args.requests, args.keep)
            on = counted(ROOT, "service:true", backend, args.requests, args.keep)
            for op in OPERATIONS:
                print(
                    f"{backend:>8} {op:<7} {off[op] / on[op]:.3f} "
                    f"(off {off[op] / 1000:,.0f}k, on {on[op] / 1000:,.0f}k)"
                )
        return 0
    trees = [ROOT, *(t.resolve() for t in args.tree)]
    baseline = counted(ROOT, "baseline", "none", args.requests)
    print(f"baseline: {', '.join(f'{op} {baseline[op]:,.0f}' for op in OPERATIONS)} instr/request")
    header = "".join(f"  {str(t):>28}" for t in trees)
    print(
        f"\nratio to the baseline (baseline instructions / service instructions)\n{'':16}{header}"
    )
    for backend in args.backends.split(","):
        results = [counted(tree, "service", backend, args.requests, args.keep) for tree in trees]
        for op in OPERATIONS:
            cells = "".join(
                f"  {baseline[op] / r[op]:>8.3f} ({r[op] / 1000:>9,.0f}k)" for r in results
            )
            print(f"{backend:>8} {op:<7}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
