"""The yardstick of the benchmarks: the thinnest Flask app giving the service's answers.

It answers the same URLs as the service with the same statuses and the same
JSON bodies, key for key and in the same order (Flask's key sorting is off,
as the service's answers are not sorted): a create or an append stores what
it was sent in a dict of this process and echoes the stored record (the
timestamps, the defaults, an event id); a get returns a stored session; the
list returns the first 10 sessions of the agent (the ones
``bench/stores.py`` seeds: the same names, metadata and count) with a page
key; the newest 20 returns 20 of a 100-event history shaped as
``stores.seed_events`` makes it (the five event kinds in turn), newest first,
with a page key. What it leaves out is the service's work: no
authentication, rate limit, validation, storage or conditional headers.

``bench/run.py`` and ``bench/instructions.py`` serve it with the same gunicorn
command and configuration file as the service, so whatever gunicorn costs per
request (HTTP parsing, access log) is in both measurements.

``app_with_api_headers`` is the same app sending the response headers the API's
contract requires on every answer (request id, nosniff, no-store, the three
X-RateLimit-* numbers), with constant values: the cost of those headers alone,
in Flask and in gunicorn, for ``bench/run.py --floor``.
"""

import base64
import datetime as dt
import os

from flask import Flask, abort, request

AGENT = "bench-agent"
HISTORY = "bench-history"
EVENT_KINDS = ("input_message", "agent_output", "tool_input", "tool_output", "thinking")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def page_key(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def session(key: str, name: str, metadata: dict, tti_minutes: int = 0) -> dict:
    at = now()
    return {
        "key": key,
        "agent_key": AGENT,
        "name": name,
        "metadata": metadata,
        "enabled": True,
        "tti_minutes": tti_minutes,
        "created_at": at,
        "updated_at": at,
    }


def event(n: int) -> dict:
    """The n-th event of the history, shaped as ``stores._events`` makes it."""
    kind = EVENT_KINDS[n % len(EVENT_KINDS)]
    record = {"id": f"aev_b{n:07d}", "session_key": HISTORY, "type": kind, "created_at": now()}
    if kind == "input_message":
        record["messages"] = [{"type": "text", "content": f"question {n}"}]
    elif kind in ("tool_input", "tool_output"):
        record |= {"tool_call_id": f"c{n}", "tool_configuration_name": "search"}
        record |= {"tool_name": "search", kind: {"query": f"q {n}"}}
        if kind == "tool_output":
            record["error"] = False
    else:
        record["content"] = f"answer {n}"
    return record


def seeded() -> dict[str, dict]:
    """The sessions of the benchmark's store, in the order a list returns them."""
    sessions = [session("bench-get", "Benchmark session", {"customer": "c-17", "channel": "web"})]
    for key in ("bench-append", HISTORY, *(f"bench-append-{n}" for n in range(64))):
        sessions.append(session(key, key, {}))
    return {s["key"]: s for s in sessions}


def make_app(*, api_headers: bool = False) -> Flask:
    app = Flask(__name__)
    app.json.sort_keys = False  # the service answers keys in its schemas' order
    sessions = seeded()
    events: dict[str, list[dict]] = {HISTORY: [event(n) for n in range(100)]}

    @app.post("/v2/agents/<agent_key>/sessions")
    def create_session(agent_key: str):
        data = request.get_json()
        record = session(data["key"], data["name"], data["metadata"], data["tti_minutes"])
        record["agent_key"] = agent_key
        sessions[record["key"]] = record
        return record, 201, {"Location": f"{request.path}/{record['key']}"}

    @app.get("/v2/agents/<agent_key>/sessions/<session_key>")
    def get_session(agent_key: str, session_key: str):
        record = sessions.get(session_key)
        if record is None:
            abort(404)
        return record

    @app.get("/v2/agents/<agent_key>/sessions")
    def list_sessions(agent_key: str):
        limit = int(request.args.get("limit", 10))
        page = list(sessions.values())[:limit]
        return {"sessions": page, "metadata": {"page_key": page_key(f"v1:{limit}")}}

    @app.post("/v2/agents/<agent_key>/sessions/<session_key>/events/batch")
    def append_events(agent_key: str, session_key: str):
        stored = []
        for sent in request.get_json()["events"]:
            record = {"id": f"aev_{os.urandom(12).hex()}", "session_key": session_key}
            record |= {"type": sent["type"], "created_at": now()}
            record |= {name: value for name, value in sent.items() if name != "type"}
            stored.append(record)
        events.setdefault(session_key, []).extend(stored)
        return {"events": stored, "session_key": session_key}, 201

    @app.get("/v2/agents/<agent_key>/sessions/<session_key>/events")
    def list_events(agent_key: str, session_key: str):
        limit = int(request.args.get("limit", 20))
        page = events.get(session_key, [])[::-1][:limit]
        last = page[-1]["id"] if page else ""
        return {"events": page, "metadata": {"page_key": page_key(f"v1:{len(page)}:{last}")}}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    if api_headers:

        @app.after_request
        def contract_headers(response):
            response.headers.extend(
                [
                    ("X-Request-ID", os.urandom(16).hex()),
                    ("X-Content-Type-Options", "nosniff"),
                    ("Cache-Control", "no-store"),
                    ("X-RateLimit-Limit", "100000000"),
                    ("X-RateLimit-Remaining", "99999999"),
                    ("X-RateLimit-Reset", "1796000000"),
                ]
            )
            return response

    return app


app = make_app()
app_with_api_headers = make_app(api_headers=True)
