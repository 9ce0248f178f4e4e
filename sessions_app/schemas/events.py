"""Session events: the schemas of a session's history and of its endpoints.

Every event type has one request schema (``...EventInSchema``: what a batch may
carry) and one answer schema (``...EventSchema``: what the API returns), built
from the same field declarations, so validation, answers and the OpenAPI
document say the same thing. A JSON object whose ``type`` picks its schema is a
:class:`Tagged` field (or, for a whole body or answer, a :class:`TaggedSchema`);
the OpenAPI document describes both as ``oneOf`` with a ``discriminator``.

Bounds: an event is at most ``EVENT_MAX_BYTES`` as answered (checked by
:func:`check_size`, a 413), its JSON values (``tool_input``, ``tool_output``,
``structured_output`` content) at most ``EVENT_MAX_DEPTH`` levels deep, its
names (tool, skill, step, schema names and tool call ids) 1 to 255 characters.
NUL characters and unpaired surrogates never get this far: the body parser
refuses them (``http.parse``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flask import current_app
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from storage_backends.base import HIDDEN_BY_COMPACTION, HIDDEN_MANUAL, Event
from storage_backends.codec import dump_json, format_ts

from ..corridor.errors import ApiError
from ..naming import EVENT_ID_MAX_LENGTH, EVENT_ID_PATTERN, EVENT_ID_PREFIX, is_event_id
from . import (
    TTI_MAX_MINUTES,
    AnswerSchema,
    BodySchema,
    Description,
    EventId,
    Instant,
    ListMetadataSchema,
    ListQuerySchema,
    Metadata,
    Name,
    PageLimit,
    ResponseSchema,
    StrictBoolean,
    StrictInteger,
    Timestamp,
    check_tree,
)
from .common_query import NOT_COMMON

NAME_MAX_LENGTH = 255
MESSAGES_MAX = 100
#: Events a page may hold: Vectara's 100, and beyond it up to 1,000 for clients that ask.
PAGE_MAX = 1000
#: Types only the service writes (compact and fork); a batch cannot carry them.
SERVICE_TYPES = frozenset({"compaction"})
#: How an input is to meet a run already under way: told to the agent runtime.
BEHAVIORS = ("steer", "follow_up")
#: ``since``'s value for "from the session's first event".
SINCE_START = "start"
#: The most events an answer to ``since`` lists (a page of GET /events at Vectara's largest
#: limit); past it the input is refused, unwritten, so that no answer is silently cut short.
SINCE_MAX_EVENTS = 100


# Fields


class Label(fields.String):
    """A name (of a tool, skill, step or schema) or a tool call id: 1 to 255 characters."""

    def __init__(self, **kwargs: Any):
        super().__init__(validate=validate.Length(min=1, max=NAME_MAX_LENGTH), **kwargs)


class Text(fields.String):
    """Free text of any length (the event's size bounds it)."""


class JsonValue(fields.Raw):
    """Any JSON value, nested at most ``EVENT_MAX_DEPTH`` levels."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        check_depth(value, current_app.config["EVENT_MAX_DEPTH"])
        return value


class JsonObject(JsonValue):
    """A JSON object, nested at most ``EVENT_MAX_DEPTH`` levels."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("metadata", {}).update(type="object")
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, dict):
            raise ValidationError("Must be a JSON object.")
        return super()._deserialize(value, attr, data, **kwargs)


