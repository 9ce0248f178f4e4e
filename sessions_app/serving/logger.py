"""The gunicorn logger that ``gunicorn.conf.py`` names.

``EscapingLogger`` logs the path as the client sent it (percent-encoded) and
escapes control characters in every field of the access log and in every
error-log message, so no client can write a line or a terminal sequence into
either log. Lines gunicorn writes about a request the worker refuses carry
that answer's ``request_id`` (``tagged``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from typing import Any

from gunicorn.glogging import Logger

from ..observability import logs
from ..text import escape_controls


class EscapingFormatter(logging.Formatter):
    """Control characters in a message or a traceback are written as escapes."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_controls(record.message, backslash=False)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        # An exception's message may hold a newline of the client's: escaped
        # before the traceback is laid out, so only the layout's newlines stay.
        report = traceback.TracebackException(*ei)
        seen = set()
        pending = [report]
        while pending:
            current = pending.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            if isinstance(getattr(current, "_str", None), str):
                current._str = escape_controls(current._str, backslash=False)
            pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        lines = "".join(report.format()).rstrip("\n").split("\n")
        return "\n".join(escape_controls(line, backslash=False) for line in lines)


class EscapingLogger(Logger):
    """gunicorn's logger; every access-log field and error-log line on one line, as text."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self.tagging = threading.local()
        self.json_lines = logs.json_format()
        if self.json_lines:  # LOG_FORMAT=json: sessions_app/logs.py formats both logs
            logs.use_json(self)
            return
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False) and handler.formatter is not None:
                    handler.setFormatter(
                        EscapingFormatter(handler.formatter._fmt, handler.formatter.datefmt)
                    )

    @contextlib.contextmanager
    def tagged(self, rid: str) -> Any:
        """Within it, this thread's error-log lines end with ``request_id=`` (a field in
        JSON): gunicorn's own lines about a request it refuses carry the answer's id."""
        self.tagging.rid = rid
        try:
            yield
        finally:
            self.tagging.rid = None

    def _tag(self, msg: Any, kwargs: dict) -> Any:
        rid = getattr(self.tagging, "rid", None)
        if rid is None:
            return msg
        kwargs["extra"] = {**kwargs.get("extra", {}), "request_id": rid}
        return f"{msg} request_id={rid}"

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().warning(self._tag(msg, kwargs), *args, **kwargs)

    def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().error(self._tag(msg, kwargs), *args, **kwargs)

    def exception(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().exception(self._tag(msg, kwargs), *args, **kwargs)

    def access(self, resp: Any, req: Any, environ: dict, request_time: Any) -> None:
        if getattr(self, "json_lines", False):
            if self.access_log_enabled:
                logs.access(self, resp, req, environ, request_time)
            return
        super().access(resp, req, environ, request_time)

    def atoms(self, resp: Any, req: Any, environ: dict, request_time: Any) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        # The path as received, percent-encoded (PATH_INFO is decoded).
        atoms["U"] = environ.get("RAW_URI", "").partition("?")[0] or "-"
        return {
            name: escape_controls(value) if isinstance(value, str) else value
            for name, value in atoms.items()
        }
