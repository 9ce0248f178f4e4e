"""The yardstick of ``bench/run.py``: the thinnest Flask app answering the benchmark's requests.

It answers the same URLs as the service, parses the create and append bodies
with Flask's own ``get_json`` and returns a small JSON object, with no authentication, rate
limit, validation or storage. ``bench/run.py`` serves it with the same gunicorn
command and configuration file as the service, so whatever gunicorn costs per
request (HTTP parsing, access log) is in both measurements.

``app_with_api_headers`` is the same app sending the response headers the API's
contract requires on every answer (request id, nosniff, no-store, the three
X-RateLimit-* numbers), with constant values: the cost of those headers alone,
in Flask and in gunicorn, for ``bench/run.py --floor``.
"""

import os

from flask import Flask, request


def make_app(*, api_headers: bool = False) -> Flask:
    app = Flask(__name__)

    @app.post("/v2/agents/<agent_key>/sessions")
    def create_session(agent_key: str):
        data = request.get_json()
        return {"key": data["key"], "agent_key": agent_key, "name": data["name"]}, 201

    @app.get("/v2/agents/<agent_key>/sessions/<session_key>")
    def get_session(agent_key: str, session_key: str):
        return {"key": session_key, "agent_key": agent_key, "name": "Benchmark session"}

    @app.get("/v2/agents/<agent_key>/sessions")
    def list_sessions(agent_key: str):
        return {"sessions": [], "metadata": {"page_key": None}}

    @app.post("/v2/agents/<agent_key>/sessions/<session_key>/events/batch")
    def append_events(agent_key: str, session_key: str):
        events = request.get_json()["events"]
        return {"events": [{"id": "aev_0", **events[0]}], "session_key": session_key}, 201

    @app.get("/v2/agents/<agent_key>/sessions/<session_key>/events")
    def list_events(agent_key: str, session_key: str):
        return {"events": [], "metadata": {}}

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
