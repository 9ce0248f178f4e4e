"""Marshmallow schemas: request validation, response shape and OpenAPI, in one place."""

from __future__ import annotations

import datetime as dt
import functools
import numbers
import operator
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from flask import current_app
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    missing,
    post_load,
    pre_load,
    validate,
    validates,
    validates_schema,
)

from storage_backends.codec import dump_json, format_ts, utcnow

from ..corridor import http
from ..corridor.errors import ApiError
from ..corridor.rate_limits import BOUNDS, parse_limit
from ..naming import EVENT_ID_MAX_LENGTH, EVENT_ID_PATTERN, KEY_MAX_LENGTH, KEY_PATTERN, is_event_id
from .common_query import NOT_COMMON, CommonQueryLoad

TTI_MAX_MINUTES = 2**31 - 1
SCOPES = (
    "sessions:create",
    "sessions:read",
    "sessions:update",
    "sessions:delete",
    "events:create",  # a user's input into a session
    "events:append",  # what the agent did: for the agent runtime's keys
)


def is_key(value: str) -> bool:
    return 0 < len(value) <= KEY_MAX_LENGTH and _KEY_CHARS.issuperset(value)


_KEY_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-")


class StrictBoolean(fields.Boolean):
    """Only JSON true and false: no "yes", no 1."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class StrictInteger(fields.Integer):
    """Only JSON integers: no strings, no booleans, no floats."""

    def __init__(self, **kwargs: Any):
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class PageLimit(StrictInteger):
    """A list's ``limit``: its query text read as :meth:`ListQuerySchema.parse_limit` does."""

    def load_text(self, text: str) -> Any:
        """The common case's value (see ``common_query``), checked by the field's validators."""
        if not (text.isascii() and text.isdigit() and len(text) < 6):
            return NOT_COMMON
        value = int(text)
        try:
            for check in self.validators:
                check(value)
        except ValidationError:
            return NOT_COMMON
        return value


class Key(fields.String):
    def __init__(self, **kwargs: Any):
        kwargs.setdefault("metadata", {}).update(
            pattern=KEY_PATTERN, minLength=1, maxLength=KEY_MAX_LENGTH
        )
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        value = super()._deserialize(value, attr, data, **kwargs)
        if not is_key(value):
            raise ValidationError(
                f"Must be 1 to {KEY_MAX_LENGTH} characters of letters, digits, '_' or '-'."
            )
        return value


def _control_characters(value: str, allowed: str = "") -> bool:
    """Whether ``value`` holds a C0 or C1 control character (other than those ``allowed``)."""
    return any((char < " " or "\x7f" <= char <= "\x9f") and char not in allowed for char in value)


# Letters and symbols that render as nothing: the Hangul fillers, the blank Braille cell.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# Format characters (U+200B, U+FEFF, U+2060...) and combining marks with nothing to mark.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Mn", "Me"})


def is_blank(value: str) -> bool:
    """Nothing a reader would see: white space, invisible characters, combining marks alone."""
    return all(
        char.isspace()
        or char in _BLANK_GLYPHS
        or unicodedata.category(char) in _INVISIBLE_CATEGORIES
        for char in value
    )


class Name(fields.String):
    """A display name: not blank, no control characters (they would forge lines in a listing)."""

    def __init__(self, **kwargs: Any):
        super().__init__(validate=validate.Length(min=1, max=255), **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        value = super()._deserialize(value, attr, data, **kwargs)
        if is_blank(value):
            raise ValidationError("Must not be blank.")
        if _control_characters(value):
            raise ValidationError("Must not contain control characters.")
        return value


class Description(fields.String):
    """Free text: tabs and line breaks allowed, other control characters not.

    ``""`` loads as None (see :meth:`BodySchema.empty_description_is_none`).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(validate=validate.Length(max=2000), **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        value = super()._deserialize(value, attr, data, **kwargs)
        if _control_characters(value, allowed="\t\n\r"):
            raise ValidationError(
                "Must not contain control characters other than tab, line feed and return."
            )
        return value


class EventId(fields.String):
    """``aev_`` and then letters and digits, at most 64 characters in all."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("metadata", {}).update(
            pattern=EVENT_ID_PATTERN, maxLength=EVENT_ID_MAX_LENGTH
        )
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        value = super()._deserialize(value, attr, data, **kwargs)
        if not is_event_id(value):
            raise ValidationError(
                f"Must be aev_ and then letters and digits, at most {EVENT_ID_MAX_LENGTH} "
                "characters in all."
            )
        return value


