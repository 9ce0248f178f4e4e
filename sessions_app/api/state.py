"""An agent's state documents: what its runtime keeps across sessions, read by key (they are
written by event batches' ``state_patch``, in the transaction of the events)."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields

from ..corridor import auth, rate_limits
from ..corridor.errors import ApiError
from ..schemas import ResponseSchema, Timestamp, check_metadata
from ..schemas.events import (
    STATE_KEY_PATTERN,
    STATE_KEY_RULE,
    STATE_KEYS_MAX,
    is_state_key,
)
from .endpoint import bp, endpoint, service


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


class StateQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    keys = StateKeys(
        required=True,
        metadata={
            "description": f"The documents' keys, comma-separated (1 to {STATE_KEYS_MAX}), "
            f"each matching {STATE_KEY_PATTERN} and at most 128 characters: `app,user:u-17`."
        },
    )


class StateDocumentSchema(ResponseSchema):
    class Meta:
        ordered = True

    key = fields.String(required=True)
    value = fields.Dict(required=True, metadata={"description": "`{}` until written."})
    updated_at = Timestamp(metadata={"description": "Absent on a document never written."})


class StateListSchema(ResponseSchema):
    state = fields.List(fields.Nested(StateDocumentSchema), required=True)


@bp.get("/agents/<record_key:agent_key>/state")
@rate_limits.per_key
@auth.require("sessions:read")
@endpoint(
    "State",
    200,
    StateListSchema,
    query=StateQuerySchema,
    examples={
        "response": {
            "state": [
                {"key": "app", "value": {"theme": "dark"}, "updated_at": "2026-11-28T17:49:52.123Z"}
            ]
        }
    },
)
def get_state(agent_key: str, query: dict[str, Any]) -> Any:
    """Read some of the agent's state documents, by key (beyond Vectara)."""
    return {"state": service().storage.get_state(agent_key=agent_key, keys=query["keys"])}


def check_state(key: str, value: dict[str, Any]) -> None:
    """A state document once patched must keep the metadata bounds (else nothing is written)."""
    try:
        check_metadata(value)
    except ValidationError as err:
        message = " ".join(err.messages) if isinstance(err.messages, list) else str(err.messages)
        field = f"state_patch.{key}"
        raise ApiError(
            400,
            "invalid_request",
            f"{field}: the patched state document is out of bounds: {message}",
            field_errors={field: message},
        ) from None
