"""Compiled response dumps answer exactly what Marshmallow's own dump answers."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import Schema, fields, post_dump

from sessions_app import schemas
from storage_backends import Agent, Session

timestamps = st.datetimes(
    min_value=dt.datetime(1970, 1, 1),
    max_value=dt.datetime(9999, 12, 30),
    timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-5, minutes=-30))]),
)
texts = st.text(max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=8,
)
metadata = st.dictionaries(texts, json_values, max_size=4)
sessions = st.builds(
    Session,
    key=texts,
    agent_key=texts,
    name=texts,
    description=st.none() | texts,
    metadata=metadata,
    enabled=st.booleans(),
    tti_minutes=st.integers(min_value=0, max_value=2**31 - 1),
    created_at=timestamps,
    updated_at=timestamps,
)
agents = st.builds(
    Agent,
    key=texts,
    name=texts,
    description=st.none() | texts,
    metadata=metadata,
    enabled=st.booleans(),
    created_at=timestamps,
    updated_at=timestamps,
)
page_keys = st.none() | st.text(min_size=1, max_size=12)


def marshmallow_dump(schema: Schema, obj: object) -> object:
    return Schema.dump(schema, obj)


def test_every_response_schema_is_covered():
    compiled = {cls.__name__ for cls in vars(schemas).values() if _is_response_schema(cls)}
    assert compiled == {
        "SessionSchema",
        "AgentSchema",
        "ListMetadataSchema",
        "SessionListSchema",
        "AgentListSchema",
        "ForkedFromSchema",  # in forked sessions: test_forked_session_dump
        "AgentUsageSchema",  # an agent with its usage: test_agent_usage_dump
        "UsageSchema",
    }


def _is_response_schema(value: object) -> bool:
    return (
        isinstance(value, type)
        and issubclass(value, schemas.ResponseSchema)
        and value is not schemas.ResponseSchema
    )


@settings(max_examples=200)
@given(session=sessions)
def test_session_dump(session):
    schema = schemas.SessionSchema()
    assert schema.dump(session) == marshmallow_dump(schema, session)
    assert list(schema.dump(session)) == list(marshmallow_dump(schema, session))


forks = st.fixed_dictionaries(
    {"agent_key": texts, "session_key": texts}, optional={"event_id": texts}
)


@settings(max_examples=100)
@given(session=sessions, forked_from=forks)
def test_forked_session_dump(session, forked_from):
    session.forked_from = forked_from
    schema = schemas.SessionSchema()
    assert schema.dump(session) == marshmallow_dump(schema, session)
    assert schema.dump(session)["forked_from"] == forked_from


@settings(max_examples=100)
@given(
    agent=agents,
    usage=st.fixed_dictionaries(
        {name: st.integers(0, 2**62) for name in ("sessions", "events", "bytes")}
    ),
)
def test_agent_usage_dump(agent, usage):
    schema = schemas.AgentUsageSchema()
    record = dataclasses.asdict(agent) | {"usage": usage}
    assert schema.dump(record) == marshmallow_dump(schema, record)
    assert list(schema.dump(record)["usage"]) == ["sessions", "events", "bytes"]


@settings(max_examples=200)
@given(agent=agents)
def test_agent_dump(agent):
    schema = schemas.AgentSchema()
    assert schema.dump(agent) == marshmallow_dump(schema, agent)


@settings(max_examples=100)
@given(items=st.lists(sessions, max_size=5), page_key=page_keys)
def test_session_page_dump(items, page_key):
    schema = schemas.SessionListSchema()
    body = {"sessions": items, "metadata": {"page_key": page_key}}
    assert schema.dump(body) == marshmallow_dump(schema, body)


@settings(max_examples=100)
@given(items=st.lists(agents, max_size=5), page_key=page_keys)
def test_agent_page_dump(items, page_key):
    schema = schemas.AgentListSchema()
    body = {"agents": items, "metadata": {"page_key": page_key}}
    assert schema.dump(body) == marshmallow_dump(schema, body)


@given(items=st.lists(sessions, max_size=3))
def test_many(items):
    schema = schemas.SessionSchema(many=True)
    assert schema.dump(items) == marshmallow_dump(schema, items)
    assert schemas.SessionSchema().dump(items, many=True) == marshmallow_dump(schema, items)


def test_timestamps_in_another_zone_are_written_in_utc():
    session = Session(
        key="s",
        agent_key="a",
        name="n",
        created_at=dt.datetime(
            2026, 1, 1, 1, 30, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))
        ),
        updated_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    dumped = schemas.SessionSchema().dump(session)
    assert dumped["created_at"] == "2025-12-31T23:30:00.123Z"
    assert dumped["updated_at"] == "2026-01-01T00:00:00.000Z"


class WithMethod(Schema):
    state = fields.Method("get_state")

    def get_state(self, obj):
        return "active"


class Plain(Schema):
    name = fields.String()
    other = fields.String()


class WithHook(Schema):
    name = fields.String()

    @post_dump
    def shout(self, data, **kwargs):
        return {k: v.upper() for k, v in data.items()}


class WithValueField(Schema):
    tags = fields.Dict(keys=fields.String(), values=fields.Integer())


@pytest.mark.parametrize(
    "schema",
    [WithMethod(), WithHook(), WithValueField(), Plain(only=("name",))],
    ids=["method field", "post_dump hook", "dict of typed values", "only"],
)
def test_what_cannot_be_compiled_is_refused(schema):
    with pytest.raises(TypeError):
        schemas.compile_dump(schema)
