"""Idempotency keys in SQL: claim, finish, release, purge."""

from __future__ import annotations

import datetime as dt

from ..base import (
    Answer,
    IdempotencyKeyLost,
    IdempotencyRecord,
    Unavailable,
)
from .dialect import SQLDialect
from .schema import (
    CLAIM_IDEMPOTENCY_KEY,
    FINISH_IDEMPOTENCY_KEY,
    GET_IDEMPOTENCY_KEY,
    PURGE_IDEMPOTENCY_KEYS,
    RELEASE_IDEMPOTENCY_KEY,
)


class IdempotencyRecords(SQLDialect):
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
            with self._writing() as conn:
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

    def finish_idempotency_key(self, *, scope: str, key: str, token: str, answer: Answer) -> None:
        headers = self.encode_json([list(pair) for pair in answer.headers])
        params = [answer.status, headers, answer.body, scope, key, token]
        with self._writing() as conn:
            if conn.execute(self._sql(FINISH_IDEMPOTENCY_KEY), params).rowcount == 0:
                raise IdempotencyKeyLost(key)

    def release_idempotency_key(self, *, scope: str, key: str, token: str) -> None:
        with self._writing() as conn:
            conn.execute(self._sql(RELEASE_IDEMPOTENCY_KEY), [scope, key, token])

    def purge_expired_idempotency_keys(self, *, now: dt.datetime) -> int:
        with self._writing() as conn:
            return conn.execute(self._sql(PURGE_IDEMPOTENCY_KEYS), [self.encode_ts(now)]).rowcount
