"""A per-worker cache of the API keys found in storage, each entry at most one second old.

The contract lets a revocation take up to one second to reach every worker
(``API.md``: "Revoking a key ... within one second"), so a worker may answer
from a key it read less than a second ago. Only keys that exist are kept: a
miss always goes to storage, so a key just created is usable at once. The
entry is the stored key (its secret's hash, never the secret); the caller
still compares the secret and judges expiry on every request.

Reads take no lock: a dict lookup is atomic under the GIL. The lock guards
only the miss path's insert and its eviction. A change made through this
worker (a revocation, an agent's deletion ending grants) calls
:meth:`KeyCache.forget` or :meth:`KeyCache.clear`, which also bumps a
generation, so a read that began before the change cannot store its stale
answer afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from storage_backends import ApiKey, Storage

TTL = 1.0  # seconds: the contract's bound, not a setting
MAX_ENTRIES = 4096


class KeyCache:
    def __init__(
        self,
        ttl: float = TTL,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0 <= ttl <= TTL:
            raise ValueError(f"a key cache entry lives at most {TTL} s")
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, tuple[float, ApiKey]] = {}
        self._generation = 0
        self._lock = threading.Lock()

    def get(self, storage: Storage, key_id: str) -> ApiKey:
        """The key ``key_id`` from the cache if read less than ``ttl`` ago, else from ``storage``.

        Its :class:`ApiKeyNotFound` (the key is unknown) passes through and nothing is kept.
        """
        entry = self._entries.get(key_id)
        now = self.clock()
        if entry is not None and now - entry[0] < self.ttl:
            return entry[1]
        generation = self._generation
        # Stamped with the time before the read: the entry is never older than ttl.
        key = storage.get_api_key(key_id=key_id)
        if self.ttl > 0:
            self._store(key_id, now, key, generation)
        return key

    def _store(self, key_id: str, stamp: float, key: ApiKey, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # changed here while we read: the answer may be stale
            entries = self._entries
            if key_id not in entries and len(entries) >= self.max_entries:
                now = self.clock()
                for old_id, (old_stamp, _) in list(entries.items()):
                    if now - old_stamp >= self.ttl:
                        del entries[old_id]
                if len(entries) >= self.max_entries:  # all fresh: drop the oldest half
                    oldest = sorted(entries.items(), key=lambda item: item[1][0])
                    for old_id, _ in oldest[: max(1, len(oldest) // 2)]:
                        del entries[old_id]
            entries[key_id] = (stamp, key)

    def forget(self, key_id: str) -> None:
        """Drop ``key_id`` (this worker changed it): its next use reads storage."""
        with self._lock:
            self._generation += 1
            self._entries.pop(key_id, None)

    def clear(self) -> None:
        """Drop every entry (this worker changed grants of keys it cannot name)."""
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