def check_depth(value: Any, max_depth: int) -> None:
    """Raise ValidationError when ``value`` nests objects and arrays deeper than ``max_depth``.

    Iterative, so no depth the parser accepts can exhaust the stack here.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise ValidationError(f"Nesting deeper than {max_depth} levels is not allowed.")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


class BoundedList(fields.List):
    """A list whose length is checked before its items are loaded: a body of a hundred
    thousand items is refused at once, not after loading each.

    ``high`` is a number, or the name of the setting that holds it (the OpenAPI
    document reads the same setting).
    """

    def __init__(self, inner: fields.Field, *, low: int, high: int | str, **kwargs: Any):
        if isinstance(high, int):
            kwargs["validate"] = validate.Length(min=low, max=high)
        super().__init__(inner, **kwargs)
        self.low, self.high = low, high

    def bound(self) -> int:
        high = self.high
        return high if isinstance(high, int) else current_app.config[high]

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list:
        if isinstance(value, list) and not self.low <= len(value) <= self.bound():
            if self.low == 0:
                raise ValidationError(f"Must hold at most {self.bound()} items.")
            raise ValidationError(f"Must hold {self.low} to {self.bound()} items.")
        return super()._deserialize(value, attr, data, **kwargs)


class Tagged(fields.Field):
    """A JSON object whose ``type`` picks the schema that loads (or describes) it.

    ``refused`` names types that exist but are not accepted here, with the reason.
    ``dump``, when given, shapes answers (and is what compiled dumps call).
    """

    def __init__(
        self,
        variants: Mapping[str, type[Schema]],
        *,
        refused: Mapping[str, str] | None = None,
        dump: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.variants = dict(variants)
        self.refused = dict(refused or {})
        self.compiled_dump = dump
        self._schemas: dict[str, Schema] = {}

    def schema(self, kind: str) -> Schema:
        schema = self._schemas.get(kind)
        if schema is None:
            schema = self._schemas[kind] = self.variants[kind]()
        return schema

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> Any:
        return value if self.compiled_dump is None else self.compiled_dump(value)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        return load_tagged(self, value)


def load_tagged(union: Tagged | TaggedSchema, value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValidationError("Must be a JSON object.")
    kind = value.get("type")
    if kind is None:
        raise ValidationError({"type": ["Missing data for required field."]})
    if isinstance(kind, str) and kind in union.refused:
        raise ValidationError({"type": [union.refused[kind]]})
    if not isinstance(kind, str) or kind not in union.variants:
        raise ValidationError({"type": [f"Must be one of: {', '.join(union.variants)}."]})
    return union.schema(kind).load(value)


class TaggedSchema(Schema):
    """A body or answer that is one of ``VARIANTS``, picked by its ``type``."""

    VARIANTS: Mapping[str, type[Schema]] = {}
    refused: Mapping[str, str] = {}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.variants = dict(self.VARIANTS)
        self._schemas: dict[str, Schema] = {}

    schema = Tagged.schema

    def load(self, data: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return load_tagged(self, data)


# Messages of an input_message


def _typed(kind: str) -> fields.String:
    return fields.String(required=True, validate=validate.Equal(kind))


class TextInputSchema(BodySchema):
    type = _typed("text")
    content = Text(required=True)


class SkillInputSchema(BodySchema):
    type = _typed("skill")
    skill_name = Label(required=True)


MESSAGE_VARIANTS = {"text": TextInputSchema, "skill": SkillInputSchema}


def _messages() -> fields.Field:
    return BoundedList(Tagged(MESSAGE_VARIANTS), low=1, high=MESSAGES_MAX, required=True)


# Event types: the fields of each, declared once


def _count() -> fields.Integer:
    bounds = validate.Range(min=0, max=2**63 - 1, error="Must be a count, from 0 to 2^63 - 1.")
    return StrictInteger(required=True, validate=bounds)


def _tool_fields() -> dict[str, fields.Field]:
    return {
        "tool_call_id": Label(required=True),
        "tool_configuration_name": Label(required=True),
        "tool_name": Label(required=True),
    }


def _behavior() -> fields.Field:
    return fields.String(
        validate=validate.OneOf(BEHAVIORS),
        metadata={"description": "How the agent runtime is to take this input while it runs."},
    )


TYPE_FIELDS: dict[str, Callable[[], dict[str, fields.Field]]] = {
    "input_message": lambda: {"messages": _messages(), "behavior": _behavior()},
    "agent_output": lambda: {"content": Text(required=True)},
    "thinking": lambda: {"content": Text()},
    "tool_input": lambda: {**_tool_fields(), "tool_input": JsonObject(required=True)},
    "tool_output": lambda: {
        **_tool_fields(),
        "tool_output": JsonObject(required=True),
        "error": StrictBoolean(load_default=False, dump_default=False),
    },
    "structured_output": lambda: {
        "schema_name": Label(required=True),
        "content": JsonValue(required=True, allow_none=True),
    },
    "step_transition": lambda: {
        "from_step": Label(required=True),
        "to_step": Label(required=True),
        "content": Text(required=True),
    },
    "skill_load": lambda: {"skill_name": Label(required=True), "content": Text(required=True)},
    # Written by {"type": "interrupt"}; no fields of its own.
    "session_interrupted": dict,
    # As compact and fork write it: counts of what it hid, its summary, its own id as the key.
    "compaction": lambda: {
        "turns_compacted": _count(),
        "events_compacted": _count(),
        "summary_text": Text(required=True, validate=validate.Length(min=1)),
        "summary_key": EventId(required=True),
    },
}
EVENT_TYPES = tuple(TYPE_FIELDS)


def _class_name(kind: str) -> str:
    return "".join(part.capitalize() for part in kind.split("_"))


class EventMetadata(Metadata):
    """An event's own metadata: bounded like a session's in keys, key length and depth;
    its bytes count in the event's (``EVENT_MAX_BYTES``)."""

    sized = False

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("metadata", {}).update(
            description="Beyond Vectara: any JSON object, bounded like session metadata in "
            "keys, key length and depth, and counted in the event's size. Absent when not sent."
        )
        super().__init__(**kwargs)