class PageKey(fields.String):
    """The opaque position a list's ``metadata.page_key`` gave; loads as the position."""

    MAX_LENGTH = 200

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("metadata", {}).update(minLength=1, maxLength=self.MAX_LENGTH)
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        value = super()._deserialize(value, attr, data, **kwargs)
        if not 1 <= len(value) <= self.MAX_LENGTH:
            raise ValidationError(f"Length must be between 1 and {self.MAX_LENGTH}.")
        try:
            return http.decode_cursor(value)
        except ValueError:
            raise ValidationError("Not a valid page key.") from None


class Metadata(fields.Dict):
    """A JSON object within the configured bounds (keys, key length, depth, size)."""

    default_error_messages = {"invalid": "Must be a JSON object."}

    def __init__(self, **kwargs: Any):
        super().__init__(keys=fields.String(), **kwargs)

    #: whether ``METADATA_MAX_BYTES`` bounds it (see :func:`check_metadata`)
    sized = True

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> dict:
        if not isinstance(value, dict):
            raise self.make_error("invalid")
        check_metadata(value, sized=self.sized)
        return value


def check_metadata(value: dict[str, Any], *, sized: bool = True) -> None:
    """Raise ValidationError unless ``value`` is within the configured metadata bounds.

    ``sized`` False leaves out the bound on bytes (an event's metadata counts in
    the event's own, ``EVENT_MAX_BYTES``).
    """
    config = current_app.config
    max_keys = config["METADATA_MAX_KEYS"]
    if len(value) > max_keys:
        raise ValidationError(f"At most {max_keys} top-level keys are allowed.")
    check_tree(
        value,
        depth=1,
        max_depth=config["METADATA_MAX_DEPTH"],
        max_key_length=config["METADATA_MAX_KEY_LENGTH"],
    )
    if not sized:
        return
    size = len(dump_json(value).encode())
    if size > config["METADATA_MAX_BYTES"]:
        raise ValidationError(
            f"At most {config['METADATA_MAX_BYTES']} bytes serialized are allowed."
        )


def check_tree(value: Any, *, depth: int, max_depth: int, max_key_length: int) -> None:
    if depth > max_depth:
        raise ValidationError(f"Nesting deeper than {max_depth} levels is not allowed.")
    if isinstance(value, dict):
        children = value.values()
        for key in value:
            if not 1 <= len(key) <= max_key_length:
                raise ValidationError(f"Keys must be 1 to {max_key_length} characters.")
    elif isinstance(value, list):
        children = value
    else:
        return
    for child in children:
        if isinstance(child, dict | list):
            check_tree(child, depth=depth + 1, max_depth=max_depth, max_key_length=max_key_length)


