"""``sessions import``: every field of an export checked as the API checks it, through the
same schemas; times only as RFC 3339 with an offset; a session's idle clock; nothing stored
from a refused file; and the progress bar of export and import."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessions_app import create_app
from storage_backends import Agent, storage_from_url
from storage_backends.codec import format_ts, utcnow
from tests.conftest import POSTGRES_URL, postgres_schema, require_server
from tests.servers import BIN, ROOT

AGENT = "support-bot"
WHEN = "2026-12-01T10:00:00.000Z"


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Any]:
    """The CLI in this process, over a SQLite file holding the agent support-bot."""
    app = create_app({"TESTING": True, "STORAGE_URL": f"sqlite:///{tmp_path}/ops.db"})
    store, now = app.extensions["agent_sessions"].storage, utcnow()
    store.create_agent(agent=Agent(key=AGENT, name="Support", created_at=now, updated_at=now))
    yield app.test_cli_runner()
    store.close()


def session_body(**changes: Any) -> dict[str, Any]:
    now = format_ts(utcnow())
    body = {
        "key": "chat",
        "agent_key": AGENT,
        "name": "Chat",
        "metadata": {"customer": "c-17"},
        "enabled": True,
        "tti_minutes": 60,
        "created_at": now,
        "updated_at": now,
    }
    return {k: v for k, v in (body | changes).items() if v is not ...}


def event_body(n: int, **changes: Any) -> dict[str, Any]:
    body = {"id": f"aev_{n}", "type": "agent_output", "created_at": WHEN, "content": f"a{n}"}
    return body | changes


def export_file(
    path: Path, session: dict[str, Any] | None = None, events: list[dict[str, Any]] | None = None
) -> Path:
    events = [event_body(n) for n in range(3)] if events is None else events
    lines = [
        {"format": "agent-sessions/session", "version": 1, "session": session or session_body()}
    ]
    lines += [{"event": e} for e in events]
    lines.append({"end": {"events": len(events)}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def refused(ops: Any, path: Path, *words: str, args: tuple[str, ...] = ()) -> str:
    """The import of ``path`` fails with one line holding ``words``, and stores nothing."""
    result = ops.invoke(args=["sessions", "import", str(path), *args])
    assert result.exit_code == 1, (result.output, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: "), result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    listed = ops.invoke(args=["sessions", "list", AGENT])
    assert listed.exit_code == 0 and listed.output == "", listed.output
    return result.stderr


NOT_RFC_3339 = [
    "2026-12-01T10:00:00",  # naive: local time of whoever imports it
    "2026-12-01T10:00:00.000",
    "2026-12-01",
    "20261201T100000",
    "20261201T100000Z",
    "2026-12-01 10:00:00Z",
    "2026-12-01T10:00Z",
    "2026-12-01T10:00:00+0900",
    "2026-12-01T10:00:00+09",
    "2026-W48-2T10:00:00Z",
    "2026-12-01T24:00:00Z",
    "2026-12-01T10:00:00.Z",
    " 2026-12-01T10:00:00Z",
    "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    1764583200,
]


@pytest.mark.parametrize("value", NOT_RFC_3339, ids=[str(v) for v in NOT_RFC_3339])
def test_an_event_time_must_be_rfc_3339_with_an_offset(ops, tmp_path, value) -> None:
    events = [event_body(0), event_body(1, created_at=value)]
    message = refused(ops, export_file(tmp_path / "t.jsonl", events=events), "line 3")
    assert "created_at" in message and "RFC 3339" in message


@pytest.mark.parametrize("field", ["created_at", "updated_at", "active_at"])
@pytest.mark.parametrize("value", ["2026-12-01T10:00:00", "2026-12-01", "20261201T100000"])
def test_a_session_time_must_be_rfc_3339_with_an_offset(ops, tmp_path, field, value) -> None:
    path = export_file(tmp_path / "t.jsonl", session_body(**{field: value}))
    message = refused(ops, path, "line 1", field, "RFC 3339")
    assert message.count("\n") == 1


def test_times_with_an_offset_are_kept_as_that_instant(ops, tmp_path) -> None:
    events = [
        event_body(0, created_at="2026-12-01T10:00:00+09:00"),
        event_body(1, created_at="2026-12-01T01:00:00.123456Z"),
        event_body(2, created_at="2026-11-30t20:00:00.5-05:00"),
    ]
    path = export_file(tmp_path / "t.jsonl", events=events)
    assert ops.invoke(args=["sessions", "import", str(path)]).exit_code == 0
    exported = ops.invoke(args=["sessions", "export", AGENT, "chat"]).output.splitlines()
    times = [json.loads(line)["event"]["created_at"] for line in exported[1:-1]]
    assert times == [
        "2026-12-01T01:00:00.000Z",
        "2026-12-01T01:00:00.123Z",
        "2026-12-01T01:00:00.500Z",
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_an_import_means_the_same_instant_whatever_the_local_zone(tmp_path, backend) -> None:
    """TZ=Asia/Tokyo: an offset is the instant it names on every backend; no offset, no import."""
    if backend == "postgres":
        require_server("PostgreSQL", "127.0.0.1", 5432)
        schema = postgres_schema(POSTGRES_URL)
        url = schema.__enter__()
    else:
        schema, url = None, f"sqlite:///{tmp_path}/tokyo.db"
    try:
        store, now = storage_from_url(url, {}), utcnow()
        store.create_agent(agent=Agent(key=AGENT, name="Support", created_at=now, updated_at=now))
        store.close()
        env = {**os.environ, "AGENT_SESSIONS_STORAGE_URL": url, "TZ": "Asia/Tokyo"}

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(BIN / "agent-sessions"), *args],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )

        naive = export_file(tmp_path / "naive.jsonl", events=[event_body(0, created_at=WHEN[:-1])])
        refusal = run("sessions", "import", str(naive))
        assert refusal.returncode == 1 and "line 2: created_at" in refusal.stderr, refusal.stderr
        tokyo = export_file(
            tmp_path / "tokyo.jsonl",
            session_body(created_at="2026-12-01T19:00:00+09:00"),
            [event_body(0, created_at="2026-12-01T19:00:00+09:00")],
        )
        assert run("sessions", "import", str(tokyo)).returncode == 0
        lines = run("sessions", "export", AGENT, "chat").stdout.splitlines()
        assert json.loads(lines[0])["session"]["created_at"] == WHEN
        assert json.loads(lines[1])["event"]["created_at"] == WHEN
    finally:
        if schema is not None:
            schema.__exit__(None, None, None)


# Every field as the API checks it


def test_a_session_created_after_its_update_is_refused(ops, tmp_path) -> None:
    session = session_body(created_at="2026-12-02T00:00:00Z", updated_at="2026-12-01T00:00:00Z")
    refused(ops, export_file(tmp_path / "s.jsonl", session), "line 1", "created_at", "updated_at")


FAR_PAST, EPOCH_JUST_BEFORE = "0001-01-01T00:00:00Z", "1969-12-31T23:59:59.999Z"


@pytest.mark.parametrize("value", [FAR_PAST, EPOCH_JUST_BEFORE, "2999-01-01T00:00:00Z"])
@pytest.mark.parametrize("field", ["created_at", "updated_at", "active_at"])
def test_a_session_time_must_be_one_the_api_could_have_written(ops, tmp_path, field, value) -> None:
    path = export_file(tmp_path / "s.jsonl", session_body(**{field: value}))
    message = refused(ops, path, "line 1", field, repr(value))
    assert ("1970" if value < "2" else "a day past") in message


@pytest.mark.parametrize("value", [FAR_PAST, EPOCH_JUST_BEFORE, "2999-01-01T00:00:00Z"])
def test_an_event_time_must_be_one_the_api_could_have_written(ops, tmp_path, value) -> None:
    events = (
        [event_body(0, created_at=value)]
        if value < "2"
        else [event_body(0), event_body(1, created_at=value)]
    )
    line = "line 2" if value < "2" else "line 3"
    refused(ops, export_file(tmp_path / "e.jsonl", events=events), line, "created_at", repr(value))


def test_times_within_the_allowance_are_imported(ops, tmp_path) -> None:
    """1970 itself, and a host whose clock ran up to a day ahead of this one's."""
    ahead = format_ts(utcnow() + dt.timedelta(hours=23))
    session = session_body(created_at="1970-01-01T00:00:00Z", updated_at=ahead)
    events = [event_body(0, created_at="1970-01-01T00:00:00Z"), event_body(1, created_at=ahead)]
    path = export_file(tmp_path / "t.jsonl", session, events)
    result = ops.invoke(args=["sessions", "import", str(path)])
    assert result.exit_code == 0, result.stderr