class EventInSchema(BodySchema):
    """An event a batch carries: its type's fields, and optionally its own id and metadata."""

    # structured_output's content may be JSON null, a value like any other.
    KEEP_NULL = frozenset({"content"})

    id = EventId(metadata={"description": "Assigned by the service when omitted."})
    metadata = EventMetadata()


def _hide_reason() -> fields.String:
    return fields.String(
        validate=validate.OneOf([HIDDEN_MANUAL, HIDDEN_BY_COMPACTION]),
        metadata={"description": "Absent on a visible event."},
    )


class StoredEventSchema(EventInSchema):
    """An event as an export holds it: what the service set (id, time, hide_reason) too."""

    id = EventId(required=True)
    created_at = Instant(required=True)
    hide_reason = _hide_reason()


class EventBaseSchema(AnswerSchema):
    class Meta:
        ordered = True

    id = fields.String(required=True, metadata={"pattern": EVENT_ID_PATTERN})
    session_key = fields.String(required=True)
    created_at = Timestamp(required=True)
    hide_reason = _hide_reason()
    metadata = fields.Dict(
        metadata={
            "description": "Beyond Vectara: the event's metadata, as written; absent "
            "when none was sent."
        }
    )


def _event_schemas() -> tuple[dict[str, type[Schema]], dict[str, type[Schema]]]:
    requests: dict[str, type[Schema]] = {}
    answers: dict[str, type[Schema]] = {}
    for kind, declare in TYPE_FIELDS.items():
        name = _class_name(kind)
        if kind not in SERVICE_TYPES:
            attrs = {"type": _typed(kind), **declare()}
            if kind != "structured_output":
                attrs["KEEP_NULL"] = frozenset()
            requests[kind] = type(f"{name}EventInSchema", (EventInSchema,), attrs)
        answer = {"type": _typed(kind), **declare()}
        answer["Meta"] = type("Meta", (), {"ordered": True})
        answers[kind] = type(f"{name}EventSchema", (EventBaseSchema,), answer)
    return requests, answers


EVENT_IN_VARIANTS, EVENT_VARIANTS = _event_schemas()
#: What an imported export may hold: every type's fields, checked as a batch checks
#: them, and the service's own types as the service writes them (an export carries
#: its compactions).
STORED_EVENT_VARIANTS: dict[str, type[Schema]] = {
    kind: type(
        f"{_class_name(kind)}StoredEventSchema",
        (StoredEventSchema,),
        {
            "type": _typed(kind),
            **({} if kind == "structured_output" else {"KEEP_NULL": frozenset()}),
            **TYPE_FIELDS[kind](),
        },
    )
    for kind in TYPE_FIELDS
}
REFUSED_IN_BATCH = {
    kind: f"{kind} events are written by the service only." for kind in SERVICE_TYPES
}


