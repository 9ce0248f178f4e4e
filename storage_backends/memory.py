"""In-process storage: a dict per table behind one lock.

Everything handed in or out is a copy sharing nothing mutable, so callers
can never change stored state by mutating an object. Data lives as long as
the process, and each gunicorn worker has its own: use it for tests, demos
and embedding. A page starts by bisecting a table's sorted sequence numbers,
so its cost does not grow with its depth.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import datetime as dt
import itertools
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import config

from .base import (
    Agent,
    AgentDisabled,
    AgentNotFound,
    ApiKey,
    ApiKeyNotFound,
    Conflict,
    Page,
    Session,
    SessionNotFound,
    Storage,
)
from .codec import filter_rows


class _Table(dict):
    """Records by key, as (sequence number, record), with their sequence numbers sorted.

    The sequence number is the page cursor: a page starts where a bisection of
    the sorted numbers puts it. Removal shifts the list (a memmove), which is
    far cheaper than walking a page's depth on every read.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seqs: list[int] = []
        self._keys: list[str] = []

    def add(self, seq: int, key: str, record: Any) -> None:
        # Sequence numbers only grow, so a new record always goes last.
        self[key] = (seq, record)
        self._seqs.append(seq)
        self._keys.append(key)

    def remove(self, key: str) -> None:
        seq, _ = self.pop(key)
        at = bisect.bisect_left(self._seqs, seq)
        del self._seqs[at], self._keys[at]

    def after(self, seq: int | None) -> Iterator[tuple[int, Any]]:
        """(sequence number, record) in order, from the first above ``seq``."""
        at = 0 if seq is None else bisect.bisect_right(self._seqs, seq)
        keys = self._keys
        while at < len(keys):
            yield self[keys[at]]
            at += 1