class Timestamp(fields.Field):
    """RFC 3339 UTC with milliseconds and a Z, e.g. 2026-11-28T17:49:52.123Z."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("metadata", {}).update(type="string", format="date-time")
        super().__init__(dump_only=True, **kwargs)

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> str | None:
        return format_ts(value)


# RFC 3339 (section 5.6): full date, T, full time with seconds, then Z or a numeric offset.
_RFC_3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


class Instant(fields.Field):
    """A time given back to the service, such as an export holds: RFC 3339 with an offset.

    ``2026-11-28T17:49:52.123Z`` as the API writes it, or ``+hh:mm`` for another
    zone; never a time without an offset (it would be the local time of whoever
    reads it, which SQLite and PostgreSQL read differently), a bare date or the
    ISO 8601 basic format. Loads as UTC to the millisecond, what storage keeps.
    """

    default_error_messages = {
        "invalid": "Must be an RFC 3339 time with an offset (Z or +hh:mm), "
        "such as 2026-11-28T17:49:52.123Z."
    }

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("metadata", {}).update(type="string", format="date-time")
        super().__init__(**kwargs)

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> str | None:
        return format_ts(value)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> dt.datetime:
        if not isinstance(value, str) or not _RFC_3339.fullmatch(value):
            raise self.make_error("invalid")
        try:
            # A day or an hour out of range; an offset that leaves years 1 to 9999.
            instant = dt.datetime.fromisoformat(value.upper()).astimezone(dt.UTC)
        except (ValueError, OverflowError):
            raise self.make_error("invalid") from None
        return instant.replace(microsecond=instant.microsecond // 1000 * 1000)


# Field types whose dumped value is the attribute itself, for the values storage
# returns (str, int, bool, dict or None): their _serialize only coerces.
_AS_IS = (fields.String, fields.Integer, fields.Boolean, fields.Dict)


class AnswerSchema(Schema):
    """A response shape: an optional field without a value is left out, never sent as null."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._optional = frozenset(
            field.attribute or name
            for name, field in self.dump_fields.items()
            if not field.required
        )

    def get_attribute(self, obj: Any, attr: str, default: Any) -> Any:
        value = super().get_attribute(obj, attr, default)
        if value is None and attr in self._optional:
            return missing
        return value


class ResponseSchema(AnswerSchema):
    """A response shape whose dump is compiled once from its declared fields.

    Marshmallow's dump walks every field of every object through several calls
    each: about 8 µs a session and 90 µs a page of ten here, more than the
    storage read. For plain fields the dumped value is the attribute itself, so
    the compiled dump reads all attributes at once and converts only
    timestamps and nested shapes. ``tests/test_schemas.py`` checks it against
    Marshmallow's own dump for every response schema.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._compiled = compile_dump(self)

    def dump(self, obj: Any, *, many: bool | None = None) -> Any:
        if self.many if many is None else many:
            return [self._compiled(item) for item in obj]
        return self._compiled(obj)


def compile_dump(schema: Schema) -> Callable[[Any], dict[str, Any]]:
    """One function doing ``schema``'s dump, or TypeError for a field it cannot compile."""
    if schema.only or schema.exclude or any(schema._hooks.values()):
        raise TypeError(f"{type(schema).__name__}: only, exclude and hooks are not compiled")
    names, attributes, conversions, optional = [], [], [], []
    for name, field in schema.dump_fields.items():
        key = field.data_key or name
        names.append(key)
        attributes.append(field.attribute or name)
        convert = _conversion(field)
        if convert is not None:
            conversions.append((key, convert))
        if not field.required:
            optional.append(key)
    if len(attributes) == 1:
        read_attribute = lambda obj, name=attributes[0]: (getattr(obj, name),)  # noqa: E731
        read_item = lambda obj, name=attributes[0]: (obj.get(name),)  # noqa: E731
    else:
        read_attribute = operator.attrgetter(*attributes)
        # A mapping may leave an optional key out (``forked_from`` without ``event_id``).
        read_item = lambda obj, names=tuple(attributes): tuple(map(obj.get, names))  # noqa: E731

    readers: dict[type, Callable[[Any], tuple[Any, ...]]] = {}

    def dump(obj: Any) -> dict[str, Any]:
        # The reader by the object's type, worked out once: a Mapping check is an ABC's.
        read = readers.get(type(obj))
        if read is None:
            read = readers[type(obj)] = read_item if isinstance(obj, Mapping) else read_attribute
        out = dict(zip(names, read(obj), strict=True))
        for name in optional:
            if out[name] is None:
                del out[name]  # left out, as AnswerSchema does
        for name, convert in conversions:
            value = out.get(name)
            if value is not None:
                out[name] = convert(value)
        return out

    return dump