def dump_event(event: Event | dict[str, Any]) -> dict[str, Any]:
    """An event as the API answers it: id, session_key, type, created_at, hide_reason?, fields.

    A dict is an event already dumped (:func:`events_within`'s), and is answered as it is.
    """
    if type(event) is dict:
        return event
    out: dict[str, Any] = {
        "id": event.id,
        "session_key": event.session_key,
        "type": event.type,
        "created_at": format_ts(event.created_at),
    }
    if event.hide_reason is not None:
        out["hide_reason"] = event.hide_reason
    out.update(event.fields)
    return out


def event_field() -> Tagged:
    return Tagged(EVENT_VARIANTS, dump=dump_event)


def check_size(index: int | str | None, event: Event) -> None:
    """413 ``payload_too_large`` unless ``event`` serializes to at most ``EVENT_MAX_BYTES``.

    ``index``: the event's place in a batch, or the field that made it (a string).
    """
    limit = current_app.config["EVENT_MAX_BYTES"]
    size = len(dump_json(dump_event(event)).encode())
    if size > limit:
        where = "event" if index is None else index
        if isinstance(index, int):
            where = f"events.{index}"
        raise ApiError(
            413,
            "payload_too_large",
            f"{where}: the event serializes to {size} bytes; at most {limit} are allowed.",
        )


def events_within(events: list[Event | dict[str, Any]], budget: int) -> int:
    """How many of ``events`` (or of their dumps), from the first, serialize to at most
    ``budget`` bytes as answered (at least one: a page always moves on)."""
    total = 0
    for count, event in enumerate(events):
        total += len(dump_json(dump_event(event)).encode())
        if total > budget:
            return max(count, 1)
    return len(events)


def events_bytes(text: str, answer: dict[str, Any]) -> int:
    """What the events of a dumped page ``answer`` serialize to, one by one, in bytes,
    from ``text``, the answer's compact JSON: that text less the answer's with no
    events, and less the commas between them."""
    envelope = dump_json({**answer, "events": []})
    return len(text.encode()) - len(envelope.encode()) - max(len(answer["events"]) - 1, 0)


# Answers


