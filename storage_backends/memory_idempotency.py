"""Idempotency-Key records in memory: a mixin of :class:`~storage_backends.memory.MemoryStorage`.

The records sit in their own dict behind the backend's lock, with a heap by
expiry so that each claim drops a few expired records at a bounded cost, as
``sql/idempotency.py`` is the SQL backends' room for the same calls.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import heapq
import threading

from .base import Answer, IdempotencyKeyLost, IdempotencyRecord

# The heap entries each claim looks at: more than the one it may add, so records
# that expired are gone a few claims later, at a bounded cost to each claim.
IDEMPOTENCY_SWEEP = 8


@dataclasses.dataclass
class _Claim:
    record: IdempotencyRecord
    locked_until: dt.datetime
    expires_at: dt.datetime


class MemoryIdempotency:
    """:class:`~storage_backends.base.Storage`'s Idempotency-Key calls, in memory."""

    # Supplied by MemoryStorage.
    _lock: threading.RLock

    def _init_idempotency(self) -> None:
        #: (scope, key) -> the record and its lock's and its own expiry
        self._idempotency: dict[tuple[str, str], _Claim] = {}
        #: a heap of (expires_at, scope, key), one per record stored, soonest first; an
        #: entry whose record was since replaced or released is dropped when it comes due
        self._idempotency_expiry: list[tuple[dt.datetime, str, str]] = []

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
        with self._lock:
            self._drop_expired_idempotency_keys(now, IDEMPOTENCY_SWEEP)
            held = self._idempotency.get((scope, key))
            if (
                held is None
                or held.expires_at <= now
                or (
                    held.record.answer is None
                    and held.locked_until <= now
                    and held.record.fingerprint == fingerprint
                )
            ):
                held = _Claim(IdempotencyRecord(fingerprint, token), locked_until, expires_at)
                self._idempotency[scope, key] = held
                heapq.heappush(self._idempotency_expiry, (expires_at, scope, key))
            return held.record

    def finish_idempotency_key(
        self, *, scope: str, key: str, token: str, answer: Answer, agent_key: str | None = None
    ) -> None:
        with self._lock:
            held = self._idempotency.get((scope, key))
            if held is None or held.record.token != token or held.record.answer is not None:
                raise IdempotencyKeyLost(key)
            held.record = dataclasses.replace(held.record, answer=answer)

    def release_idempotency_key(self, *, scope: str, key: str, token: str) -> None:
        with self._lock:
            held = self._idempotency.get((scope, key))
            if held is not None and held.record.token == token and held.record.answer is None:
                del self._idempotency[scope, key]

    def purge_expired_idempotency_keys(self, *, now: dt.datetime) -> int:
        with self._lock:
            return self._drop_expired_idempotency_keys(now, None)

    def _drop_expired_idempotency_keys(self, now: dt.datetime, most: int | None) -> int:
        """Remove the records expired at ``now``, soonest first, looking at ``most``
        entries of the heap (None: all that are due); return how many were removed."""
        due = self._idempotency_expiry
        removed = looked = 0
        while due and due[0][0] <= now and (most is None or looked < most):
            _, scope, key = heapq.heappop(due)
            looked += 1
            held = self._idempotency.get((scope, key))
            if held is not None and held.expires_at <= now:
                del self._idempotency[scope, key]
                removed += 1
        return removed
