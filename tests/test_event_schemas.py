"""Event answers: the compiled dumps answer what Marshmallow's own dump of the same schemas does."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import Schema

from sessions_app.schemas import events
from storage_backends import Event

texts = st.text(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=6,
)
objects = st.dictionaries(texts, json_values, max_size=3)
tool = {"tool_call_id": texts, "tool_configuration_name": texts, "tool_name": texts}
messages = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "content": texts})
    | st.fixed_dictionaries({"type": st.just("skill"), "skill_name": texts}),
    min_size=1,
    max_size=3,
)
FIELDS = {
    "input_message": st.fixed_dictionaries({"messages": messages}),
    "agent_output": st.fixed_dictionaries({"content": texts}),
    "thinking": st.fixed_dictionaries({}, optional={"content": texts}),
    "session_interrupted": st.fixed_dictionaries({}),
    "tool_input": st.fixed_dictionaries({**tool, "tool_input": objects}),
    "tool_output": st.fixed_dictionaries({**tool, "tool_output": objects, "error": st.booleans()}),
    "structured_output": st.fixed_dictionaries({"schema_name": texts, "content": json_values}),
    "step_transition": st.fixed_dictionaries(
        {"from_step": texts, "to_step": texts, "content": texts}
    ),
    "skill_load": st.fixed_dictionaries({"skill_name": texts, "content": texts}),
    "compaction": st.fixed_dictionaries(
        {
            "turns_compacted": st.integers(0, 100),
            "events_compacted": st.integers(0, 100),
            "summary_text": texts,
            "summary_key": texts,
        }
    ),
}
event_list = st.lists(
    st.sampled_from(sorted(FIELDS)).flatmap(
        lambda kind: st.builds(
            Event,
            id=st.from_regex(r"aev_[0-9a-f]{8}", fullmatch=True),
            session_key=st.just("s1"),
            type=st.just(kind),
            fields=FIELDS[kind],
            created_at=st.datetimes(
                min_value=dt.datetime(1970, 1, 1),
                max_value=dt.datetime(9999, 12, 30),
                timezones=st.just(dt.UTC),
            ),
            hide_reason=st.sampled_from([None, "manual", "compaction"]),
        )
    ),
    max_size=5,
)


def test_every_type_has_both_schemas():
    assert set(events.EVENT_VARIANTS) == set(FIELDS) == set(events.TYPE_FIELDS)
    assert set(events.EVENT_IN_VARIANTS) == set(FIELDS) - {"compaction"}


@settings(max_examples=150)
@given(items=event_list, page_key=st.none() | texts)
def test_event_pages(items, page_key):
    schema = events.EventListSchema()
    body = {"events": items, "metadata": {"page_key": page_key}}
    assert schema.dump(body) == Schema.dump(schema, body)
    for item, dumped in zip(items, schema.dump(body)["events"], strict=True):
        variant = events.EVENT_VARIANTS[item.type]()
        flat = {**vars(item), **item.fields}
        assert dumped == variant.dump(flat)
        assert events.EventSchema().dump(item) == dumped
    created = events.EventsCreatedSchema()
    answer = {"events": items, "session_key": "s1"}
    assert created.dump(answer) == Schema.dump(created, answer)
