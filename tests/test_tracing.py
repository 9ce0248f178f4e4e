"""Traces (otel extra): a server span per request, storage and rate-limit spans beneath it."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

import pytest
from flask import request
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sessions_app import ConfigError, create_app
from sessions_app.observability import logs, tracing
from tests.conftest import Keys

AGENT = "support-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> Any:
    # The process's one global provider (OpenTelemetry allows it to be set once).
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(sdk)
    return sdk


@pytest.fixture
def traced_app(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    app = create_app(
        {
            "TESTING": True,
            "STORAGE_URL": f"sqlite:///{tmp_path}/s.db",
            "TRACING_ENABLED": True,
            "LOG_FORMAT": "json",
        }
    )
    yield app
    monkeypatch.setattr(tracing, "_active", False)


def test_a_create_is_a_server_span_with_storage_and_rate_limit_children(traced_app):
    client = traced_app.test_client()
    admin = Keys(traced_app).headers(admin=True)
    environs: list[dict] = []  # what gunicorn would hand its logger: the app's own environ
    traced_app.before_request(lambda: environs.append(request.environ))
    assert client.post("/v2/agents", json={"key": AGENT, "name": "S"}, headers=admin).status_code
    EXPORTER.clear()
    response = client.post(SESSIONS, json={"key": "abc", "name": "x"}, headers=admin)
    assert response.status_code == 201
    spans = EXPORTER.get_finished_spans()
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.attributes["http.route"] == "/v2/agents/<record_key:agent_key>/sessions"
    children = {s.name: s for s in spans if s.parent is not None}
    create = children["storage.create_session"]
    assert create.parent.span_id == server.context.span_id
    assert create.context.trace_id == server.context.trace_id
    assert create.attributes["db.system"] == "sqlite"
    assert children["rate_limit.check"].parent.span_id == server.context.span_id
    trace_id = format(server.context.trace_id, "032x")
    # The access line gunicorn's logger writes for this request carries the trace id.
    line = access_line(response, environs[-1])
    assert line["trace_id"] == trace_id
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert line["status"] == 201
    assert line["route"] == "/v2/agents/<record_key:agent_key>/sessions"


def access_line(response: Any, environ: dict) -> dict[str, Any]:
    """The JSON access line of ``response``, written by the project's gunicorn logger."""
    from gunicorn.config import Config

    from sessions_app.serving.logger import EscapingLogger

    captured: list[str] = []

    class Stream:
        def write(self, text: str) -> None:
            captured.append(text)

        def flush(self) -> None:
            pass

    cfg = Config()
    cfg.set("accesslog", "-")
    real_stdout, sys.stdout = sys.stdout, Stream()
    saved = logs.json_format
    try:
        logs.json_format = lambda: True  # AGENT_SESSIONS_LOG_FORMAT=json
        glogger = EscapingLogger(cfg)
    finally:
        sys.stdout = real_stdout
        logs.json_format = saved
    try:

        class Answer:
            status = f"{response.status_code} CREATED"
            headers = list(response.headers.items())
            sent = len(response.data)

        environ.setdefault("RAW_URI", environ["PATH_INFO"])
        glogger.access(Answer(), None, environ, dt.timedelta(milliseconds=3))
    finally:
        logging.captureWarnings(False)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logs.ToLog)]:
            root.removeHandler(handler)
    (line,) = "".join(captured).splitlines()
    return json.loads(line)


def test_without_the_setting_or_an_endpoint_nothing_is_traced(tmp_path, monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    app = create_app({"TESTING": True, "STORAGE_URL": "memory://"})
    assert not isinstance(app.extensions["agent_sessions"].storage, tracing.TracedStorage)
    EXPORTER.clear()
    assert app.test_client().get("/healthz").status_code == 200
    assert EXPORTER.get_finished_spans() == ()


def test_an_endpoint_turns_tracing_on(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    app = create_app({"TESTING": True, "STORAGE_URL": "memory://"})
    monkeypatch.setattr(tracing, "_active", False)
    assert isinstance(app.extensions["agent_sessions"].storage, tracing.TracedStorage)


def test_not_installed_is_off_and_imports_nothing(monkeypatch):
    """Without the extra: nothing wrapped; asking for traces is a configuration error."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setattr(tracing, "installed", lambda: False)
    app = create_app({"TESTING": True, "STORAGE_URL": "memory://"})
    assert not isinstance(app.extensions["agent_sessions"].storage, tracing.TracedStorage)
    with pytest.raises(ConfigError, match=r"agent-sessions\[otel\]"):
        create_app({"TESTING": True, "STORAGE_URL": "memory://", "TRACING_ENABLED": True})
