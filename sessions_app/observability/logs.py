"""JSON logs (``LOG_FORMAT=json``): one JSON object per line, for a log pipeline.

Under gunicorn, ``serving.logger.EscapingLogger`` hands its error and access logs to
:func:`use_json`: every line either writes (gunicorn's own, the service's
loggers, which ``gunicorn.conf.py`` sends to the error log, and any library's
warnings) is formatted by python-json-logger's formatter. Each line has
``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``; a line
written while a request is served also has ``request_id``, ``method``,
``route``, ``key_id`` and ``agent_key`` when known, and ``trace_id`` when a
trace is recorded. An access line has those and ``status``, ``duration_ms``,
``path`` (percent-encoded as sent, without the query string), ``bytes``,
``remote_addr`` and ``user_agent``.

The request id is the one the answer carried in ``X-Request-ID``. The key id
is that of the key that authenticated; nothing of a secret is ever written
(nor the query string, nor any header but the user agent). JSON escapes
control characters, so no client can write a line of its own.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import traceback
from typing import Any

from flask import Flask, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter
from werkzeug.wrappers import Response

from ..corridor.request_id import request_id

LOG_FORMAT_ENV = "AGENT_SESSIONS_LOG_FORMAT"
# What the service puts in a request's WSGI environ for the access line.
ENVIRON_KEY = "agent_sessions.log"


def json_format() -> bool:
    """Whether ``AGENT_SESSIONS_LOG_FORMAT`` asks for JSON (checked by gunicorn.conf.py)."""
    return os.environ.get(LOG_FORMAT_ENV, "text").strip().lower() == "json"


def request_fields() -> dict[str, Any]:
    """What the current request tells about itself: id, method, route, key id, agent key."""
    fields: dict[str, Any] = {"request_id": request_id(), "method": request.method}
    rule = request.url_rule
    if rule is not None:
        fields["route"] = rule.rule
    key = g.get("api_key")
    if key is not None:
        fields["key_id"] = key.id
    agent_key = (request.view_args or {}).get("agent_key")
    if agent_key is not None:
        fields["agent_key"] = agent_key
    trace_id = _trace_id()
    if trace_id is not None:
        fields["trace_id"] = trace_id
    return fields


def _trace_id() -> str | None:
    from . import tracing  # only imports OpenTelemetry when it is on

    return tracing.current_trace_id() if tracing.active() else None


class JsonFormatter(_JsonFormatter):
    """python-json-logger's formatter: time, level, logger, message, the request's fields."""

    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger"},
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(
            timespec="milliseconds"
        )
        super().add_fields(log_data, record, message_dict)
        if has_request_context() and "request_id" not in log_data:
            for name, value in request_fields().items():
                log_data.setdefault(name, value)


class ToLog(logging.Handler):
    """Hands every record to another logger's handlers (a library's lines to the error log)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target.isEnabledFor(record.levelno):
            self.target.handle(record)


def use_json(glogger: Any) -> None:
    """Make gunicorn's logger (``glogger``) write JSON lines, on both of its logs."""
    for log in (glogger.error_log, glogger.access_log):
        for handler in log.handlers:
            if getattr(handler, "_gunicorn", False):
                handler.setFormatter(JsonFormatter())
    # Whatever else logs (Python's warnings, OpenTelemetry's exporter) would reach
    # the last-resort handler, as a plain line: it goes to the error log instead.
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not any(isinstance(h, ToLog) for h in root.handlers):
        root.addHandler(ToLog(glogger.error_log))


def access(glogger: Any, resp: Any, req: Any, environ: dict, request_time: dt.timedelta) -> None:
    """One access line as JSON: the request's fields, its status and duration."""
    status = resp.status
    if isinstance(status, str):
        status = status.split(None, 1)[0]
    fields: dict[str, Any] = {
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("RAW_URI", "").partition("?")[0] or "-",
        "status": int(status) if str(status).isdigit() else status,
        "duration_ms": round(request_time.total_seconds() * 1000, 3),
        "bytes": getattr(resp, "sent", None),
        "remote_addr": environ.get("REMOTE_ADDR"),
        "user_agent": environ.get("HTTP_USER_AGENT"),
    }
    for name, value in resp.headers:
        if name.lower() == "x-request-id":
            fields["request_id"] = value
    # What the app knew (route, key id, agent key, trace id); the answer's id wins.
    for name, value in environ.get(ENVIRON_KEY, {}).items():
        fields.setdefault(name, value)
    message = f"{fields['method']} {fields['path']} {fields['status']}"
    try:
        glogger.access_log.info(message, extra=fields)
    except Exception:  # noqa: BLE001 - as gunicorn's own access(): the answer is sent already
        glogger.error(traceback.format_exc())


def init_app(app: Flask) -> None:
    """With ``LOG_FORMAT=json``, each answer leaves its fields for the access line."""
    if app.config["LOG_FORMAT"] == "json":
        app.after_request(annotate)


def annotate(response: Response) -> Response:
    request.environ[ENVIRON_KEY] = request_fields()
    return response
