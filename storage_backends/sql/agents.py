"""Agents in SQL: create, read, list, update, delete (and the end of their grants)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ..base import (
    Agent,
    AgentNotFound,
    Conflict,
    Page,
    Precondition,
    PreconditionFailed,
)
from ..codec import dump_json
from .dialect import SQLDialect
from .schema import AGENT_PAGE, AGENTS, GET_AGENT, INSERT_AGENT


class AgentRecords(SQLDialect):
    """The agent operations of :class:`SQLStorage`."""

    def create_agent(self, *, agent: Agent) -> Agent:
        try:
            with self._writing() as conn:
                conn.execute(self._sql(INSERT_AGENT), self._encode(AGENTS, agent, AGENTS.fields))
        except self.unique_violation:
            raise Conflict(agent.key) from None
        return agent

    def get_agent(self, *, agent_key: str) -> Agent:
        with self._reading() as conn:
            row = conn.execute(self._sql(GET_AGENT), [agent_key]).fetchone()
        if row is None:
            raise AgentNotFound(agent_key)
        return self._record(AGENTS, row)

    def list_agents(self, *, limit: int, after: int | None = None) -> Page:
        with self._reading() as conn:
            rows = conn.execute(
                self._sql(AGENT_PAGE),
                [after or 0, limit + 1],
            ).fetchall()
        return self._page(AGENTS, rows, limit)

    def update_agent(
        self,
        *,
        agent_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
        precondition: Precondition[Agent] | None = None,
    ) -> Agent:
        assignments, params = self._assignments(AGENTS, changes, now)
        query = f"UPDATE agents SET {assignments} WHERE key = ? {AGENTS.returning}"
        if precondition is None:
            with self._writing() as conn:
                row = conn.execute(self._sql(query), [*params, agent_key]).fetchone()
        else:
            with self._transaction() as conn:
                self._check_agent(conn, agent_key, precondition)
                row = conn.execute(self._sql(query), [*params, agent_key]).fetchone()
        if row is None:
            raise AgentNotFound(agent_key)
        return self._record(AGENTS, row)

    def _check_agent(self, conn: Any, agent_key: str, precondition: Precondition[Agent]) -> None:
        """Hold the agent's row in ``conn``'s transaction and check ``precondition`` on it."""
        row = self._held(conn, GET_AGENT, [agent_key])
        if row is None:
            raise AgentNotFound(agent_key)
        if not precondition(self._record(AGENTS, row)):
            raise PreconditionFailed(agent_key)

    def _held(self, conn: Any, query: str, params: list[Any]) -> Any:
        """The first row of ``query``, held against other writers until ``conn``'s
        transaction ends, so that a check on it and the write after it see one version."""
        return conn.execute(self._sql(query + self.row_lock), params).fetchone()

    def delete_agent(
        self, *, agent_key: str, precondition: Precondition[Agent] | None = None
    ) -> None:
        with self._transaction() as conn:
            if precondition is not None:
                self._check_agent(conn, agent_key, precondition)
            deleted = conn.execute(self._sql("DELETE FROM agents WHERE key = ?"), [agent_key])
            if deleted.rowcount == 0:
                raise AgentNotFound(agent_key)
            if not self.sessions_cascade:
                conn.execute(self._sql("DELETE FROM sessions WHERE agent_key = ?"), [agent_key])
                conn.execute(self._sql("DELETE FROM agent_state WHERE agent_key = ?"), [agent_key])
                conn.execute(self._sql("DELETE FROM agent_usage WHERE agent_key = ?"), [agent_key])
            # Its records' bytes left with its usage: a new agent of this key never pays them.
            conn.execute(
                self._sql("UPDATE idempotency_keys SET agent_key = NULL WHERE agent_key = ?"),
                [agent_key],
            )
            self._end_grants(conn, agent_key)
        # The sessions went with the agent; their events are freed in short chunks.
        self._free_released()

    def _end_grants(self, conn: Any, agent_key: str) -> None:
        """Remove the grants naming the agent, so that a new agent with its key inherits none."""
        named = self.json_contains.format("grants")
        rows = conn.execute(
            self._sql(f"SELECT seq, grants FROM api_keys WHERE {named}"), [dump_json(agent_key)]
        ).fetchall()
        for seq, stored in rows:
            grants = self.decode_json(stored)
            kept = [grant for grant in grants if grant[0] != agent_key]
            if len(kept) != len(grants):
                conn.execute(
                    self._sql("UPDATE api_keys SET grants = ? WHERE seq = ?"),
                    [self.encode_json(kept), seq],
                )