class EventSchema(TaggedSchema):
    """One event, of any type."""

    VARIANTS = EVENT_VARIANTS

    def dump(self, obj: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return dump_event(obj)


class ExportedEventSchema(TaggedSchema):
    """An event line of an export, of any type (``agent-sessions sessions import``)."""

    VARIANTS = STORED_EVENT_VARIANTS


class EventListSchema(ResponseSchema):
    events = fields.List(event_field(), required=True)
    metadata = fields.Nested(ListMetadataSchema, required=True)


class EventsCreatedSchema(ResponseSchema):
    events = fields.List(event_field(), required=True)
    session_key = fields.String(required=True)


class EventsPoppedSchema(ResponseSchema):
    events = fields.List(
        event_field(),
        required=True,
        metadata={"description": "The event deleted; empty when the history was."},
    )
    session_key = fields.String(required=True)


# Request bodies


class Since(fields.String):
    """An event id, or ``start``."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("metadata", {}).update(
            pattern=rf"^({SINCE_START}|{EVENT_ID_PREFIX}[0-9a-zA-Z]+)$",
            maxLength=EVENT_ID_MAX_LENGTH,
        )
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        value = super()._deserialize(value, attr, data, **kwargs)
        if value != SINCE_START and not is_event_id(value):
            raise ValidationError(
                f'Must be "{SINCE_START}" or an event id: aev_ and then letters and digits, '
                f"at most {EVENT_ID_MAX_LENGTH} characters in all."
            )
        return value


class InputMessageBodySchema(BodySchema):
    type = _typed("input_message")
    messages = _messages()
    behavior = _behavior()
    since = Since(
        metadata={
            "description": "An event of this session, or start: the answer lists every "
            "visible event written after it (from the first for start), this input last, "
            f"in order. At most {SINCE_MAX_EVENTS} events: past that the request is a 400 "
            "and nothing is written (page through GET .../events instead)."
        }
    )
    metadata = EventMetadata()
    stream_response = StrictBoolean(
        load_default=False,
        metadata={"description": "Answer text/event-stream: the events, then an end event."},
    )


class CompactBodySchema(BodySchema):
    type = _typed("compact")
    compact_up_to_event_id = EventId(
        metadata={
            "description": "Hide the visible events up to and including this one. By default, "
            "all but the last input_message and what follows it."
        }
    )
    summary_text = Text(required=True, validate=validate.Length(min=1))
    stream_response = StrictBoolean(load_default=False)


class InterruptBodySchema(BodySchema):
    """Appends one session_interrupted event, for the agent runtime to read."""

    type = _typed("interrupt")
    metadata = EventMetadata()
    stream_response = StrictBoolean(load_default=False)


class EventCreateSchema(TaggedSchema):
    """The body of POST /events: a user's input or interruption, or a compaction of the
    history."""

    VARIANTS = {
        "input_message": InputMessageBodySchema,
        "interrupt": InterruptBodySchema,
        "compact": CompactBodySchema,
    }


class MetadataPatch(fields.Dict):
    """A merge patch no deeper than metadata may be (a deeper one could only make it too deep)."""

    def __init__(self, **kwargs: Any):
        super().__init__(keys=fields.String(), **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> dict:
        patch = super()._deserialize(value, attr, data, **kwargs)
        config = current_app.config
        try:
            check_tree(
                patch,
                depth=1,
                max_depth=config["METADATA_MAX_DEPTH"],
                max_key_length=config["METADATA_MAX_KEY_LENGTH"],
            )
        except ValidationError as err:
            message = " ".join(err.messages)
            raise ApiError(
                400,
                "invalid_metadata",
                f"metadata_patch: {message}",
                field_errors={"metadata_patch": message},
            ) from None
        return patch


class SessionIfMissingSchema(BodySchema):
    """The session a batch creates when its key has none (the key is the URL's)."""

    name = Name(required=True)
    description = Description()
    metadata = Metadata()
    enabled = StrictBoolean()
    tti_minutes = StrictInteger(validate=validate.Range(min=0, max=TTI_MAX_MINUTES))
    exclusive = StrictBoolean(
        metadata={
            "description": "true: only create; a live session with the key is 409 conflict "
            "and nothing of the batch is written."
        }
    )


#: An agent's state document key: ``app``, ``user:u-17``...
STATE_KEY_PATTERN = r"^[0-9A-Za-z_.:@-]+$"
STATE_KEY_MAX_LENGTH = 128
#: State documents one batch may patch, or one read may ask for.
STATE_KEYS_MAX = 16
_STATE_KEY = re.compile(STATE_KEY_PATTERN[:-1] + r"\Z")


def is_state_key(value: str) -> bool:
    return len(value) <= STATE_KEY_MAX_LENGTH and _STATE_KEY.match(value) is not None


STATE_KEY_RULE = f"Must be 1 to {STATE_KEY_MAX_LENGTH} letters, digits or any of _ . : @ -."


class DocumentPatch(fields.Dict):
    """A merge patch of a state document: an object no deeper than metadata may be."""

    def __init__(self, **kwargs: Any):
        super().__init__(keys=fields.String(), **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> dict:
        patch = super()._deserialize(value, attr, data, **kwargs)
        config = current_app.config
        check_tree(
            patch,
            depth=1,
            max_depth=config["METADATA_MAX_DEPTH"],
            max_key_length=config["METADATA_MAX_KEY_LENGTH"],
        )
        return patch


class StatePatch(fields.Dict):
    """State document keys to JSON merge patches, each no deeper than metadata may be."""

    def __init__(self, **kwargs: Any):
        super().__init__(keys=fields.String(), values=DocumentPatch(), **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> dict:
        if isinstance(value, dict):
            if not 1 <= len(value) <= STATE_KEYS_MAX:
                raise ValidationError(f"Must name 1 to {STATE_KEYS_MAX} state documents.")
            for key in value:
                if not isinstance(key, str) or not is_state_key(key):
                    raise ValidationError({str(key)[:200]: [STATE_KEY_RULE]})
        return super()._deserialize(value, attr, data, **kwargs)


class EventBatchSchema(BodySchema):
    # Null is a value here: "the session has no event yet".
    KEEP_NULL = frozenset({"if_last_event_id"})

    events = BoundedList(
        Tagged(EVENT_IN_VARIANTS, refused=REFUSED_IN_BATCH),
        low=0,
        high="EVENTS_BATCH_MAX",
        required=True,
        metadata={
            "description": "1 to EVENTS_BATCH_MAX events (1,000 by default); none is allowed "
            "when the batch has create_session, metadata_patch or state_patch."
        },
    )
    if_last_event_id = EventId(
        allow_none=True,
        metadata={
            "description": "Write only while the session's last event has this id "
            "(null: while it has none); else 409 conflict."
        },
    )
    metadata_patch = MetadataPatch(
        metadata={"description": "A JSON merge patch (RFC 7386) of the session's metadata."},
    )
    create_session = fields.Nested(
        SessionIfMissingSchema,
        metadata={
            "description": "Beyond Vectara: create the session with these fields (its key is "
            "the URL's) when it does not exist, in the batch's transaction. Needs "
            "sessions:create too."
        },
    )
    state_patch = StatePatch(
        metadata={
            "description": "Beyond Vectara: the agent's state documents (shared by its "
            "sessions) to change, by key, each with a JSON merge patch (RFC 7386), in the "
            "batch's transaction. Each result stays within the metadata bounds."
        },
    )

    @validates_schema
    def check_events(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data.get("events") and not {"create_session", "metadata_patch", "state_patch"} & (
            data.keys()
        ):
            raise ValidationError(
                "Must hold at least one event, unless the batch has create_session, "
                "metadata_patch or state_patch.",
                field_name="events",
            )


class EventPopSchema(BodySchema):
    if_last_event_id = EventId(
        metadata={
            "description": "Pop only while the session's newest event has this id; else 409 "
            "conflict and nothing is deleted."
        }
    )


# The list's query


class QueryBoolean(fields.Boolean):
    """Exactly ``true`` or ``false`` in a query string."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if value == "true":
            return True
        if value == "false":
            return False
        raise ValidationError("Must be true or false.")

    def load_text(self, text: str) -> Any:
        """The common case's value (see ``common_query``)."""
        return _QUERY_BOOLEANS.get(text, NOT_COMMON)


_QUERY_BOOLEANS = {"true": True, "false": False}


class TypeList(fields.String):
    """A comma-separated list of event types."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> frozenset[str]:
        value = super()._deserialize(value, attr, data, **kwargs)
        kinds = value.split(",")
        unknown = [kind for kind in kinds if kind not in TYPE_FIELDS]
        if unknown:
            raise ValidationError(
                f"Unknown event type {unknown[0][:64]!r}; use {', '.join(EVENT_TYPES)}."
            )
        return frozenset(kinds)


class EventListQuerySchema(ListQuerySchema):
    limit = PageLimit(
        load_default=10,
        validate=validate.Range(min=1, max=PAGE_MAX),
        metadata={
            "description": "Events per page: 1 to 100 as in Vectara, and beyond it up to "
            "1,000. A page also ends early once its events serialize to "
            "EVENTS_PAGE_MAX_BYTES, with a page_key to go on."
        },
    )
    page_key = fields.String(
        validate=validate.Length(min=1, max=200),
        metadata={"description": "The page_key of the previous page of this list, same order."},
    )
    include_hidden = QueryBoolean(load_default=False)
    order = fields.String(
        load_default="asc",
        validate=validate.OneOf(["asc", "desc"]),
        metadata={"description": "asc: oldest first; desc: newest first."},
    )
    type = TypeList(
        attribute="types",
        metadata={"description": "Only events of these types (comma-separated)."},
    )
