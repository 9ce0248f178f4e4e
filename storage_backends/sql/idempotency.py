"""Idempotency keys in SQL: claim, finish, release, purge."""

from __future__ import annotations

import datetime as dt
import zlib
from typing import Any

from ..base import (
    Answer,
    IdempotencyKeyLost,
    IdempotencyRecord,
    Unavailable,
)
from ..codec import dump_json
from .schema import (
    CLAIM_IDEMPOTENCY_KEY,
    DROP_EXPIRED_IDEMPOTENCY_KEY,
    FINISH_IDEMPOTENCY_KEY,
    GET_IDEMPOTENCY_KEY,
    IDEMPOTENCY_ROW_BYTES,
    PURGE_IDEMPOTENCY_KEYS,
    RELEASE_IDEMPOTENCY_KEY,
    SHARDS,
)
from .usage import UsageRecords


class IdempotencyRecords(UsageRecords):
    """The Idempotency-Key operations of :class:`SQLStorage`."""

    def claim_idempotency_key(
        self,
        *,
        scope: str,
        key: str,
        fingerprint: str,
        token: str,
        now: dt.datetime,
        locked_until: dt.datetime,
        expires_at: dt.datetime,
    ) -> IdempotencyRecord:
        encode = self.encode_ts
        claim = [scope, key, fingerprint, token, encode(locked_until), encode(expires_at)]
        claim += [encode(now), encode(now)]
        # A record purged between the claim and the read is claimed again.
        for _ in range(3):
            with self._transaction() as conn:
                # An expired record gives way, and its bytes leave its agent's usage.
                dropped = conn.execute(
                    self._sql(DROP_EXPIRED_IDEMPOTENCY_KEY), [scope, key, encode(now)]
                ).fetchall()
                self._forget_records(conn, dropped)
                if conn.execute(self._sql(CLAIM_IDEMPOTENCY_KEY), claim).fetchone() is not None:
                    return IdempotencyRecord(fingerprint, token)
            with self._reading() as conn:
                row = conn.execute(self._sql(GET_IDEMPOTENCY_KEY), [scope, key]).fetchone()
            if row is not None:
                stored_fingerprint, stored_token, status, headers, body = row
                answer = None
                if status is not None:
                    pairs = tuple((name, value) for name, value in self.decode_json(headers))
                    answer = Answer(status, pairs, bytes(body))
                return IdempotencyRecord(stored_fingerprint, stored_token, answer)
        raise Unavailable("the idempotency key could not be claimed; retry")

    def finish_idempotency_key(
        self, *, scope: str, key: str, token: str, answer: Answer, agent_key: str | None = None
    ) -> None:
        pairs = [list(pair) for pair in answer.headers]
        headers = self.encode_json(pairs)
        size = IDEMPOTENCY_ROW_BYTES + len(key.encode()) + len(answer.body)
        size += len(dump_json(pairs).encode())
        shard = zlib.crc32(f"{scope}/{key}".encode()) % SHARDS
        with self._transaction() as conn:
            # Counted, not refused (the write it answers has passed the quota already),
            # for an agent that exists (a remembered 404 may name none).
            if agent_key and not self._charge_existing_agent(conn, agent_key, shard, size):
                agent_key = None
            params = [answer.status, headers, answer.body, agent_key, shard]
            params += [size if agent_key else 0, scope, key, token]
            if conn.execute(self._sql(FINISH_IDEMPOTENCY_KEY), params).rowcount == 0:
                raise IdempotencyKeyLost(key)

    def release_idempotency_key(self, *, scope: str, key: str, token: str) -> None:
        with self._writing() as conn:
            conn.execute(self._sql(RELEASE_IDEMPOTENCY_KEY), [scope, key, token])

    def purge_expired_idempotency_keys(self, *, now: dt.datetime) -> int:
        with self._transaction() as conn:
            rows = conn.execute(self._sql(PURGE_IDEMPOTENCY_KEYS), [self.encode_ts(now)]).fetchall()
            self._forget_records(conn, rows)
        return len(rows)

    def _forget_records(self, conn: Any, rows: list[Any]) -> None:
        """Take removed records' bytes (rows of agent_key, usage_shard, stored_bytes) off
        their agents' usage."""
        freed: dict[tuple[str, int], int] = {}
        for agent_key, shard, size in rows:
            if agent_key and size:
                freed[agent_key, shard] = freed.get((agent_key, shard), 0) + size
        for (agent_key, shard), size in sorted(freed.items()):
            conn.execute(
                self._sql(
                    "UPDATE agent_usage SET bytes = bytes - ? WHERE agent_key = ? AND shard = ?"
                ),
                [size, agent_key, shard],
            )
