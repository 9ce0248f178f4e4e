"""Backends are equivalent: one Hypothesis state machine, through the HTTP API, per backend.

Sessions are created (with explicit keys, duplicates included, and with keys
generated from names), read, updated, deleted and listed page by page through
the Flask test client; every answer is checked against one plain dict. The
test runs once per backend in ``BACKENDS`` (tests/conftest.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from sessions_app import create_app
from sessions_app.schemas import is_blank
from tests.conftest import ALL_SCOPES, Keys, assert_error

# Names with the key generated from them when none is given.
NAMES = {"Alpha": "alpha", "alpha beta": "alpha-beta", "Café crème": "cafe-creme", "Z": "z"}
# Explicit keys: few, so that duplicates are frequent; "alpha" is also a generated one.
KEYS = ["a", "b", "alpha", "c-1", "Z_9"]

SAFE_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
text = st.text(SAFE_TEXT, max_size=12)
# Names and descriptions hold no control characters, and a name is more than
# white space and invisible format characters: the API refuses both.
PRINTABLE = st.characters(blacklist_categories=("Cs", "Cc"))
descriptions = st.text(PRINTABLE, max_size=12)
names = st.sampled_from(sorted(NAMES)) | st.text(PRINTABLE, min_size=1, max_size=12).filter(
    lambda name: not is_blank(name)
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(SAFE_TEXT, min_size=1, max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
metadata = st.dictionaries(st.text(SAFE_TEXT, min_size=1, max_size=6), json_values, max_size=4)
optional_fields = st.fixed_dictionaries(
    {},
    optional={
        "description": st.none() | descriptions,
        "metadata": st.none() | metadata,
        "enabled": st.none() | st.booleans(),
        "tti_minutes": st.none() | st.integers(0, 2**31 - 1),
    },
)
changes = st.fixed_dictionaries(
    {},
    optional={
        "name": st.none() | names,
        "description": st.none() | descriptions,
        "metadata": st.none() | metadata,
        "enabled": st.none() | st.booleans(),
        "tti_minutes": st.none() | st.integers(0, 2**31 - 1),
    },
)
# An absent description is left out of the answer.
DEFAULTS = {"metadata": {}, "enabled": True, "tti_minutes": 0}
# Hundreds of calls a minute with one key: rate limits are another test's business.
UNLIMITED = "1000000/minute"


@pytest.fixture
def app(storage_url: str) -> Iterator[Any]:
    app = create_app(
        {
            "TESTING": True,
            "STORAGE_URL": storage_url,
            "SESSION_CREATE_LIMIT": UNLIMITED,
            "DEFAULT_LIMIT": UNLIMITED,
            "ADMIN_LIMIT": UNLIMITED,
        }
    )
    yield app
    app.extensions["agent_sessions"].storage.close()


def sessions_machine(app: Any) -> type[RuleBasedStateMachine]:
    """A state machine class over ``app``; each run works on a fresh agent of its own."""
    keys = Keys(app)
    admin = keys.headers(admin=True)
    headers = keys.headers(("*", ALL_SCOPES))
    agents = itertools.count()

    class Sessions(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.client = app.test_client()
            agent = f"agent-{next(agents)}"
            response = self.client.post(
                "/v2/agents", json={"key": agent, "name": agent}, headers=admin
            )
            assert response.status_code == 201, response.get_json()
            self.url = f"/v2/agents/{agent}/sessions"
            self.agent = agent
            self.model: dict[str, dict] = {}  # in creation order, as listings are

        def expected_new(self, key: str, name: str, fields: dict) -> dict:
            # null is absent, and so is an empty description.
            given = {
                k: v for k, v in fields.items() if v is not None and (k, v) != ("description", "")
            }
            return {"key": key, "agent_key": self.agent, "name": name} | DEFAULTS | given

        def check_created(self, response: Any, expected: dict) -> None:
            assert response.status_code == 201, response.get_json()
            body = response.get_json()
            assert {k: body[k] for k in expected} == expected
            assert ("description" in body) == ("description" in expected), body
            assert body["created_at"] == body["updated_at"]
            assert response.headers["Location"] == f"{self.url}/{body['key']}"
            self.model[body["key"]] = body

        @rule(key=st.sampled_from(KEYS), name=names, fields=optional_fields)
        def create_with_key(self, key: str, name: str, fields: dict) -> None:
            response = self.client.post(
                self.url, json={"key": key, "name": name, **fields}, headers=headers
            )
            if key in self.model:
                assert_error(response, 409, "conflict")
            else:
                self.check_created(response, self.expected_new(key, name, fields))

        @rule(name=st.sampled_from(sorted(NAMES)), fields=optional_fields)
        def create_with_generated_key(self, name: str, fields: dict) -> None:
            response = self.client.post(self.url, json={"name": name, **fields}, headers=headers)
            assert response.status_code == 201, response.get_json()
            key = response.get_json()["key"]
            base = NAMES[name]
            assert key not in self.model
            assert key == base if base not in self.model else key.startswith(base + "-"), key
            self.check_created(response, self.expected_new(key, name, fields))

        def pick(self, data: Any) -> str:
            """A key that exists, or one of the explicit keys (which may not)."""
            return data.draw(st.sampled_from(sorted(set(self.model) | set(KEYS))))

        @rule(data=st.data())
        def get(self, data: Any) -> None:
            key = self.pick(data)
            response = self.client.get(f"{self.url}/{key}", headers=headers)
            if key in self.model:
                assert response.status_code == 200
                assert response.get_json() == self.model[key]
            else:
                assert_error(response, 404, "session_not_found")

        @rule(data=st.data(), changes=changes)
        def update(self, data: Any, changes: dict) -> None:
            key = self.pick(data)
            response = self.client.patch(f"{self.url}/{key}", json=changes, headers=headers)
            if key not in self.model:
                assert_error(response, 404, "session_not_found")
                return
            assert response.status_code == 200, response.get_json()
            body = response.get_json()
            before = self.model[key]
            expected = before | {k: v for k, v in changes.items() if v is not None}
            if changes.get("description") == "":
                del expected["description"]  # cleared
            assert {k: v for k, v in body.items() if k != "updated_at"} == {
                k: v for k, v in expected.items() if k != "updated_at"
            }
            assert body["updated_at"] >= before["updated_at"]
            self.model[key] = body

        @rule(data=st.data())
        def delete(self, data: Any) -> None:
            key = self.pick(data)
            response = self.client.delete(f"{self.url}/{key}", headers=headers)
            if key in self.model:
                assert response.status_code == 204
                del self.model[key]
            else:
                assert_error(response, 404, "session_not_found")

        @rule(limit=st.integers(1, 4))
        def list_every_page(self, limit: int) -> None:
            seen: list[dict] = []
            page_key = None
            for _ in range(len(self.model) + 2):
                query = {"limit": limit} | ({"page_key": page_key} if page_key else {})
                response = self.client.get(self.url, query_string=query, headers=headers)
                assert response.status_code == 200, response.get_json()
                body = response.get_json()
                assert len(body["sessions"]) <= limit
                seen += body["sessions"]
                page_key = body["metadata"].get("page_key")  # absent on the last page
                if page_key is None:
                    break
            assert page_key is None, "more pages than sessions"
            assert seen == list(self.model.values())

    return Sessions


def test_every_backend_matches_one_model(app):
    run_state_machine_as_test(
        sessions_machine(app),
        settings=settings(
            max_examples=40,
            stateful_step_count=20,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
