"""A PostgreSQL database set up wrong: 503 ``unavailable`` naming the cause, never a 500.

A search_path naming no schema, a database or role that does not exist, a role
without the privilege to create the tables, a read-only database: the service
cannot serve until someone fixes the set-up, so every request answers 503 with
``Retry-After``, ``/readyz`` is not ready, the log says why in one line, and the
CLI ends with one ``Error:`` line. A password in the URL never shows.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import requests

from storage_backends import Unavailable, storage_from_url

from .conftest import POSTGRES_URL, postgres_schema, require_server
from .servers import cli, serving
from .test_gunicorn import UNLIMITED, assert_error

pytestmark = pytest.mark.postgres

PASSWORD = "pw-" + uuid.uuid4().hex
MISSING_SCHEMA = f"{POSTGRES_URL}?options=-csearch_path%3Dno_such_schema_zz"
BASE = POSTGRES_URL.rsplit("/", 1)[0]


@contextlib.contextmanager
def role_without_create() -> Iterator[str]:
    """A URL (with a password) for a role that may use a fresh schema but not create in it."""
    role = f"test_role_{uuid.uuid4().hex[:12]}"
    with postgres_schema() as url, psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        schema = url.rsplit("%3D", 1)[1]
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
        try:
            admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
            host = BASE.split("@", 1)[1]
            yield f"postgresql://{role}:{PASSWORD}@{host}/test?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


@contextlib.contextmanager
def read_only_database() -> Iterator[str]:
    with postgres_schema() as url:
        yield f"{url}%20-cdefault_transaction_read_only%3Don"


@contextlib.contextmanager
def given(url: str) -> Iterator[str]:
    yield url


CASES = {
    "missing_schema": (lambda: given(MISSING_SCHEMA), "InvalidSchemaName"),
    "missing_database": (lambda: given(f"{BASE}/no_such_db_zz"), 'database "no_such_db_zz"'),
    "missing_role": (
        lambda: given(f"postgresql://no_such_role_zz:{PASSWORD}@{BASE.split('@', 1)[1]}/test"),
        'role "no_such_role_zz"',
    ),
    "no_create_privilege": (role_without_create, "InsufficientPrivilege"),
    "read_only": (read_only_database, "ReadOnlySqlTransaction"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_set_up_failure_is_unavailable_and_names_its_cause(case):
    require_server("PostgreSQL", "127.0.0.1", 5432)
    make_url, cause = CASES[case]
    with make_url() as url:
        storage = storage_from_url(url, {"POSTGRES_TIMEOUT": 1})
        try:
            for call in (storage.check, lambda: storage.list_agents(limit=1)):
                with pytest.raises(Unavailable) as caught:
                    call()
                message = str(caught.value)
                assert cause in message, message
                assert PASSWORD not in message and "\n" not in message, message
        finally:
            storage.close()


def test_a_search_path_naming_no_schema_is_503_in_gunicorn_and_one_line_in_the_cli(tmp_path):
    require_server("PostgreSQL", "127.0.0.1", 5432)
    env = {"AGENT_SESSIONS_STORAGE_URL": MISSING_SCHEMA, **UNLIMITED}
    with serving(env, tmp_path, workers=1) as server:
        ready = requests.get(server.url + "/readyz", timeout=30)
        assert ready.status_code == 503, ready.text
        assert ready.json()["storage"] == "unavailable"
        headers = {"x-api-key": "ak_0123456789abcdef.secret"}
        for method, path in [
            ("GET", "/v2/agents"),
            ("POST", "/v2/agents/bot/sessions"),
            ("GET", "/v2/agents/bot/sessions/s"),
        ]:
            response = requests.request(
                method, server.url + path, json={"name": "n"}, headers=headers, timeout=30
            )
            assert_error(response, 503, "unavailable")
            assert response.headers["Retry-After"].isdigit(), response.headers
        logs = server.logs()
    assert "Traceback" not in logs, logs
    assert "postgresql unavailable: InvalidSchemaName" in logs, logs

    result = cli("agents", "list", env=env, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: storage unavailable") and "InvalidSchemaName" in lines[0]
