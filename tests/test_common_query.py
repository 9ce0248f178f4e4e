"""A list query's common case (schemas.common_query) loads as Marshmallow's full load does."""

from __future__ import annotations

from typing import Any
from unittest import mock

import flask
import pytest
from marshmallow import Schema, ValidationError

from sessions_app.corridor import http
from sessions_app.schemas import ListQuerySchema, SessionListQuerySchema
from sessions_app.schemas.events import EventListQuerySchema
from sessions_app.schemas.state import EventPageQuerySchema

SCHEMAS = (ListQuerySchema, SessionListQuerySchema, EventListQuerySchema, EventPageQuerySchema)

QUERIES = [
    {},
    {"limit": "1"},
    {"limit": "10"},
    {"limit": "007"},
    {"limit": "100"},
    {"limit": "101"},
    {"limit": "1000"},
    {"limit": "1001"},
    {"limit": "0"},
    {"limit": "-1"},
    {"limit": "+5"},
    {"limit": " 5"},
    {"limit": "5.0"},
    {"limit": "１０"},
    {"limit": "99999"},
    {"limit": "100000"},
    {"limit": ""},
    {"limit": "ten"},
    {"order": "desc"},
    {"order": "asc", "limit": "20"},
    {"order": "DESC"},
    {"order": ""},
    {"limit": "20", "order": "desc"},
    {"include_hidden": "true"},
    {"include_hidden": "false", "order": "desc"},
    {"include_hidden": "True"},
    {"include_hidden": "1"},
    {"include_session": "true", "limit": "5"},
    {"include_session": "yes"},
    {"include_state": "app"},
    {"type": "agent_output,input_message"},
    {"type": "nonsense"},
    {"page_key": http.encode_cursor(5)},
    {"page_key": "x"},
    {"filter": "billing"},
    {"metadata.user_id": "u-17", "limit": "5"},
    {"unknown": "1"},
    {"limit": "20", "unknown": "1"},
]


def full_load(schema: Schema, query: dict[str, Any]) -> Any:
    """What Marshmallow's own load answers: the loaded dict or the refusal's messages."""
    try:
        return Schema.load(schema, query)
    except ValidationError as err:
        return ("refused", err.messages)


def load(schema: Schema, query: dict[str, Any]) -> Any:
    try:
        return schema.load(query)
    except ValidationError as err:
        return ("refused", err.messages)


@pytest.fixture(autouse=True)
def app_context():
    app = flask.Flask(__name__)
    app.config["METADATA_MAX_KEY_LENGTH"] = 128
    with app.app_context():
        yield


@pytest.mark.parametrize("schema_class", SCHEMAS, ids=lambda cls: cls.__name__)
def test_the_common_case_loads_as_the_full_load(schema_class: type[Schema]) -> None:
    schema = schema_class()
    for query in QUERIES:
        assert load(schema, query) == full_load(schema, query), query


@pytest.mark.parametrize(
    "query",
    [{}, {"limit": "20", "order": "desc"}, {"include_hidden": "true", "include_session": "false"}],
)
def test_a_common_query_skips_marshmallows_load(query: dict[str, str]) -> None:
    schema = EventPageQuerySchema()
    expected = full_load(schema, query)
    with mock.patch.object(Schema, "load", side_effect=AssertionError("full load")):
        assert schema.load(query) == expected


@pytest.mark.parametrize(
    "query", [{"limit": "0"}, {"order": "DESC"}, {"type": "thinking"}, {"unknown": "1"}]
)
def test_anything_else_is_left_to_the_full_load(query: dict[str, str]) -> None:
    schema = EventPageQuerySchema()
    with mock.patch.object(Schema, "load", return_value="full") as full:
        assert schema.load(query) == "full"
    full.assert_called_once()


def test_the_defaults_are_fresh_each_load() -> None:
    schema = EventPageQuerySchema()
    first = schema.load({})
    first["limit"] = 99
    assert schema.load({})["limit"] == 10
