"""Time, JSON and filter encodings shared by the web layer and every backend."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import re2


def utcnow() -> dt.datetime:
    """The current time in UTC, truncated to milliseconds (the wire precision)."""
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def format_ts(value: dt.datetime | None) -> str | None:
    """Fixed-width UTC text with milliseconds and a Z, so that text order is time order."""
    if value is None:
        return None
    if value.tzinfo is not dt.UTC:
        value = value.astimezone(dt.UTC)
    # The year padded to four digits, which strftime("%Y") does not do; the same text
    # as isoformat(timespec="milliseconds") with Z for +00:00, at about half its cost.
    return _TS_TEXT % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond // 1000,
    )


_TS_TEXT = "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ"


def parse_ts(value: str | None) -> dt.datetime | None:
    """The inverse of :func:`format_ts` (``fromisoformat`` reads the Z since Python 3.11)."""
    if value is None:
        return None
    return dt.datetime.fromisoformat(value)


# Compact JSON text with non-ASCII characters as they are, from one encoder built
# once (json.dumps with options builds a new encoder on every call).
dump_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


try:  # the "fast" extra
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - the test extra installs it
    _fast_loads = None

_load_json = json.JSONDecoder().decode
# orjson reads an integer past 64 bits as a float, where json.loads keeps it whole:
# text with a run of 19 digits (any integer orjson might not hold) is read by json.
_LONG_DIGITS = re.compile(r"[0-9]{19}").search
_LONG_DIGITS_BYTES = re.compile(rb"[0-9]{19}").search


def load_json(text: str | bytes | memoryview) -> Any:
    """A stored JSON value, as ``json.loads`` reads it, through orjson when installed.

    orjson is several times faster on a column of a page; what it reads otherwise
    than ``json`` (long integers) or refuses (NaN, a number past the double's
    range, a lone surrogate) is read by ``json`` instead. Bytes may come as a
    memoryview (a driver's buffer), read without a copy.
    """
    long_digits = _LONG_DIGITS if isinstance(text, str) else _LONG_DIGITS_BYTES
    if _fast_loads is not None and long_digits(text) is None:
        try:
            return _fast_loads(text)
        except ValueError:
            pass
    return _load_json(text if isinstance(text, str) else str(text, "utf-8"))


# The list filter: RE2 matches in linear time, and never writes to stderr (with
# log_errors on, every invalid pattern and every DFA that runs out of memory is
# a line in the server's error log, with text the client chose).
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 1 << 20  # a pattern that needs more is rejected, not run
_RE2_OPTIONS.log_errors = False


def compile_filter(pattern: str, max_length: int) -> Any:
    """A compiled RE2 pattern with a ``search`` method.

    Raises ValueError, with a message for the client, for a pattern longer than
    ``max_length`` or one RE2 does not accept.
    """
    if len(pattern) > max_length:
        raise ValueError(f"At most {max_length} characters.")
    try:
        return re2.compile(pattern, options=_RE2_OPTIONS)
    except re2.error:
        raise ValueError("Not a valid regular expression.") from None


def text_matches(pattern: Any, name: str, description: str | None) -> bool:
    """What a listing's ``matches`` filter means: the pattern found in the name or description."""
    return bool(pattern.search(name) or (description and pattern.search(description)))


def filter_rows(
    rows: Iterable[Any],
    *,
    limit: int,
    matches: Any,
    text: Callable[[Any], tuple[str, str | None]],
    position: Callable[[Any], int],
    max_rows: int,
    max_seconds: float,
) -> tuple[list[Any], int | None]:
    """The rows ``matches`` selects, up to ``limit + 1``, within a budget of work.

    Returns the rows and, when the budget (``max_rows`` rows read or
    ``max_seconds`` spent) ran out first, the position of the last row read:
    the page ends there and the next one continues after it. Otherwise the
    position is None, and the rows say by their number whether more follow.
    """
    picked: list[Any] = []
    deadline = time.monotonic() + max_seconds
    read = 0
    for row in rows:
        name, description = text(row)
        if text_matches(matches, name, description):
            picked.append(row)
            if len(picked) > limit:
                return picked, None
        read += 1
        if read >= max_rows or time.monotonic() > deadline:
            return picked, position(row)
    return picked, None


def same_json(a: Any, b: Any) -> bool:
    """Whether two JSON values are one: the same text, as stored and answered.

    ``==`` is not the test: in Python ``True == 1``, ``2 == 2.0`` and
    ``-0.0 == 0.0``, and each pair is two different JSON values.
    """
    return dump_json(a) == dump_json(b)


def merge_patch(target: Any, patch: Any) -> Any:
    """``target`` with the JSON merge patch ``patch`` applied (RFC 7386); neither is changed.

    An object patch merges key by key, recursively, and a ``None`` (JSON null)
    removes its key; any other patch replaces the target whole.
    """
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def fields_bytes(events: Iterable[Any]) -> int:
    """The bytes of the events' fields as stored (compact JSON), in all: what a
    bounded read counts against its byte bound."""
    return sum(len(dump_json(event.fields).encode()) for event in events)


# The metadata index: which sessions have a top-level metadata key with a value.

#: Keys and values up to this many characters are indexed as they are; longer ones by
#: their digest, which is longer than this, so the two forms never meet.
INDEX_TEXT_MAX = 64


def index_text(text: str) -> str:
    """A metadata key or value as the index holds it: bounded, whatever its length."""
    if len(text) <= INDEX_TEXT_MAX:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def metadata_value_text(value: Any) -> str | None:
    """What a query's value must equal for ``value`` to match: a string itself, a number
    or boolean its JSON text (``17``, ``true``); None for null, objects and arrays."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return dump_json(value)
    return None


def metadata_index_entries(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The index's (key, value) rows for a session's metadata, as a mapping."""
    entries = {}
    for key, value in metadata.items():
        text = metadata_value_text(value)
        if text is not None:
            entries[index_text(key)] = index_text(text)
    return entries


def metadata_conditions(query: Mapping[str, str]) -> list[tuple[str, str]]:
    """A query's ``metadata.KEY=VALUE`` pairs as the index holds them."""
    return [(index_text(key), index_text(value)) for key, value in query.items()]


def metadata_matches(metadata: Mapping[str, Any], query: Mapping[str, str]) -> bool:
    """Whether ``metadata`` has every key of ``query`` with a value matching its text."""
    return all(
        key in metadata and metadata_value_text(metadata[key]) == value
        for key, value in query.items()
    )