def _conversion(field: fields.Field) -> Callable[[Any], Any] | None:
    kind = type(field)
    compiled = getattr(field, "compiled_dump", None)
    if compiled is not None:
        return compiled
    plain = (
        getattr(field, "key_field", None) is None and getattr(field, "value_field", None) is None
    )
    if kind in _AS_IS and plain:
        return None
    if kind is Timestamp:
        return format_ts
    if kind is fields.Nested and isinstance(field.schema, ResponseSchema):
        return field.schema.dump
    if kind is fields.List and type(field.inner) is fields.Nested:
        inner = field.inner.schema
        if isinstance(inner, ResponseSchema):
            return functools.partial(inner.dump, many=True)
    if kind is fields.List and getattr(field.inner, "compiled_dump", None) is not None:
        one = field.inner.compiled_dump
        return lambda items: [one(item) for item in items]
    raise TypeError(f"no compiled dump for {kind.__name__} field {field.name!r}")


class BodySchema(Schema):
    """Request bodies: unknown fields raise, and JSON null means "absent"."""

    class Meta:
        unknown = RAISE

    #: Fields whose null is a value of its own, not "absent".
    KEEP_NULL: frozenset[str] = frozenset()

    @pre_load
    def drop_nulls(self, data: Any, **kwargs: Any) -> Any:
        """A known field sent as null is left out; an unknown one stays, to be refused."""
        if isinstance(data, dict):
            known = self.load_fields
            keep = self.KEEP_NULL
            return {k: v for k, v in data.items() if v is not None or k not in known or k in keep}
        return data

    @post_load
    def empty_description_is_none(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """``""`` is no description: none on create, the one there cleared on update."""
        if data.get("description") == "":
            data["description"] = None
        return data


# Sessions


class ForkedFromSchema(ResponseSchema):
    """Where a forked session came from."""

    class Meta:
        ordered = True

    agent_key = fields.String(required=True)
    session_key = fields.String(required=True)
    event_id = fields.String(metadata={"description": "The last event copied; absent if none."})


class SessionSchema(ResponseSchema):
    """A session as returned by the API."""

    class Meta:
        ordered = True

    key = fields.String(required=True)
    agent_key = fields.String(required=True)
    name = fields.String(required=True)
    description = fields.String()
    metadata = fields.Dict(required=True)
    enabled = fields.Boolean(required=True)
    tti_minutes = fields.Integer(required=True)
    created_at = Timestamp(required=True)
    updated_at = Timestamp(required=True)
    forked_from = fields.Nested(
        ForkedFromSchema, metadata={"description": "Only on a session created by a fork."}
    )


class FromSessionSchema(BodySchema):
    """The source of a forked session."""

    agent_key = Key(metadata={"description": "The source's agent; by default the one in the URL."})
    session_key = Key(required=True)
    include_up_to_event_id = EventId()
    compact_up_to_event_id = EventId()
    summary_text = fields.String(validate=validate.Length(min=1))

    @validates_schema
    def check_anchors(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "include_up_to_event_id" in data and "compact_up_to_event_id" in data:
            raise ValidationError(
                "Give include_up_to_event_id or compact_up_to_event_id, not both.",
                field_name="compact_up_to_event_id",
            )
        if "compact_up_to_event_id" in data and "summary_text" not in data:
            raise ValidationError(
                "Required with compact_up_to_event_id.", field_name="summary_text"
            )
        if "summary_text" in data and "compact_up_to_event_id" not in data:
            raise ValidationError(
                "Only meaningful with compact_up_to_event_id.", field_name="summary_text"
            )


class SessionCreateSchema(BodySchema):
    key = Key(metadata={"description": "Generated from the name when omitted."})
    name = Name(required=True)
    description = Description()
    metadata = Metadata()
    enabled = StrictBoolean()
    tti_minutes = StrictInteger(
        validate=validate.Range(min=0, max=TTI_MAX_MINUTES),
        metadata={"description": "Idle minutes before the session expires; 0 never."},
    )
    from_session = fields.Nested(
        FromSessionSchema,
        metadata={"description": "Fork: start with a copy of this session's visible events."},
    )


class ForkedFromInSchema(BodySchema):
    """``forked_from`` given back, as an export holds it: the source and the last event copied."""

    agent_key = Key(required=True)
    session_key = Key(required=True)
    event_id = EventId()


class ExportedSessionSchema(SessionCreateSchema):
    """A session as ``agent-sessions sessions export`` writes it, read back by ``import``.

    What a create takes, checked as a create checks it, and what the service
    itself sets (keys, times, the fork's source), checked as it would set them.
    """

    class Meta(BodySchema.Meta):
        exclude = ("from_session",)

    key = Key(required=True)
    agent_key = Key(required=True)
    created_at = Instant(required=True)
    updated_at = Instant(required=True)
    active_at = Instant()
    forked_from = fields.Nested(ForkedFromInSchema)


class SessionUpdateSchema(BodySchema):
    name = Name()
    description = Description()
    metadata = Metadata()
    enabled = StrictBoolean()
    tti_minutes = StrictInteger(validate=validate.Range(min=0, max=TTI_MAX_MINUTES))


class ListMetadataSchema(ResponseSchema):
    page_key = fields.String(metadata={"description": "Absent on the last page."})


class SessionListSchema(ResponseSchema):
    sessions = fields.List(fields.Nested(SessionSchema), required=True)
    metadata = fields.Nested(ListMetadataSchema, required=True)


class ListQuerySchema(CommonQueryLoad):
    """Query parameters of list endpoints; an unknown one is refused, naming it."""

    class Meta:
        unknown = RAISE

    limit = PageLimit(load_default=10, validate=validate.Range(min=1, max=100))
    page_key = PageKey(attribute="after")

    @pre_load
    def parse_limit(self, data: Any, **kwargs: Any) -> Any:
        data = dict(data)
        raw = data.get("limit")
        if isinstance(raw, str):
            data["limit"] = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 6 else raw
        return data


#: ``metadata.KEY=VALUE`` parameters one session list may AND together.
METADATA_QUERY_MAX = 4
METADATA_QUERY_PREFIX = "metadata."


class SessionListQuerySchema(ListQuerySchema):
    filter = fields.String(metadata={"description": "A regular expression (RE2 syntax)."})
    # Loaded from every ``metadata.*`` parameter by gather_metadata; the document shows
    # one, with KEY standing for the metadata key.
    metadata_query = fields.Raw(
        data_key="metadata.KEY",
        attribute="metadata",
        metadata={
            "type": "string",
            "description": "Beyond Vectara: `metadata.user_id=u-17` lists only the sessions "
            "whose metadata has the top-level key `user_id` with that value: a string equal "
            "to it, or a number or boolean whose JSON text equals it (`17`, `true`). Up to "
            f"{METADATA_QUERY_MAX} such parameters, on different keys, AND together and with "
            "`filter`; the lookup is indexed, so a page costs the same at any size and depth "
            "(with several keys or a filter a page may end early, with a `page_key`, as a "
            "filtered page does). A key longer than the metadata key bound, an empty one, a "
            "key given twice or a fifth parameter is 400.",
        },
    )

    @pre_load
    def gather_metadata(self, data: Any, **kwargs: Any) -> Any:
        """``metadata.KEY=VALUE`` parameters as one mapping of KEY to VALUE, checked."""
        data = dict(data)
        found = {
            name[len(METADATA_QUERY_PREFIX) :]: data.pop(name)
            for name in list(data)
            if name.startswith(METADATA_QUERY_PREFIX)
        }
        if not found:
            return data
        max_length = current_app.config["METADATA_MAX_KEY_LENGTH"]
        for key, value in found.items():
            name = (METADATA_QUERY_PREFIX + key)[:200]
            if not 1 <= len(key) <= max_length:
                _bad_query(name, f"Metadata keys are 1 to {max_length} characters.")
            if "\x00" in key or "\x00" in value:
                _bad_query(name, "NUL characters are not allowed.")
        if len(found) > METADATA_QUERY_MAX:
            _bad_query(
                METADATA_QUERY_PREFIX + "KEY",
                f"At most {METADATA_QUERY_MAX} metadata parameters, on different keys.",
            )
        data["metadata.KEY"] = found
        return data


def _bad_query(name: str, message: str) -> None:
    """A bad ``metadata.KEY`` parameter: a 400 naming it (``invalid_request``: a query
    parameter, not a body's metadata)."""
    raise ApiError(400, "invalid_request", f"{name}: {message}", field_errors={name: message})


# Agents


class AgentSchema(ResponseSchema):
    class Meta:
        ordered = True

    key = fields.String(required=True)
    name = fields.String(required=True)
    description = fields.String()
    metadata = fields.Dict(required=True)
    enabled = fields.Boolean(required=True)
    created_at = Timestamp(required=True)
    updated_at = Timestamp(required=True)


class UsageSchema(ResponseSchema):
    class Meta:
        ordered = True

    sessions = fields.Integer(required=True)
    events = fields.Integer(required=True)
    bytes = fields.Integer(required=True)


class AgentUsageSchema(AgentSchema):
    """An agent with what it stores (``usage``, not part of its ETag), for admin keys."""

    usage = fields.Nested(UsageSchema, required=True)


class AgentCreateSchema(BodySchema):
    key = Key(required=True)
    name = Name(required=True)
    description = Description()
    metadata = Metadata()
    enabled = StrictBoolean()


class AgentUpdateSchema(BodySchema):
    name = Name()
    description = Description()
    metadata = Metadata()
    enabled = StrictBoolean()


class AgentListSchema(ResponseSchema):
    agents = fields.List(fields.Nested(AgentSchema), required=True)
    metadata = fields.Nested(ListMetadataSchema, required=True)


# API keys


class GrantSchema(Schema):
    class Meta:
        unknown = RAISE

    agent = fields.String(
        required=True, metadata={"description": "An agent key, or * for every agent."}
    )
    scopes = fields.List(
        fields.String(validate=validate.OneOf(SCOPES)),
        required=True,
        validate=validate.Length(min=1),
    )

    @validates("agent")
    def check_agent(self, value: str, **kwargs: Any) -> None:
        if value != "*" and not is_key(value):
            raise ValidationError("Must be an agent key or *.")


class LimitString(fields.String):
    """A rate limit such as "30/minute", within the bounds every limit keeps."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        value = super()._deserialize(value, attr, data, **kwargs)
        try:
            parse_limit(value)
        except ValueError:
            raise ValidationError(f'Must be a rate limit such as "30/minute": {BOUNDS}.') from None
        return value


class ApiKeySchema(AnswerSchema):
    class Meta:
        ordered = True

    id = fields.String(required=True)
    name = fields.String(required=True)
    grants = fields.List(fields.Nested(GrantSchema), required=True)
    admin = fields.Boolean(required=True)
    create_limit = fields.String()
    created_at = Timestamp(required=True)
    expires_at = Timestamp()
    revoked_at = Timestamp()
    state = fields.Method(
        "get_state",
        required=True,
        metadata={"type": "string", "enum": ["active", "revoked", "expired"]},
    )

    def get_state(self, key: Any) -> str:
        return key.state(utcnow())


class ApiKeyCreatedSchema(ApiKeySchema):
    secret = fields.String(
        required=True, metadata={"description": "The API key. Shown only in this response."}
    )


class ApiKeyCreateSchema(BodySchema):
    name = Name(required=True)
    grants = fields.List(fields.Nested(GrantSchema), load_default=list)
    admin = StrictBoolean(load_default=False)
    create_limit = LimitString()
    expires_at = fields.AwareDateTime(
        format="iso",
        default_timezone=None,
        # Storage writes four-digit UTC years; outside this range a key would not read back.
        validate=validate.Range(
            min=dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
            max=dt.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=dt.UTC),
            error="Must be between 1970-01-01 and 9999-12-31 (UTC).",
        ),
    )


class ApiKeyListSchema(AnswerSchema):
    api_keys = fields.List(fields.Nested(ApiKeySchema), required=True)
    metadata = fields.Nested(ListMetadataSchema, required=True)


class ErrorSchema(Schema):
    error = fields.String(required=True)
    messages = fields.List(fields.String(), required=True)
    field_errors = fields.Dict(keys=fields.String(), values=fields.String())
    request_id = fields.String(required=True)


# The service's own answers


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok"]})


class ReadinessSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok", "unavailable"]})
    storage = fields.String(required=True, metadata={"enum": ["ok", "unavailable"]})
    rate_limit = fields.String(required=True, metadata={"enum": ["ok", "degraded"]})
