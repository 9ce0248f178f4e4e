"""The benchmark's yardstick and its guard: the baseline answers what the service answers,
and ``bench/instructions.py --check`` holds each operation's instructions to the reference.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sessions_app import create_app
from sessions_app.corridor.auth import hash_secret
from storage_backends import Agent, ApiKey, Grant, Session
from storage_backends.codec import utcnow
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import baseline_app  # noqa: E402
import instructions  # noqa: E402
import stages  # noqa: E402
import stores  # noqa: E402


def shape(value: Any) -> Any:
    """The JSON's structure: keys in order, list lengths, and the type of each leaf."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


@pytest.fixture
def service(tmp_path: Path) -> Any:
    """The service on a store seeded as bench/stores.py seeds the benchmark's."""
    app = create_app({"TESTING": True, "STORAGE_URL": f"sqlite:///{tmp_path}/bench.db"})
    storage = app.extensions["agent_sessions"].storage
    now = utcnow()
    storage.create_agent(
        agent=Agent(key=stores.AGENT, name=stores.AGENT, created_at=now, updated_at=now)
    )
    storage.create_api_key(
        api_key=ApiKey(
            id="ak_bench",
            name="benchmark",
            secret_hash=hash_secret("secret"),
            grants=[Grant(stores.AGENT, tuple(stores.SCOPES.split(",")))],
            created_at=now,
        )
    )
    storage.create_session(
        session=Session(
            key=stores.GET_KEY,
            agent_key=stores.AGENT,
            name="Benchmark session",
            metadata={"customer": "c-17", "channel": "web"},
            created_at=now,
            updated_at=now,
        )
    )
    stores.seed_events(storage)
    yield app
    storage.close()


@pytest.mark.parametrize("op", instructions.OPERATIONS)
def test_the_baseline_answers_the_service_s_status_and_body_shape(service: Any, op: str) -> None:
    method, path, query, body = instructions.request_for(op, 7)
    answers = []
    for app, headers in (
        (service, {"x-api-key": "ak_bench.secret"}),
        (baseline_app.make_app(), {}),
    ):
        response = app.test_client().open(
            path,
            method=method,
            query_string=query,
            data=body or None,
            headers=headers | ({"Content-Type": "application/json"} if body else {}),
        )
        answers.append((response.status_code, shape(response.get_json())))
    assert answers[0] == answers[1]
    status, body_shape = answers[0]
    assert 200 <= status < 300
    items = {"list": 10, "newest 20": 20}.get(op)
    if items:
        assert len(body_shape[0][1]) == items


def test_the_baseline_echoes_what_it_stored() -> None:
    client = baseline_app.make_app().test_client()
    method, path, _, body = instructions.request_for("create", 3)
    created = client.post(path, data=body, content_type="application/json")
    assert created.status_code == 201
    assert created.headers["Location"] == f"{path}/b0000003"
    assert client.get(created.headers["Location"]).get_json() == created.get_json()
    assert created.get_json()["metadata"] == json.loads(body)["metadata"]
    _, path, _, body = instructions.request_for("append", 5)
    appended = client.post(path, data=body, content_type="application/json").get_json()
    sent = json.loads(body)["events"][0]
    assert appended["events"][0]["content"] == sent["content"]
    assert appended["session_key"] == path.split("/")[-3]


def verdicts(reference: float, now: float) -> list:
    counts = {"sqlite": {"create": now}}
    return instructions.compare({"backends": {"sqlite": {"create": reference}}}, counts)[1]


def test_the_guard_fails_past_five_percent_and_not_before() -> None:
    assert verdicts(1_000_000, 1_049_000) == []
    assert verdicts(1_000_000, 1_051_000) == [("sqlite", "create")]
    assert verdicts(1_000_000, 800_000) == []  # cheaper is not a failure


