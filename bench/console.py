"""The console's history page: a session of N events against one of 100, same page of 50.

Usage: ``bench/console.py [--events N] [--repeat R] [--check]``. Builds a SQLite
file in a temporary directory through the storage API (``load_events`` for the
big history, a batch per transaction), signs in to the console through its
form with Flask's test client, and times the server side of each history page
(routing, sign-in check, storage read, rendering): the newest page, the oldest
page, a page from the middle (a page key, as the "older events" link carries),
with hidden events shown. Prints the median of each, for both
sessions, and their ratio. ``--events 1000000`` is the contract's size (some
minutes to build); the default builds in well under a minute. ``--check`` exits
1 when a ratio passes 1.25.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sessions_app import create_app  # noqa: E402
from sessions_app.corridor.auth import new_api_key  # noqa: E402
from sessions_app.corridor.http import encode_scoped_cursor  # noqa: E402
from storage_backends import Agent, Event, Session  # noqa: E402
from storage_backends.codec import utcnow  # noqa: E402

AGENT = "bench"
PAGE = 50
HISTORY = f"/console/agents/{AGENT}/sessions"
BOUND = 1.25


def events(session_key: str, count: int, start: dt.datetime) -> Iterator[Event]:
    """A history of every common kind, one in seven hidden."""
    for number in range(count):
        kind = number % 4
        if kind == 0:
            fields = {"messages": [{"type": "text", "content": f"Question {number} <b>?</b>"}]}
            event_type = "input_message"
        elif kind == 1:
            fields = {
                "tool_call_id": f"call_{number}",
                "tool_configuration_name": "orders",
                "tool_name": "lookup_order",
                "tool_input": {"order": number, "fields": ["status", "total"]},
            }
            event_type = "tool_input"
        elif kind == 2:
            fields = {"content": f"Thinking about {number}."}
            event_type = "thinking"
        else:
            fields = {"content": f"Answer {number}: the order was delivered." * 3}
            event_type = "agent_output"
        yield Event(
            id=f"aev_{session_key}{number}",
            session_key=session_key,
            type=event_type,
            fields=fields,
            created_at=start + dt.timedelta(milliseconds=number),
            hide_reason="manual" if number % 7 == 0 else None,
        )


def build(directory: Path, big: int, small: int) -> tuple[object, str]:
    app = create_app(
        {
            "STORAGE_URL": f"sqlite:///{directory}/console-bench.db",
            "METRICS_ENABLED": False,
            "DEFAULT_LIMIT": "1000000000/minute",
            "ADMIN_LIMIT": "1000000000/minute",
        }
    )
    storage = app.extensions["agent_sessions"].storage
    now = utcnow()
    storage.create_agent(agent=Agent(key=AGENT, name="Bench", created_at=now, updated_at=now))
    for key, count in (("small", small), ("big", big)):
        storage.create_session(
            session=Session(key=key, agent_key=AGENT, name=key, created_at=now, updated_at=now)
        )
        began = time.perf_counter()
        history = events(key, count, now)
        stored = storage.load_events(agent_key=AGENT, session_key=key, events=history)
        print(f"built {key}: {stored:,} events in {time.perf_counter() - began:.1f} s", flush=True)
    with app.app_context():
        _, token = new_api_key(name="bench", grants=[], admin=True)
    return app, token


def sign_in(app: object, token: str) -> object:
    client = app.test_client()  # type: ignore[attr-defined]
    form = client.get("/console/").get_data(as_text=True)
    login = re.search(r'name="login_token" value="([^"]+)"', form).group(1)
    answer = client.post("/console/login", data={"api_key": token, "login_token": login})
    assert answer.status_code == 303, answer.status_code
    return client


def middle_key(session_key: str, first_seq: int, count: int) -> str:
    """The page key of the page that starts in the middle of the history, newest first."""
    scope = f"{AGENT}/{session_key}"
    return encode_scoped_cursor(first_seq + count // 2, scope=scope, descending=True)


def medians_ms(client: object, paths: tuple[str, str], repeat: int) -> tuple[float, float]:
    """The median time of each page, the two asked for in turn (so that the machine's
    other work weighs on both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(repeat + max(5, repeat // 10)):
        for path, measured in zip(paths, times, strict=True):
            began = time.perf_counter()
            answer = client.get(path)  # type: ignore[attr-defined]
            elapsed = time.perf_counter() - began
            assert answer.status_code == 200, (path, answer.status_code)
            assert answer.data.count(b'class="event ') == PAGE, path
            if round_ >= max(5, repeat // 10):  # after the warm-up
                measured.append(elapsed)
    return statistics.median(times[0]) * 1000, statistics.median(times[1]) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events of the big session")
    parser.add_argument("--small", type=int, default=100, help="events of the small session")
    parser.add_argument("--repeat", type=int, default=200, help="timed requests per page")
    parser.add_argument("--check", action="store_true", help=f"exit 1 past a ratio of {BOUND}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        app, token = build(Path(directory), args.events, args.small)
        client = sign_in(app, token)
        # Event sequence numbers: the small session's come first, then the big one's.
        firsts = {"small": 1, "big": args.small + 1}
        counts = {"small": args.small, "big": args.events}
        variants = {
            "newest page": lambda key: "",
            "oldest page": lambda key: "?order=asc",
            # Hidden ones shown: the small session's middle page holds 50 events too.
            "middle page": lambda key: (
                "?include_hidden=true&page_key=" + middle_key(key, firsts[key], counts[key])
            ),
            "hidden shown": lambda key: "?include_hidden=true",
        }
        print(f"history page of {PAGE} events, median of {args.repeat} requests (ms)")
        print(f"{'page':<14}{'100 events':>12}{f'{args.events:,} events':>18}{'ratio':>8}")
        worst = 0.0
        for name, query in variants.items():
            paths = (f"{HISTORY}/small{query('small')}", f"{HISTORY}/big{query('big')}")
            small, big = medians_ms(client, paths, args.repeat)
            ratio = big / small
            worst = max(worst, ratio)
            print(f"{name:<14}{small:>12.2f}{big:>18.2f}{ratio:>8.2f}")
        print(f"worst ratio {worst:.2f} (bound {BOUND})")
        app.extensions["agent_sessions"].storage.close()  # type: ignore[attr-defined]
    return 1 if args.check and worst > BOUND else 0


if __name__ == "__main__":
    sys.exit(main())
