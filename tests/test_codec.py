"""The storage codec's fast paths read and write what the standard library's do."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from storage_backends.base import ApiKey, Event, Grant
from storage_backends.codec import dump_json, format_ts, load_json
from storage_backends.memory_tables import copy_record
from storage_backends.sql.schema import event_page_query, limit_clause

TEXTS = [
    '{"a":1,"b":[true,false,null],"c":{"d":"\\u00e9\\n"}}',
    "123456789012345678901234567890",  # past 64 bits: a float for orjson, an int for json
    "-9223372036854775808",
    "18446744073709551615",
    "[1e400]",  # past the double's range: orjson refuses it, json reads infinity
    "NaN",
    '"\\ud800"',  # a lone surrogate
    "-0.0",
    "1e16",
    "0.30000000000000004",
    "0.12345678901234567890123",
    '{"a":1,"a":2}',
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("kind", [str, bytes, memoryview])
def test_load_json_reads_what_json_loads_reads(text: str, kind: type) -> None:
    data = text if kind is str else kind(text.encode())
    expected, got = json.loads(text), load_json(data)
    assert dump_json(got) == dump_json(expected)
    assert type(got) is type(expected)


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2026, 11, 28, 17, 49, 52, 123456, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 28, 17, 49, 52, tzinfo=dt.UTC),
        dt.datetime(9, 1, 2, 3, 4, 5, 999, tzinfo=dt.UTC),  # a year of one digit, padded
        dt.datetime(2026, 1, 1, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    ],
)
def test_format_ts_is_isoformat_in_milliseconds_with_a_z(value: dt.datetime) -> None:
    utc = value.astimezone(dt.UTC)
    assert format_ts(value) == utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_a_limit_is_written_only_as_a_row_count() -> None:
    assert limit_clause(11) == " LIMIT 11"
    for bad in (-1, True, 1.5, "11", "1; DROP TABLE events"):
        with pytest.raises(ValueError):
            limit_clause(bad)
    written, _ = event_page_query(True, False, 0, False, rows=21)
    bound, _ = event_page_query(True, False, 0, False)
    assert written.endswith(" LIMIT 21") and bound.endswith(" LIMIT ?")
    assert written.replace(" LIMIT 21", " LIMIT ?") == bound


def test_a_copied_record_shares_nothing_mutable() -> None:
    event = Event(
        id="aev_1",
        session_key="s",
        type="tool_input",
        fields={"tool_input": {"query": ["a", {"b": 1.5}]}, "n": 2**70},
        created_at=dt.datetime.now(dt.UTC),
    )
    clone = copy_record(event)
    assert clone == event and clone is not event
    assert clone.fields is not event.fields
    assert clone.fields["tool_input"]["query"] is not event.fields["tool_input"]["query"]
    clone.fields["tool_input"]["query"][1]["b"] = 0
    assert event.fields["tool_input"]["query"][1]["b"] == 1.5
    key = ApiKey(id="k", name="n", secret_hash="h", grants=[Grant("a", ("sessions:read",))])
    copied = copy_record(key)  # records in a list: copied one by one
    assert copied == key and copied.grants[0] is not key.grants[0]
