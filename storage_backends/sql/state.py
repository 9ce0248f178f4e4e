"""An agent's state documents in SQL: read by key, patched in an event batch's transaction."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from ..base import AgentNotFound, StateDocument
from ..codec import dump_json, merge_patch
from .schema import STATE_ROW_BYTES
from .usage import UsageRecords

# A document never written starts as {}: the row is made first (a racing writer's
# insert waits for ours), then held, so of two patches of one document neither is lost.
CREATE_STATE = (
    "INSERT INTO agent_state (agent_key, key, value, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (agent_key, key) DO NOTHING"
)
GET_STATE = "SELECT value, updated_at FROM agent_state WHERE agent_key = ? AND key = ?"
SET_STATE = "UPDATE agent_state SET value = ?, updated_at = ? WHERE agent_key = ? AND key = ?"


class StateRecords(UsageRecords):
    """The state document operations of :class:`SQLStorage`."""

    def get_state(self, *, agent_key: str, keys: list[str]) -> list[StateDocument]:
        marks = ", ".join("?" * len(keys))
        with self._reading() as conn:
            agent = conn.execute(self._sql("SELECT 1 FROM agents WHERE key = ?"), [agent_key])
            if agent.fetchone() is None:
                raise AgentNotFound(agent_key)
            rows = conn.execute(
                self._sql(
                    f"SELECT key, value, updated_at FROM agent_state "
                    f"WHERE agent_key = ? AND key IN ({marks})"
                ),
                [agent_key, *keys],
            ).fetchall()
        found = {
            key: StateDocument(key, self.decode_json(value), self.decode_ts(updated_at))
            for key, value, updated_at in rows
        }
        return [found.get(key) or StateDocument(key) for key in keys]

    def _patch_state(
        self,
        conn: Any,
        agent_key: str,
        patches: Mapping[str, Mapping[str, Any]],
        check: Callable[[str, dict[str, Any]], None] | None,
        now: dt.datetime,
    ) -> None:
        """Apply each merge patch to its document in ``conn``'s transaction, in key order
        (so that writers of several documents never wait on each other in a circle)."""
        stamp = self.encode_ts(now)
        empty = self.encode_json({})
        for key in sorted(patches):
            made = conn.execute(self._sql(CREATE_STATE), [agent_key, key, empty, stamp]).rowcount
            row = conn.execute(self._sql(GET_STATE + self.row_lock), [agent_key, key]).fetchone()
            value = merge_patch(self.decode_json(row[0]), dict(patches[key]))
            if check is not None:
                check(key, value)
            text = dump_json(value)
            held = row[0] if isinstance(row[0], str) else dump_json(row[0])
            before = 0 if made else len(held.encode())
            conn.execute(self._sql(SET_STATE), [self.encode_json(value), stamp, agent_key, key])
            # The document's bytes, as its JSON text; a new one costs its row too.
            added = len(text.encode()) - before + (STATE_ROW_BYTES if made else 0)
            self._charge_agent(conn, agent_key, self._state_shard(key), 0, added)