def test_an_event_older_than_the_one_before_it_is_refused(ops, tmp_path) -> None:
    events = [
        event_body(0, created_at="2026-01-01T00:00:00Z"),
        event_body(1, created_at="2026-01-01T00:00:00Z"),  # the same time: a batch
        event_body(2, created_at="2026-06-01T00:00:00Z"),
        event_body(3, created_at="2026-05-31T23:59:59.999Z"),
    ]
    path = export_file(tmp_path / "e.jsonl", events=events)
    message = refused(
        ops, path, "line 5", "created_at", "previous event", "2026-06-01T00:00:00.000Z"
    )
    assert "2026-05-31T23:59:59.999Z" in message


@pytest.mark.parametrize(
    ("session", "words"),
    [
        (
            {"forked_from": {"agent_key": "a\x1b[31mb\nc", "session_key": "s"}},
            ("forked_from.agent_key", "letters, digits"),
        ),
        (
            {"forked_from": {"agent_key": AGENT, "session_key": "k" * 20_000}},
            ("forked_from.session_key",),
        ),
        (
            # Past the session line's bound (METADATA_MAX_BYTES + 16 KiB): never parsed.
            {"forked_from": {"agent_key": AGENT, "session_key": "k" * 2_000_000}},
            ("longer than 32768 bytes", "refused unread"),
        ),
        (
            {"forked_from": {"agent_key": AGENT, "session_key": "s", "event_id": "ev-1"}},
            ("forked_from.event_id",),
        ),
        ({"forked_from": {"agent_key": AGENT, "session_key": "s", "at": 1}}, ("forked_from.at",)),
        ({"forked_from": "elsewhere"}, ("forked_from",)),
        ({"key": "a b"}, ("key", "letters, digits")),
        ({"agent_key": "x" * 200}, ("agent_key",)),
        ({"name": "a\x1b[2Jb"}, ("name", "control")),
        ({"description": "d" * 2001}, ("description",)),
        ({"metadata": {f"k{n}": n for n in range(200)}}, ("metadata",)),
        ({"metadata": {"big": "x" * 20_000}}, ("metadata", "bytes")),
        ({"tti_minutes": -5}, ("tti_minutes",)),
        ({"tti_minutes": 2**31}, ("tti_minutes",)),
        ({"enabled": "yes"}, ("enabled",)),
        ({"from_session": {"session_key": "s"}}, ("from_session", "Unknown")),
        ({"bogus": 1}, ("bogus", "Unknown")),
        ({"created_at": ...}, ("created_at", "Missing")),
    ],
    ids=lambda v: str(v)[:40],
)
def test_an_import_checks_the_session_as_the_api_does(ops, tmp_path, session, words) -> None:
    refused(ops, export_file(tmp_path / "s.jsonl", session_body(**session)), "line 1", *words)