class MemoryStorage(Storage):
    def __init__(
        self,
        *,
        filter_scan_rows: int = config.Config.FILTER_SCAN_ROWS,
        filter_scan_seconds: float = config.Config.FILTER_SCAN_SECONDS,
    ) -> None:
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._agents = _Table()
        self._sessions: dict[str, _Table] = {}
        self._keys = _Table()
        self.filter_scan_rows = int(filter_scan_rows)
        self.filter_scan_seconds = float(filter_scan_seconds)

    @classmethod
    def from_url(cls, url: str, *, options: Mapping[str, Any]) -> MemoryStorage:
        if url.rstrip("/") != "memory:":
            raise ValueError("the memory backend takes no path or options: use memory://")
        return cls(
            filter_scan_rows=options.get("FILTER_SCAN_ROWS", config.Config.FILTER_SCAN_ROWS),
            filter_scan_seconds=options.get(
                "FILTER_SCAN_SECONDS", config.Config.FILTER_SCAN_SECONDS
            ),
        )

    def check(self) -> None:
        return None

    # Agents

    def create_agent(self, *, agent: Agent) -> Agent:
        with self._lock:
            if agent.key in self._agents:
                raise Conflict(agent.key)
            self._agents.add(next(self._seq), agent.key, _copy(agent))
            self._sessions[agent.key] = _Table()
            return _copy(agent)

    def get_agent(self, *, agent_key: str) -> Agent:
        with self._lock:
            return _copy(self._agent(agent_key))

    def list_agents(self, *, limit: int, after: int | None = None) -> Page:
        with self._lock:
            return _page(self._agents.after(after), limit)

    def update_agent(
        self, *, agent_key: str, changes: Mapping[str, Any], now: dt.datetime
    ) -> Agent:
        with self._lock:
            seq, _ = self._agents.get(agent_key, (None, None))
            agent = dataclasses.replace(
                self._agent(agent_key), **_copy_tree(dict(changes)), updated_at=now
            )
            self._agents[agent_key] = (seq, agent)
            return _copy(agent)

    def delete_agent(self, *, agent_key: str) -> None:
        with self._lock:
            self._agent(agent_key)
            self._agents.remove(agent_key)
            del self._sessions[agent_key]
            # A new agent with this key inherits no grants.
            for key_id, (seq, key) in list(self._keys.items()):
                kept = [grant for grant in key.grants if grant.agent != agent_key]
                if len(kept) != len(key.grants):
                    self._keys[key_id] = (seq, dataclasses.replace(key, grants=kept))

    def _agent(self, agent_key: str) -> Agent:
        try:
            return self._agents[agent_key][1]
        except KeyError:
            raise AgentNotFound(agent_key) from None

    # Sessions

    def create_session(self, *, session: Session) -> Session:
        with self._lock:
            sessions = self._sessions.get(session.agent_key)
            if sessions is None:
                raise AgentNotFound(session.agent_key)
            if not self._agent(session.agent_key).enabled:
                raise AgentDisabled(session.agent_key)
            held = sessions.get(session.key)
            if held is not None:
                if not held[1].expired(session.created_at):
                    raise Conflict(session.key)
                # Idle past its TTI, the session is gone for clients: its key is free.
                sessions.remove(session.key)
            sessions.add(next(self._seq), session.key, _copy(session))
            return _copy(session)

    def get_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Session:
        with self._lock:
            return _copy(self._live_session(agent_key, session_key, now)[1])

    def list_sessions(
        self,
        *,
        agent_key: str,
        limit: int,
        now: dt.datetime,
        after: int | None = None,
        matches: Any = None,
    ) -> Page:
        with self._lock:
            sessions = self._sessions.get(agent_key)
            if sessions is None:
                return Page([], None)
            live = ((seq, s) for seq, s in sessions.after(after) if not s.expired(now))
            if matches is None:
                return _page(live, limit)
            rows, stopped = filter_rows(
                live,
                limit=limit,
                matches=matches,
                text=lambda row: (row[1].name, row[1].description),
                position=lambda row: row[0],
                max_rows=self.filter_scan_rows,
                max_seconds=self.filter_scan_seconds,
            )
            if stopped is None:
                return _page(iter(rows), limit)
            return Page([_copy(r) for _, r in rows], stopped)

    def update_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
    ) -> Session:
        with self._lock:
            seq, session = self._live_session(agent_key, session_key, now)
            session = dataclasses.replace(session, **_copy_tree(dict(changes)), updated_at=now)
            self._sessions[agent_key][session_key] = (seq, session)
            return _copy(session)

    def delete_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> None:
        with self._lock:
            self._live_session(agent_key, session_key, now)
            self._sessions[agent_key].remove(session_key)

    def purge_expired_sessions(self, *, now: dt.datetime) -> int:
        with self._lock:
            removed = 0
            for sessions in self._sessions.values():
                for key in [k for k, (_, s) in sessions.items() if s.expired(now)]:
                    sessions.remove(key)
                    removed += 1
            return removed

    def _live_session(
        self, agent_key: str, session_key: str, now: dt.datetime
    ) -> tuple[int, Session]:
        sessions = self._sessions.get(agent_key)
        held = None if sessions is None else sessions.get(session_key)
        if held is None:
            raise SessionNotFound(session_key)
        seq, session = held
        if session.expired(now):
            sessions.remove(session_key)
            raise SessionNotFound(session_key)
        return seq, session

    # API keys

    def create_api_key(self, *, api_key: ApiKey) -> ApiKey:
        with self._lock:
            if api_key.id in self._keys:
                raise Conflict(api_key.id)
            self._keys.add(next(self._seq), api_key.id, _copy(api_key))
            return _copy(api_key)

    def get_api_key(self, *, key_id: str) -> ApiKey:
        with self._lock:
            try:
                return _copy(self._keys[key_id][1])
            except KeyError:
                raise ApiKeyNotFound(key_id) from None

    def list_api_keys(self, *, limit: int, after: int | None = None) -> Page:
        with self._lock:
            return _page(self._keys.after(after), limit)

    def revoke_api_key(self, *, key_id: str, now: dt.datetime) -> ApiKey:
        with self._lock:
            try:
                seq, key = self._keys[key_id]
            except KeyError:
                raise ApiKeyNotFound(key_id) from None
            if key.revoked_at is None:
                key = dataclasses.replace(key, revoked_at=now)
                self._keys[key_id] = (seq, key)
            return _copy(key)


def _page(rows: Iterator[tuple[int, Any]], limit: int) -> Page:
    """Take ``limit`` records from (seq, record) pairs; the cursor says whether more follow."""
    picked = []
    for seq, record in rows:
        if len(picked) == limit:
            return Page([_copy(r) for _, r in picked], picked[-1][0])
        picked.append((seq, record))
    return Page([_copy(r) for _, r in picked], None)


def _copy(record: Any) -> Any:
    """A copy of a stored dataclass that shares nothing mutable with it.

    Records hold immutable values (text, numbers, datetimes, tuples) besides
    JSON metadata and a key's grants, so a shallow copy with those two copied
    anew is enough, at a sixth of ``copy.deepcopy``'s cost (2 µs a session).
    """
    clone = copy.copy(record)
    for name, value in vars(record).items():
        if isinstance(value, dict | list):
            setattr(clone, name, _copy_tree(value))
    return clone


def _copy_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy_tree(child) for key, child in value.items()}
    if isinstance(value, list):
        return [_copy_tree(child) for child in value]
    if dataclasses.is_dataclass(value):
        return _copy(value)
    return value
