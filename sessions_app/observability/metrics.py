"""Prometheus metrics: what the service did, counted where each thing happens.

Every metric is named ``agent_sessions_*`` and is built per app (kept in
``app.extensions["agent_sessions"].metrics``):

- ``http_requests_total{route, method, status}`` and
  ``http_request_duration_seconds{route, method}`` (a histogram), counted by
  the corridor (:func:`request_started`, :func:`request_finished`). ``route``
  is the URL rule (``/v2/agents/<record_key:agent_key>/sessions``), never the
  path: a request no rule matched is ``unmatched``; a method outside HTTP's
  usual ones is ``other``. ``http_requests_in_progress`` is a gauge.
- ``rate_limit_decisions_total{limit, decision}``: ``allowed``, ``limited``,
  ``failed_open``, ``failed_closed``, by limit (``session_create``,
  ``default``, ``admin``, ``auth_failure``), counted by ``rate_limits``.
  ``rate_limit_near_total{limit, key_id}``: counted requests that left an API
  key with 10% or less of its budget (refusals included).
- ``storage_errors_total{backend, status}``: storage failures answered 503
  (``Unavailable``) or 500 (an unexpected exception raised in the storage
  layer); ``unavailable_total{backend}``: every 503, by what was unavailable
  (the storage backend, or ``rate_limit_storage``). Counted by ``errors``.
- ``sessions_created_total``, ``events_written_total``: counted by the views
  (:func:`session_created`, :func:`events_written`).
- ``auth_failures_total{reason}``: ``missing``, ``malformed``,
  ``unknown_key``, ``wrong_secret``, ``expired``, ``revoked`` (see
  ``auth.check_token``).

Under gunicorn, ``gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` (a
fresh directory) before anything imports ``prometheus_client``: every worker
writes its values to memory-mapped files there, ``GET /metrics`` sums them
over the workers (the gauge over live workers only, ``livesum``), and a
worker that exits has its gauge files removed. Those files are made by
:class:`.metric_files.AllocatedMmapedDict`, which allocates
their blocks before writing them: a full filesystem costs the counts of a
process (one warning), never the process. Anywhere else (the CLI, an app
embedding the blueprint, the tests) the app has a registry of its own, in
process.

``METRICS_ENABLED`` (default: on for ``create_app``, off for a host's
``init_app``) switches all of it; off, nothing is counted and no hook runs.
``METRICS_BIND`` serves the page on an address of its own, from the gunicorn
master, instead of at ``/metrics`` of the service. ``METRICS_TOKEN`` is the
bearer token the page needs wherever it is served; the service's own
``/metrics`` answers 401 without it, and always when none is set.

A scrape under gunicorn reads every process's files (tens of milliseconds and
tens of kilobytes): the page is rendered at most once a
``SCRAPE_CACHE_SECONDS`` on a host, by one scraper at a time, and the others
read that page (:func:`page`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import socket
import threading
import time
import wsgiref.simple_server
from socketserver import ThreadingMixIn
from typing import Any

from flask import Flask, Request, current_app, request
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized
from werkzeug.wrappers import Response

from . import metric_files

# Before any value opens a file: its pages allocated first, never a SIGBUS on a full disk.
metric_files.install()

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Where a request's start (time.perf_counter) waits in its WSGI environ.
STARTED = "agent_sessions.metrics_started"
UNMATCHED = "unmatched"
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# Latency buckets (seconds): a create takes about a millisecond, a timeout 30 s.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The limit names, by the first part of the limit key (see RateLimits.count).
LIMIT_NAMES = {
    "create": "session_create",
    "api": "default",
    "admin": "admin",
    "auth-failure": "auth_failure",
}
DECISIONS = ("allowed", "limited", "failed_open", "failed_closed")
AUTH_FAILURE_REASONS = ("missing", "malformed", "unknown_key", "wrong_secret", "expired", "revoked")
# A key "near" its limit has used at least this share of it.
NEAR_LIMIT = 0.9
RATE_LIMIT_STORAGE = "rate_limit_storage"
# How old a page a scrape may get: one render a second, however many scrapers.
SCRAPE_CACHE_SECONDS = 1.0
# The page rendered last, in the metrics directory (not *.db: the collector reads only those).
PAGE_FILE = "scrape.page"
TOKEN_MISSING = (
    "GET /metrics needs the bearer token set in AGENT_SESSIONS_METRICS_TOKEN "
    "(Authorization: Bearer TOKEN)."
)
TOKEN_UNSET = (
    "/metrics is not served without a token: set AGENT_SESSIONS_METRICS_TOKEN, "
    "or AGENT_SESSIONS_METRICS_BIND for an address of its own."
)


def multiprocess_dir() -> str | None:
    """The directory the workers share values in, when running under gunicorn."""
    return os.environ.get(MULTIPROC_ENV) or None


def backend_name(storage: Any) -> str:
    """``sqlite``, ``postgres``, ``memory``: the module the storage class lives in."""
    return type(storage).__module__.rsplit(".", 1)[-1]


class Metrics:
    """The app's metric objects, and children cached per label set for the hot path."""

    def __init__(self, backend: str):
        self.backend = backend
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "agent_sessions_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ("route", "method", "status"),
            registry=reg,
        )
        self.duration = Histogram(
            "agent_sessions_http_request_duration_seconds",
            "Time from the first hook to the answer, by route template and method.",
            ("route", "method"),
            buckets=BUCKETS,
            registry=reg,
        )
        self.in_progress = Gauge(
            "agent_sessions_http_requests_in_progress",
            "Requests being answered now (summed over live workers).",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.decisions = Counter(
            "agent_sessions_rate_limit_decisions",
            "Rate-limit decisions, by limit and outcome.",
            ("limit", "decision"),
            registry=reg,
        )
        self.near = Counter(
            "agent_sessions_rate_limit_near",
            f"Requests that left an API key with {1 - NEAR_LIMIT:.0%} or less of a limit.",
            ("limit", "key_id"),
            registry=reg,
        )
        self.storage_errors = Counter(
            "agent_sessions_storage_errors",
            "Storage failures, by backend and the status answered (503 or 500).",
            ("backend", "status"),
            registry=reg,
        )
        self.unavailable = Counter(
            "agent_sessions_unavailable",
            "Answers 503, by what was unavailable (a storage backend or the rate-limit storage).",
            ("backend",),
            registry=reg,
        )
        self.sessions_created = Counter(
            "agent_sessions_sessions_created", "Sessions created.", registry=reg
        )
        self.events_written = Counter(
            "agent_sessions_events_written", "Session events written.", registry=reg
        )
        self.auth_failures = Counter(
            "agent_sessions_auth_failures",
            "Failed authentications, by reason (never the key).",
            ("reason",),
            registry=reg,
        )
        # Every series that can exist without a key id exists from the start, at 0,
        # so rates and ratios have a series to read before the first event.
        for name in LIMIT_NAMES.values():
            for decision in DECISIONS:
                self.decisions.labels(name, decision)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        for status in ("500", "503"):
            self.storage_errors.labels(backend, status)
        self.unavailable.labels(backend)
        # (route, method, status): that answer's counter child and its histogram child.
        self._requests: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._decisions: dict[tuple[str, str], Any] = {}

    # The hot path: label children looked up once per label set (labels() takes a
    # lock and builds a key of its own on every call).

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "other"  # a client's made-up method is not a series of its own
        key = (route, method, status)
        children = self._requests.get(key)
        if children is None:
            children = self._requests[key] = (
                self.requests.labels(route, method, str(status)),
                self.duration.labels(route, method),
            )
        counter, histogram = children
        counter.inc()
        histogram.observe(seconds)

    def decision(self, kind: str, decision: str) -> None:
        key = (kind, decision)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.decisions.labels(
                LIMIT_NAMES.get(kind, kind), decision
            )
        child.inc()

    def window(self, kind: str, key_id: str | None, window: Any) -> None:
        """A counted request (a ``rate_limits.Window``): allowed or limited, and near the limit."""
        self.decision(kind, "limited" if window.over else "allowed")
        if key_id is not None and window.remaining <= (1 - NEAR_LIMIT) * window.limit:
            self.near.labels(LIMIT_NAMES.get(kind, kind), key_id).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The page in Prometheus' text format, summed over workers under gunicorn."""
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
        return page(path), CONTENT_TYPE_PLAIN_0_0_4


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry reading every worker's files in ``path`` (built per scrape, as documented)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def page(path: str) -> bytes:
    """The page summed over every process's files in ``path``, at most ``SCRAPE_CACHE_SECONDS`` old.

    Under the directory's lock (``metric_files.locked``, which a dead worker's
    fold takes too): the scraper that holds it reads the page rendered last,
    when it is fresh, or renders it and leaves it there for the others, who
    wait for it rather than render it too. A page that cannot be kept (no
    room) is answered all the same.
    """
    cached = os.path.join(path, PAGE_FILE)
    with metric_files.locked(path):
        with contextlib.suppress(OSError):
            if time.time() - os.stat(cached).st_mtime < SCRAPE_CACHE_SECONDS:
                with open(cached, "rb") as stream:
                    return stream.read()
        body = generate_latest(multiprocess_registry(path))
        partial = f"{cached}.{os.getpid()}.{threading.get_ident()}"
        try:
            with open(partial, "wb") as stream:
                stream.write(body)
            os.replace(partial, cached)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        return body


def token_error(token: str | None, authorization: str | None) -> str | None:
    """Why a scrape with this ``Authorization`` field may not read the page, or None.

    The token is compared in constant time (``hmac.compare_digest``).
    """
    if token is None:
        return TOKEN_UNSET
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        return TOKEN_MISSING
    return None


class _BindServer(ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the library's name
        pass  # a scrape every few seconds is not worth a line


def serve_bind(host: str, port: int, path: str, token: str | None) -> None:
    """Serve the page summed over ``path``'s files at http://HOST:PORT/metrics, in a thread.

    With ``token``, a scrape needs it, as on the service's own ``/metrics``;
    other paths are 404. Raises OSError when the address cannot be bound.
    """

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            return _bind_error(start_response, 404, "not_found", "Only /metrics is served here.")
        if token is not None and token_error(token, environ.get("HTTP_AUTHORIZATION")):
            return _bind_error(start_response, 401, "unauthorized", TOKEN_MISSING)
        body = page(path)
        start_response(
            "200 OK",
            [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4), ("Content-Length", str(len(body)))],
        )
        return [body]

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv6 too
    server_class = type("BindServer", (_BindServer,), {"address_family": family})
    server = wsgiref.simple_server.make_server(
        host, port, app, server_class=server_class, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()


def _bind_error(start_response: Any, status: int, error: str, message: str) -> list[bytes]:
    """An error of the service's shape, from the master's metrics address."""
    rid = os.urandom(16).hex()
    body = json.dumps({"error": error, "messages": [message], "request_id": rid}).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("X-Request-ID", rid),
        ("X-Content-Type-Options", "nosniff"),
    ]
    if status == 401:
        headers.append(("WWW-Authenticate", 'Bearer realm="metrics"'))
    start_response(f"{status} {'Unauthorized' if status == 401 else 'Not Found'}", headers)
    return [body]


def init_app(app: Flask, service: Any) -> None:
    """Count this app's requests and serve ``/metrics``, when ``METRICS_ENABLED``."""
    enabled = app.config["METRICS_ENABLED"]
    if not enabled:
        return
    metrics = service.metrics = Metrics(backend_name(service.storage))
    service.limits.metrics = metrics
    # The corridor's first and last hooks (http.start_request, http.contract_headers)
    # call request_started and request_finished: no hooks of their own, each of which
    # Flask dispatches at a cost. The teardown closes what an unhandled exception
    # left open.
    app.teardown_request(request_torn_down)
    if not app.config["METRICS_BIND"]:
        app.add_url_rule("/metrics", "agent_sessions_metrics", metrics_page)


def metrics_page() -> Response:
    """The metrics in Prometheus' text format (outside /v2, with METRICS_TOKEN, not a key)."""
    app = current_app._get_current_object()
    refused = token_error(app.config["METRICS_TOKEN"], request.headers.get("Authorization"))
    if refused is not None:  # the service's handler answers it in the error shape
        raise Unauthorized(
            refused, www_authenticate=WWWAuthenticate("bearer", {"realm": "metrics"})
        )
    body, content_type = app.extensions["agent_sessions"].metrics.exposition()
    return app.response_class(body, 200, {"Content-Type": content_type})


# Prometheus' own format, for operators: not an operation of the API's OpenAPI document.
metrics_page.openapi_hidden = True  # type: ignore[attr-defined]


# Hooks of the corridor (sessions_app/corridor/http.py). They are handed the request object
# itself (``request._get_current_object()``): a read through one of Flask's proxies
# (``request.url_rule``, ``g.pop``) fails on the proxy before its __getattr__ finds
# the object, several times the cost of the read, and the hot path made five.


def request_started(metrics: Metrics, req: Request) -> None:
    """A request enters the corridor: it is in progress, and its clock starts."""
    # In the request's own environ (the WSGI place for per-request extension data):
    # request_finished pops it, so a request is never counted twice.
    req.environ[STARTED] = time.perf_counter()
    metrics.in_progress.inc()


def request_finished(metrics: Metrics, req: Request, status: int) -> None:
    """The request's answer is ``status``: counted once, by its route template and method."""
    started = req.environ.pop(STARTED, None)
    if started is None:
        return  # counted already, or never started (a bare test request context)
    metrics.in_progress.dec()
    rule = req.url_rule
    metrics.observe(
        rule.rule if rule is not None else UNMATCHED,
        req.method,
        status,
        time.perf_counter() - started,
    )


def request_torn_down(exc: BaseException | None) -> None:
    """Count as a 500 a request whose after-request hooks never ran (an exception escaped)."""
    if exc is None:
        # Dispatch returned, so the after-request hooks ran and counted it: no lookup.
        return
    request_finished(current(), request._get_current_object(), 500)


# What the rooms of the service count. Each is a no-op when metrics are off.


def current() -> Metrics | None:
    # The app itself, not the proxy: a read through the proxy fails on it first.
    return current_app._get_current_object().extensions["agent_sessions"].metrics


def session_created(metrics: Metrics | None) -> None:
    """One session stored (call after the storage call succeeded), by the app's ``metrics``."""
    if metrics is not None:
        metrics.sessions_created.inc()


def events_written(count: int = 1) -> None:
    """``count`` session events stored (call after the storage call succeeded)."""
    metrics = current()
    if metrics is not None and count > 0:
        metrics.events_written.inc(count)


def auth_failure(reason: str) -> None:
    metrics = current()
    if metrics is not None:
        metrics.auth_failures.labels(reason).inc()


def storage_error(status: int, source: str | None = None) -> None:
    """A storage failure answered ``status``; ``source`` names a non-storage cause of a 503."""
    metrics = current()
    if metrics is None:
        return
    if source is None:
        metrics.storage_errors.labels(metrics.backend, str(status)).inc()
    if status == 503:
        metrics.unavailable.labels(source or metrics.backend).inc()