def test_overrides_are_checked_and_the_agent_must_exist(ops, tmp_path) -> None:
    path = export_file(tmp_path / "s.jsonl")
    refused(ops, path, "--key", args=("--key", "a\nb"))
    refused(ops, path, "--agent", args=("--agent", "x" * 65))
    refused(ops, path, "agent nobody not found", args=("--agent", "nobody"))
    no_key = export_file(tmp_path / "k.jsonl", session_body(key=...))
    refused(ops, no_key, "line 1", "--key")


COMPACTION = {
    "id": "aev_sum",
    "type": "compaction",
    "created_at": WHEN,
    "turns_compacted": 1,
    "events_compacted": 2,
    "summary_text": "sum",
    "summary_key": "aev_sum",
}


@pytest.mark.parametrize(
    ("event", "words"),
    [
        (COMPACTION | {"turns_compacted": -5}, ("turns_compacted",)),
        (COMPACTION | {"events_compacted": -1}, ("events_compacted",)),
        (COMPACTION | {"events_compacted": 2.5}, ("events_compacted",)),
        (COMPACTION | {"turns_compacted": True}, ("turns_compacted",)),
        (COMPACTION | {"summary_text": ""}, ("summary_text",)),
        (COMPACTION | {"summary_key": "k\x1b[2J"}, ("summary_key",)),
        (event_body(9, id="aev_x\n"), ("id",)),
        (event_body(9, id="aev_" + "x" * 61), ("id",)),
        (event_body(9, hide_reason="lost"), ("hide_reason",)),
        (event_body(9, type="magic"), ("type", "magic")),
        (event_body(9, content=None), ("content",)),
        ({"type": "agent_output", "created_at": WHEN, "content": "c"}, ("id", "Missing")),
        ({"id": "aev_9", "type": "agent_output", "content": "c"}, ("created_at", "Missing")),
    ],
    ids=lambda v: str(v)[:50],
)
def test_an_import_checks_each_event_as_the_api_does(ops, tmp_path, event, words) -> None:
    events = [event_body(0), event_body(1), event]
    refused(ops, export_file(tmp_path / "e.jsonl", events=events), "line 4", *words)


