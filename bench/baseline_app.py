"""The yardstick of ``bench/run.py``: the thinnest Flask app answering the benchmark's requests.

It answers the same URLs as the service, parses the create body with Flask's own
``get_json`` and returns a small JSON object, with no authentication, rate
limit, validation or storage. ``bench/run.py`` serves it with the same gunicorn
command and configuration file as the service, so whatever gunicorn costs per
request (HTTP parsing, access log) is in both measurements.
"""

from flask import Flask, request

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


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
