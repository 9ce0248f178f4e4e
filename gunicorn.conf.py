"""gunicorn defaults for ``gunicorn wsgi:app``; each can be overridden on the command line."""

import atexit
import glob
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile


def _count(name: str, default: int, low: int, high: int) -> int:
    """A whole-number setting from the environment, in its range, or one line and exit 4."""
    value = os.environ.get(name) or str(default)
    if not (value.isascii() and value.isdigit() and low <= int(value) <= high):
        print(
            f"agent-sessions: configuration error: {name}={value!r}: "
            f"expected a whole number, {low} to {high}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(4)
    return int(value)


bind = os.environ.get("AGENT_SESSIONS_BIND", "127.0.0.1:8000")
workers = _count(
    "WEB_CONCURRENCY" if os.environ.get("WEB_CONCURRENCY") else "AGENT_SESSIONS_WORKERS",
    min(4, multiprocessing.cpu_count() * 2),
    1,
    256,
)
# Threads whose event loop reads every request head itself (sessions_app/serving/server.py):
# slow or stalled clients hold a socket, not a thread, and are closed after
# AGENT_SESSIONS_HEADER_TIMEOUT seconds (10); kept-alive idle ones after keepalive.
# Four threads fit PostgreSQL's pool (AGENT_SESSIONS_POSTGRES_POOL_MAX, 4 per worker).
worker_class = "sessions_app.serving.server.HeadReadingWorker"
threads = _count("AGENT_SESSIONS_THREADS", 4, 1, 256)
# A request running longer gets its worker killed and replaced, as with sync workers;
# time spent waiting for a client to take its answer does not count (the worker bounds
# that by AGENT_SESSIONS_SEND_TIMEOUT on its own).
timeout = _count("AGENT_SESSIONS_TIMEOUT", 30, 1, 86400)
graceful_timeout = 10
keepalive = 5
# Bound request lines and headers (huge headers get a 4xx from gunicorn itself).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = "-"
# gunicorn's default format, less two places a client may put its API key: the
# user of Basic auth (%(u)s) and the query string (%(r)s). The logger writes %(U)s
# as the client sent it (percent-encoded) and escapes control characters in every
# field and error-log line, so a client cannot forge a line (sessions_app/serving/server.py).
# Then the answer's X-Request-ID (the id in its body and in the error log) and the
# time the request took, in seconds.
access_log_format = (
    '%(h)s %(l)s - %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(f)s" "%(a)s" '
    "request_id=%({x-request-id}o)s duration=%(L)ss"
)
errorlog = "-"
logger_class = "sessions_app.serving.logger.EscapingLogger"

# AGENT_SESSIONS_LOG_FORMAT: "text" (default) or "json" (sessions_app/observability/logs.py),
# read by the logger before the app is built, so checked here.
_log_format = (os.environ.get("AGENT_SESSIONS_LOG_FORMAT") or "text").strip().lower()
if _log_format not in ("text", "json"):
    print(
        "agent-sessions: configuration error: AGENT_SESSIONS_LOG_FORMAT="
        f"{os.environ['AGENT_SESSIONS_LOG_FORMAT']!r}: expected text or json",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(4)
os.environ["AGENT_SESSIONS_LOG_FORMAT"] = _log_format

# Metrics (sessions_app/observability/metrics.py): the workers share their values through files
# in PROMETHEUS_MULTIPROC_DIR, set before anything imports prometheus_client. An
# operator's directory is emptied of a previous run's files (and of the page kept for
# scrapes) at start; otherwise a fresh one is made and removed when the master exits.
# child_exit folds a dead worker's counts into one merged file per kind and drops its
# live gauges.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if os.environ.get("_AGENT_SESSIONS_METRICS_MASTER") == str(os.getpid()):
    pass  # a reload (SIGHUP) reads this file again: the workers' files stay
elif _metrics_dir:
    os.makedirs(_metrics_dir, exist_ok=True)
    for _stale in glob.glob(os.path.join(_metrics_dir, "*.db")):
        os.remove(_stale)
    if os.path.exists(os.path.join(_metrics_dir, "scrape.page")):
        os.remove(os.path.join(_metrics_dir, "scrape.page"))
else:
    _metrics_dir = tempfile.mkdtemp(prefix="agent-sessions-metrics-")
    _master = os.getpid()
    # Only the master removes it: a worker's exit runs the same atexit hooks.
    atexit.register(lambda: os.getpid() == _master and shutil.rmtree(_metrics_dir, True))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
os.environ["_AGENT_SESSIONS_METRICS_MASTER"] = str(os.getpid())

# Rate limits on memory:// (sessions_app/corridor/rate_limits.py): the workers of this
# server count in one SQLite file (sessions_app/serving/host_counters.py) in a directory
# of this master's own, made here and removed when the master exits, so every
# limit is exact across them. A dead worker leaves nothing half-written (WAL:
# its uncommitted frames are ignored; the kernel releases its flock). A reload
# (SIGHUP) keeps the file and its counts. on_starting drops it for one worker,
# which counts in its own memory.
_COUNTERS_ENV = "_AGENT_SESSIONS_RATELIMIT_COUNTERS"
if os.environ.get("_AGENT_SESSIONS_LIMITS_MASTER") != str(os.getpid()):
    _limits_dir = tempfile.mkdtemp(prefix="agent-sessions-limits-")
    _limits_master = os.getpid()
    atexit.register(lambda: os.getpid() == _limits_master and shutil.rmtree(_limits_dir, True))
    os.environ[_COUNTERS_ENV] = os.path.join(_limits_dir, "counters.db")
    os.environ["_AGENT_SESSIONS_LIMITS_MASTER"] = str(os.getpid())


class _ToErrorLog(logging.Handler):
    """Hands a record to gunicorn's error log: its file, its format, its --log-level."""

    def emit(self, record: logging.LogRecord) -> None:
        error_log = logging.getLogger("gunicorn.error")
        if error_log.isEnabledFor(record.levelno):
            error_log.handle(record)


# The service's own log lines (the storage and SQLite version at start, 503s,
# unhandled errors) go to the error log. Set here, before gunicorn loads the app
# (also with --preload), and inherited by every worker.
for _name in ("agent_sessions", "sessions_app", "storage_backends"):
    _logger = logging.getLogger(_name)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False
    if not any(h.get_name() == "gunicorn-error-log" for h in _logger.handlers):
        _handler = _ToErrorLog()
        _handler.set_name("gunicorn-error-log")
        _logger.addHandler(_handler)


def on_starting(server):
    """Refuse to start, with one line, when the configuration cannot be served.

    Checked once in the master before any worker forks, so an operator sees one
    clear message instead of one per worker and gunicorn's own tracebacks.
    Building the app opens no connection, so this is safe before forking.
    """
    from sessions_app import create_app_or_exit
    from sessions_app.observability.metric_files import room_error
    from sessions_app.serving.server import header_timeout

    try:
        header_timeout()
    except ValueError as err:
        print(f"agent-sessions: configuration error: {err}", file=sys.stderr, flush=True)
        sys.exit(4)
    if server.cfg.workers == 1 and not server.cfg.preload_app:
        os.environ.pop(_COUNTERS_ENV, None)  # one worker: its own memory is exact, and cheaper
    # Before the app below makes the master's own metrics files.
    no_room = room_error(_metrics_dir, server.cfg.workers + 1)
    # Its warning of a file without room would only repeat the one line said then.
    logging.getLogger("sessions_app.metric_files").disabled = no_room is not None
    app = create_app_or_exit()
    logging.getLogger("sessions_app.metric_files").disabled = False
    refuse_without_room_for_metrics(server, app, no_room)
    refuse_memory_storage_per_worker(server, app)
    warn_if_limits_per_worker(server, app)
    warn_of_unknown_settings(server)
    serve_metrics(server, app)


def refuse_memory_storage_per_worker(server, app):
    """memory:// with several workers would give each its own store: one line, exit 4."""
    from storage_backends.memory import MemoryStorage

    storage = app.extensions["agent_sessions"].storage
    workers = server.cfg.workers
    if workers > 1 and isinstance(storage, MemoryStorage) and not app.config["MEMORY_PER_WORKER"]:
        print(
            f"agent-sessions: configuration error: STORAGE_URL is memory:// with {workers} "
            "workers, each of which would hold a store of its own: run one worker "
            "(AGENT_SESSIONS_WORKERS=1) or use sqlite:// or postgresql://",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(4)


def refuse_without_room_for_metrics(server, app, no_room):
    """A metrics directory without room for the first files of all: one line, exit 1.

    The master and each worker make their files there (64 KiB each,
    allocated: sessions_app/observability/metric_files.py); a process whose files do not
    fit counts in its memory only, missing from /metrics. ``no_room`` is why
    the room could not be had, or None. Not a configuration error (exit 4):
    once there is room, a restart (systemd's on-failure) works.
    """
    if no_room is None or not app.config["METRICS_ENABLED"]:
        return
    from sessions_app.observability.metric_files import FILES_PER_PROCESS, INITIAL_SIZE

    processes = server.cfg.workers + 1
    need = processes * FILES_PER_PROCESS * INITIAL_SIZE // 1024
    print(
        f"agent-sessions: cannot start: no room in the metrics directory {_metrics_dir} "
        f"for the files of {server.cfg.workers} workers and the master ({need} KiB: "
        f"{no_room.strerror or no_room}); free space there ($TMPDIR, or "
        "PROMETHEUS_MULTIPROC_DIR) or set AGENT_SESSIONS_METRICS_ENABLED=false",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(1)


def warn_of_unknown_settings(server):
    """One line for each AGENT_SESSIONS_* name that sets nothing (a typo), once, in the master."""
    from sessions_app import unknown_environment_names

    for message in unknown_environment_names(os.environ):
        server.log.warning("%s", message)


def serve_metrics(server, app):
    """With METRICS_BIND, the master serves /metrics there, summed over every worker.

    Without it (nor METRICS_TOKEN), say once where the page is: nowhere yet.
    """
    from sessions_app.observability import metrics

    bind = app.config["METRICS_BIND"]
    if not app.config["METRICS_ENABLED"]:
        return
    if not bind:
        if app.config["METRICS_TOKEN"] is None:
            server.log.info("metrics: counted, not served: %s", metrics.TOKEN_UNSET)
        return
    host, _, port = bind.rpartition(":")
    try:
        metrics.serve_bind(host.strip("[]"), int(port), _metrics_dir, app.config["METRICS_TOKEN"])
    except OSError as err:
        print(
            f"agent-sessions: configuration error: METRICS_BIND={bind!r}: {err}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(4)
    server.log.info("metrics served on http://%s/metrics", bind)


def child_exit(server, worker):
    """A worker is gone: its counts go into the merged files, its live gauges go with it."""
    from sessions_app.observability.metric_files import fold

    fold(_metrics_dir, worker.pid)


def warn_if_limits_per_worker(server, app):
    """Say loudly when rate limits are counted per worker and there are several.

    On memory:// the workers share the server's counters file, so this is only
    said for a strategy the file does not keep (moving-window,
    sliding-window-counter), which stays in each worker's memory.
    """
    workers = server.cfg.workers
    if workers > 1 and app.extensions["agent_sessions"].limits.per_process:
        server.log.warning(
            "RATE LIMITS ARE PER WORKER: RATELIMIT_STORAGE_URI is memory:// with %d workers "
            "and RATELIMIT_STRATEGY=%s, which is kept in each worker's memory, so each limit "
            "admits up to %d times its count on this host. Use RATELIMIT_STRATEGY=fixed-window "
            "(counted across the workers) or AGENT_SESSIONS_RATELIMIT_STORAGE_URI="
            "redis://HOST:6379/0.",
            workers,
            app.config["RATELIMIT_STRATEGY"],
            workers,
        )