def test_a_compaction_as_the_service_writes_it_imports(ops, tmp_path) -> None:
    events = [event_body(0, hide_reason="compaction"), COMPACTION]
    path = export_file(tmp_path / "c.jsonl", events=events)
    assert ops.invoke(args=["sessions", "import", str(path)]).exit_code == 0
    exported = ops.invoke(args=["sessions", "export", AGENT, "chat"]).output.splitlines()
    assert json.loads(exported[2])["event"] == COMPACTION


def test_a_bad_line_past_the_first_batch_stores_nothing(ops, tmp_path) -> None:
    """The import is one transaction: a refusal after 10,000 rows went in takes them back."""
    events = [event_body(n) for n in range(12_000)]
    events[11_500] = event_body(11_500, hide_reason="lost")
    refused(ops, export_file(tmp_path / "big.jsonl", events=events), "line 11502", "hide_reason")


# The idle clock


def test_a_session_whose_clock_ran_out_is_imported_with_its_clock_restarted(ops, tmp_path) -> None:
    long_ago = format_ts(utcnow() - dt.timedelta(days=2))
    session = session_body(tti_minutes=5, created_at=long_ago, updated_at=long_ago)
    session["active_at"] = long_ago
    before = utcnow()
    imported = ops.invoke(
        args=["sessions", "import", str(export_file(tmp_path / "s.jsonl", session))]
    )
    assert imported.exit_code == 0, imported.stderr
    assert "with 3 events" in imported.output and "idle clock" in imported.output
    got = ops.invoke(args=["sessions", "get", AGENT, "chat", "--json"])
    assert got.exit_code == 0, got.stderr
    body = json.loads(got.output)
    assert (body["created_at"], body["updated_at"]) == (long_ago, long_ago)  # kept as exported
    listed = ops.invoke(args=["sessions", "list", AGENT]).output.split("\t")
    expires = dt.datetime.fromisoformat(listed[4].strip())
    assert before + dt.timedelta(minutes=5) <= expires <= utcnow() + dt.timedelta(minutes=5)
    exported = ops.invoke(args=["sessions", "export", AGENT, "chat"]).output.splitlines()
    assert len(exported) == 5  # its history too