def test_check_exits_non_zero_with_the_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    reference = tmp_path / "reference.json"
    counts = {"sqlite": {"create": 2_000_000.0, "get": 1_000_000.0}}
    reference.write_text(json.dumps({"requests": 50, "backends": counts}))
    grown = {"sqlite": {"create": 2_200_000.0, "get": 1_010_000.0}}
    monkeypatch.setattr(instructions, "measure_service", lambda backends, ops, requests: grown)
    assert instructions.check(["sqlite"], ["create", "get"], reference) == 1
    out = capsys.readouterr().out
    assert re.search(r"sqlite\s+create\s+2,000,000\s+2,200,000\s+\+10\.0%\s+GREW", out), out
    assert re.search(r"sqlite\s+get\s+1,000,000\s+1,010,000\s+\+1\.0%\s+ok", out), out
    assert "more than 5% over the reference: sqlite create" in out
    monkeypatch.setattr(instructions, "measure_service", lambda backends, ops, requests: counts)
    assert instructions.check(["sqlite"], ["create", "get"], reference) == 0
    assert instructions.check(["memory"], ["create"], reference) == 1  # nothing to hold it to


@pytest.mark.parametrize(
    ("path", "name", "caller", "stage"),
    [
        ("sessions_app/auth.py", "authenticate", stages.DISPATCH, stages.AUTH),
        ("sessions_app/corridor/auth.py", "authenticate", stages.DISPATCH, stages.AUTH),
        ("sessions_app/host_counters.py", "FileCounters.incr", stages.AUTH, stages.COUNTER),
        ("sessions_app/schemas.py", "ResponseSchema.dump", stages.DISPATCH, stages.DUMP),
        ("sessions_app/schemas/sessions.py", "Fields._check", stages.LOAD, stages.LOAD),
        ("sessions_app/api/events.py", "list_events", stages.DISPATCH, stages.OTHER),
        ("storage_backends/sql/events.py", "Events.append", stages.OTHER, stages.STORAGE),
        ("storage_backends/codec.py", "format_ts", stages.STORAGE, stages.TIMESTAMPS),
        ("storage_backends/codec.py", "utcnow", stages.OTHER, stages.OTHER),
        ("storage_backends/codec.py", "load_json", stages.STORAGE, stages.COLUMN_JSON),
        ("lib/python3.11/json/decoder.py", "JSONDecoder.decode", stages.SQL, stages.COLUMN_JSON),
        ("lib/python3.11/json/decoder.py", "JSONDecoder.decode", stages.BODY, stages.BODY),
        (
            "site-packages/werkzeug/wrappers/request.py",
            "Request.get_data",
            stages.BODY,
            stages.BODY,
        ),
        ("site-packages/flask/app.py", "Flask.wsgi_app", stages.OUTSIDE, stages.DISPATCH),
        (
            "site-packages/limits/storage/memory.py",
            "MemoryStorage.incr",
            stages.AUTH,
            stages.COUNTER,
        ),
    ],
)
def test_stage_rules(path: str, name: str, caller: str, stage: str) -> None:
    """Modules are named wherever they sit, and a frame no rule names runs in its caller's stage."""
    table, rows, c_rows = stages.maps()
    classify_code, _ = stages.classifiers(rows, c_rows)
    code = compile("def f(): pass", "f", "exec").co_consts[0]
    code = code.replace(co_filename=f"/somewhere/bench/{path}", co_qualname=name)
    entered = table[classify_code(code)][stages.STAGES.index(caller)]
    assert stages.STAGES[entered] == stage


def require_valgrind() -> None:
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        return
    if IN_CI:
        pytest.fail("valgrind is not installed; CI must install it (see .ci/run)")
    pytest.skip("valgrind is not installed (apt-get install valgrind)")


@pytest.mark.slow
def test_instructions_per_request_stay_within_five_percent_of_the_reference() -> None:
    """One operation per backend, counted under gunicorn, against the committed reference."""
    require_valgrind()
    runs = {
        backend: subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench/instructions.py"),
                "--check",
                "--backends",
                backend,
                "--ops",
                op,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for backend, op in (("sqlite", "create"), ("memory", "list"))
    }
    for backend, run in runs.items():
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output
        assert f"{backend} " in output and " ok" in output, output
