"""PostgreSQL reads a page of sessions from the index in order, also without statistics."""

from __future__ import annotations

import datetime as dt

import pytest

from storage_backends import Agent, storage_from_url
from storage_backends.postgres import SESSION_PAGE

from .conftest import postgres_schema, require_server

pytestmark = pytest.mark.postgres

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def test_a_page_reads_the_agent_index_in_order_before_any_statistics():
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        storage = storage_from_url(url, {})
        try:
            for agent in ("bot", "big"):
                storage.create_agent(
                    agent=Agent(key=agent, name=agent, created_at=T0, updated_at=T0)
                )
            with storage._connection() as conn:
                insert = (
                    "INSERT INTO sessions (agent_key, key, name, metadata, enabled, tti_minutes, "
                    "created_at, updated_at) SELECT %s, 's' || n, 'n', '{}', true, 0, %s, %s "
                    "FROM generate_series(0, %s) AS n"
                )
                # A fresh table that autovacuum has not analyzed yet, with agents
                # far bigger than the planner's default guess.
                conn.execute(insert, ["big", T0, T0, 20000])
                conn.execute(insert, ["bot", T0, T0, 20000])
                query = f"EXPLAIN {SESSION_PAGE} LIMIT %s"
                plan = "\n".join(row[0] for row in conn.execute(query, ["bot", 0, T0, 11]))
            page = storage.list_sessions(agent_key="bot", limit=10, now=T0)
        finally:
            storage.close()
    assert "Index Scan using sessions_agent_id" in plan, plan
    assert "Sort" not in plan and "Bitmap" not in plan, plan
    assert [s.key for s in page.items] == [f"s{n}" for n in range(10)]
