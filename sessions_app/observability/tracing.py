"""Traces (the optional ``otel`` extra): a server span per request, a child span per storage call.

With ``TRACING_ENABLED`` (default: when OpenTelemetry is installed and
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set), OpenTelemetry's Flask instrumentation opens a server span for each
request; each storage call runs in a child span ``storage.<method>``
(``db.system`` the backend), and the rate-limit check in ``rate_limit.check``.
Spans go to the global tracer provider: when none is set and an OTLP endpoint
is, one is built exporting there over OTLP/HTTP (in batches, from each
process), named by ``OTEL_SERVICE_NAME`` (default ``agent-sessions``). The
JSON log lines carry the trace id (``sessions_app/observability/logs.py``).

Without the extra nothing of OpenTelemetry is imported, and nothing is wrapped.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

from flask import Flask

from config import ConfigError
from storage_backends import Storage

log = logging.getLogger("sessions_app.tracing")  # the name log filters select it by

ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
INSTRUMENTATION = "agent_sessions"

_active = False  # whether any app of this process traces: the log lines look for a trace id


def installed() -> bool:
    """Whether the otel extra is installed (looked up without importing it)."""
    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("opentelemetry.sdk", "opentelemetry.instrumentation.flask")
        )
    except ModuleNotFoundError:
        return False


def wanted(setting: bool | None) -> bool:
    if setting is None:
        return any(os.environ.get(name) for name in ENDPOINT_ENVS) and installed()
    return setting


def active() -> bool:
    return _active


def current_trace_id() -> str | None:
    """The current span's trace id in hex (as OTLP and the log lines write it), or None."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def init_app(app: Flask) -> None:
    """Trace this app's requests, storage calls and rate-limit checks, when wanted."""
    global _active
    if not wanted(app.config["TRACING_ENABLED"]):
        return
    if not installed():
        raise ConfigError("TRACING_ENABLED needs OpenTelemetry: install agent-sessions[otel]")
    from opentelemetry import trace
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    provider = ensure_provider()
    FlaskInstrumentor().instrument_app(app, tracer_provider=provider)
    tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=provider)
    service = app.extensions["agent_sessions"]
    service.storage = TracedStorage(service.storage, tracer)
    limits = service.limits
    limits.count = traced(tracer, "rate_limit.check", limits.count)
    _active = True


def ensure_provider() -> Any:
    """The global tracer provider; one exporting over OTLP when none is set and an endpoint is."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider) and any(
        os.environ.get(name) for name in ENDPOINT_ENVS
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = os.environ.get("OTEL_SERVICE_NAME") or "agent-sessions"
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        provider = trace.get_tracer_provider()
    return provider


def traced(tracer: Any, name: str, call: Callable, **attributes: Any) -> Callable:
    @functools.wraps(call)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with tracer.start_as_current_span(name, attributes=attributes):
            return call(*args, **kwargs)

    return wrapper


# The storage interface's operations: every abstract method of Storage, plus check().
STORAGE_CALLS = frozenset(
    name
    for name, member in inspect.getmembers(Storage, inspect.isfunction)
    if getattr(member, "__isabstractmethod__", False) or name == "check"
)


class TracedStorage:
    """The app's storage, each operation of the interface in a span of its own."""

    def __init__(self, storage: Storage, tracer: Any) -> None:
        self._storage = storage
        self._tracer = tracer
        self._system = type(storage).__module__.rsplit(".", 1)[-1]

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._storage, name)
        if name in STORAGE_CALLS:
            value = traced(self._tracer, f"storage.{name}", value, **{"db.system": self._system})
            setattr(self, name, value)  # wrapped once
        return value
