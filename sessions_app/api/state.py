"""An agent's state documents: what its runtime keeps across sessions, read by key (they are
written by event batches' ``state_patch``, in the transaction of the events)."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields

from ..corridor import auth, rate_limits
from ..corridor.errors import ApiError
from ..schemas import ResponseSchema, check_metadata
from ..schemas.state import STATE_KEYS_DESCRIPTION, StateDocumentSchema, StateKeys
from .endpoint import bp, endpoint, service


class StateQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    keys = StateKeys(required=True, metadata={"description": STATE_KEYS_DESCRIPTION})


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