# Progress, on a terminal only


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def lines(self) -> list[str]:
        """Each drawing of the bar, without the codes that hide and show the cursor."""
        text = re.sub(r"\x1b\[\?25[lh]", "", self.getvalue())
        return [line.strip() for line in text.split("\r") if line.strip()]


def test_the_progress_bar_shows_the_total_the_rate_and_the_time_left() -> None:
    from sessions_app.ops.history import progress

    def slow() -> Iterator[int]:
        for n in range(8):
            time.sleep(0.2)
            yield n

    screen = Terminal()
    with progress(slow(), "exporting chat", 8, file=screen) as shown:
        assert list(shown) == list(range(8))
    drawn = screen.lines()
    assert drawn[0].startswith("exporting chat  [") and "0/8" in drawn[0], drawn
    assert any(re.search(r"\] +4/8 +50% .*events/s", line) for line in drawn), drawn
    # After a second, the time left: a bar still under way with an eta.
    assert any(re.search(r"\d/8 +\d+% +00:00:0\d +[\d,]+ events/s", line) for line in drawn), drawn
    assert re.search(r"8/8 +100% +[\d,]+ events/s", drawn[-1]), drawn


def test_without_a_total_the_bar_counts_and_shows_the_rate() -> None:
    from sessions_app.ops.history import progress

    screen = Terminal()
    events = (n for n in range(250))  # a generator: no length to guess from
    with progress(events, "importing chat", None, file=screen) as shown:
        assert sum(1 for _ in shown) == 250
    last = screen.lines()[-1]
    assert re.search(r"importing chat +\[.*\] +250 +[\d,]+ events/s", last), last
    assert "%" not in last


def test_no_progress_where_no_one_watches() -> None:
    from sessions_app.ops.history import progress

    piped = io.StringIO()
    items = iter(range(3))
    with progress(items, "exporting chat", 3, file=piped) as shown:
        assert shown is items
    assert piped.getvalue() == ""


def test_the_end_line_gives_an_import_its_total(tmp_path) -> None:
    from sessions_app.ops.history import announced_count

    path = export_file(tmp_path / "e.jsonl", events=[event_body(n) for n in range(7)])
    with open(path, encoding="utf-8") as source:
        first = source.readline()
        assert announced_count(source) == 7
        assert source.readline() != first  # read where it was, not moved
    path.write_text(path.read_text().rsplit("\n", 2)[0] + "\n")  # no end line
    with open(path, encoding="utf-8") as source:
        assert announced_count(source) is None
    read, write = os.pipe()
    with os.fdopen(read) as pipe, os.fdopen(write, "w") as writer:
        writer.write('{"end": {"events": 3}}\n')
        writer.flush()
        assert announced_count(pipe) is None


# Quotas and undecodable input


def test_an_import_past_a_quota_names_it_as_the_api_does(tmp_path) -> None:
    app = create_app(
        {"TESTING": True, "STORAGE_URL": f"sqlite:///{tmp_path}/q.db", "SESSION_MAX_EVENTS": 2}
    )
    store, now = app.extensions["agent_sessions"].storage, utcnow()
    store.create_agent(agent=Agent(key=AGENT, name="Support", created_at=now, updated_at=now))
    try:
        stderr = refused(app.test_cli_runner(), export_file(tmp_path / "three.jsonl"))
        assert stderr == (
            "Error: Quota SESSION_MAX_EVENTS exceeded: 0 events in this session stored, this "
            "write adds 3, the bound is 2; nothing was written.\n"
        )
    finally:
        store.close()


def test_a_line_that_is_not_utf_8_is_refused_naming_it(ops, tmp_path) -> None:
    path = export_file(tmp_path / "bad.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"a1"', b'"a\xff"')
    path.write_bytes(b"".join(lines))
    stderr = refused(ops, path, "line 3", "UTF-8")
    assert "position" not in stderr
