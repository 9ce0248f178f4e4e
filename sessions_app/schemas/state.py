"""An agent's state documents, and the history read that carries its context along.

``GET /v2/agents/{agent}/state`` reads documents by key; ``GET .../events`` may
answer, with its page, the session itself (``include_session=true``) and some
of the agent's state documents (``include_state=KEYS``), so that a runtime
loading a conversation reads what it needs in one request per page.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields

from . import ResponseSchema, SessionSchema, Timestamp
from .events import (
    STATE_KEY_PATTERN,
    STATE_KEY_RULE,
    STATE_KEYS_MAX,
    EventListQuerySchema,
    EventListSchema,
    QueryBoolean,
    is_state_key,
)


class StateKeys(fields.String):
    """A comma-separated list of state document keys, each once."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list[str]:
        value = super()._deserialize(value, attr, data, **kwargs)
        keys = value.split(",")
        if not 1 <= len(keys) <= STATE_KEYS_MAX:
            raise ValidationError(f"Name 1 to {STATE_KEYS_MAX} state documents.")
        bad = next((key for key in keys if not is_state_key(key)), None)
        if bad is not None:
            raise ValidationError(f"{bad[:64]!r}: {STATE_KEY_RULE}")
        if len(set(keys)) != len(keys):
            raise ValidationError("Name each state document once.")
        return keys


STATE_KEYS_DESCRIPTION = (
    f"The documents' keys, comma-separated (1 to {STATE_KEYS_MAX}), each matching "
    f"{STATE_KEY_PATTERN} and at most 128 characters: `app,user:u-17`."
)


class StateDocumentSchema(ResponseSchema):
    class Meta:
        ordered = True

    key = fields.String(required=True)
    value = fields.Dict(required=True, metadata={"description": "`{}` until written."})
    updated_at = Timestamp(metadata={"description": "Absent on a document never written."})


class EventPageQuerySchema(EventListQuerySchema):
    include_session = QueryBoolean(
        load_default=False,
        metadata={
            "description": "Beyond Vectara: `true` answers the session too (`session`), as "
            "its GET would, read after the page's events."
        },
    )
    include_state = StateKeys(
        metadata={
            "description": "Beyond Vectara: the agent's state documents to answer too "
            f"(`state`), read after the session. {STATE_KEYS_DESCRIPTION}"
        },
    )


class EventPageSchema(EventListSchema):
    session = fields.Nested(
        SessionSchema, metadata={"description": "With `include_session=true` only."}
    )
    state = fields.List(
        fields.Nested(StateDocumentSchema),
        metadata={"description": "With `include_state` only, in the order asked."},
    )
