"""The memory backend's tables: records by key with their sorted sequence numbers, a
session's history, and copies that share nothing mutable."""

from __future__ import annotations

import bisect
import dataclasses
import marshal
from collections.abc import Iterator
from typing import Any

from .base import (
    Conflict,
    Event,
    EventNotFound,
    Page,
    Precondition,
    PreconditionFailed,
)
from .codec import metadata_value_text


class Table(dict):
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

    def at(self, seq: int) -> tuple[int, Any]:
        """(sequence number, record) of the record with this sequence number."""
        return self[self._keys[bisect.bisect_left(self._seqs, seq)]]

    def before(self, seq: int | None) -> Iterator[tuple[int, Any]]:
        """(sequence number, record) newest first, from the last below ``seq``."""
        at = len(self._seqs) if seq is None else bisect.bisect_left(self._seqs, seq)
        keys = self._keys
        while at > 0:
            at -= 1
            yield self[keys[at]]


class History:
    """One session's history: events by sequence number, with the sorted numbers of
    all of them and of the visible ones, so that a page starts with a bisection.
    """

    def __init__(self) -> None:
        self._by_seq: dict[int, Event] = {}
        self._seq_of: dict[str, int] = {}
        self._all: list[int] = []
        self._visible: list[int] = []

    def count(self) -> int:
        return len(self._all)

    def events(self) -> Iterator[Event]:
        """Every event, hidden ones included, in order."""
        return (self._by_seq[seq] for seq in self._all)

    def check_new(self, ids: list[str]) -> None:
        """Raise :class:`Conflict` when an id is in the history or twice in ``ids``."""
        if len(set(ids)) != len(ids):
            raise Conflict("an event id appears twice in the batch")
        for event_id in ids:
            if event_id in self._seq_of:
                raise Conflict(event_id)

    def add(self, seq: int, event: Event) -> None:
        # Sequence numbers only grow, so a new event always goes last.
        self._by_seq[seq] = event
        self._seq_of[event.id] = seq
        self._all.append(seq)
        if event.hide_reason is None:
            self._visible.append(seq)

    def seq_of(self, event_id: str) -> int:
        try:
            return self._seq_of[event_id]
        except KeyError:
            raise EventNotFound(event_id) from None

    def get(self, event_id: str) -> Event:
        return self._by_seq[self.seq_of(event_id)]

    def last_id(self) -> str | None:
        return self._by_seq[self._all[-1]].id if self._all else None

    def set_hidden(self, event_id: str, hide_reason: str | None) -> Event:
        seq = self.seq_of(event_id)
        event = self._by_seq[seq]
        if (event.hide_reason is None) != (hide_reason is None):
            if hide_reason is None:
                bisect.insort(self._visible, seq)
            else:
                del self._visible[bisect.bisect_left(self._visible, seq)]
        event.hide_reason = hide_reason
        return event

    def remove(self, event_id: str) -> None:
        seq = self.seq_of(event_id)
        event = self._by_seq.pop(seq)
        del self._seq_of[event_id]
        del self._all[bisect.bisect_left(self._all, seq)]
        if event.hide_reason is None:
            del self._visible[bisect.bisect_left(self._visible, seq)]

    def rows(
        self, *, after: int | None = None, descending: bool = False, include_hidden: bool
    ) -> Iterator[tuple[int, Event]]:
        """(sequence number, event) in order (``descending``: newest first), past ``after``."""
        seqs = self._all if include_hidden else self._visible
        by_seq = self._by_seq
        if descending:
            at = len(seqs) if after is None else bisect.bisect_left(seqs, after)
            while at > 0:
                at -= 1
                yield seqs[at], by_seq[seqs[at]]
        else:
            at = 0 if after is None else bisect.bisect_right(seqs, after)
            while at < len(seqs):
                yield seqs[at], by_seq[seqs[at]]
                at += 1


def stored_copy(event: Event, session_key: str) -> Event:
    """A copy of ``event`` as stored in the session ``session_key``."""
    return dataclasses.replace(copy_record(event), session_key=session_key)


def compaction_of(compaction: Event, session_key: str, hidden: list[Event]) -> Event:
    """The compaction event to store, with its counts of what it ``hidden``."""
    stored = stored_copy(compaction, session_key)
    stored.fields.update(
        turns_compacted=sum(event.type == "input_message" for event in hidden),
        events_compacted=len(hidden),
    )
    return stored


def check_precondition(precondition: Precondition[Any] | None, record: Any) -> None:
    """Raise :class:`PreconditionFailed` unless ``precondition`` (if any) holds for a copy
    of ``record`` (called with the lock held, so the write that follows sees the same)."""
    if precondition is not None and not precondition(copy_record(record)):
        raise PreconditionFailed(getattr(record, "key", ""))


def page_of(rows: Iterator[tuple[int, Any]], limit: int) -> Page:
    """Take ``limit`` records from (seq, record) pairs; the cursor says whether more follow."""
    picked = []
    for seq, record in rows:
        if len(picked) == limit:
            return Page([copy_record(r) for _, r in picked], picked[-1][0])
        picked.append((seq, record))
    return Page([copy_record(r) for _, r in picked], None)


def copy_record(record: Any) -> Any:
    """A copy of a stored dataclass that shares nothing mutable with it.

    Records hold immutable values (text, numbers, datetimes, tuples) besides
    JSON metadata and a key's grants, so a copy of the attributes with those
    two copied anew is enough. The attributes are copied as a dict, not by
    ``copy.copy`` (which goes through ``__reduce_ex__``): a page of 20 events
    makes 20 copies.
    """
    clone = object.__new__(type(record))
    state = clone.__dict__
    state.update(record.__dict__)
    for name, value in state.items():
        if isinstance(value, _TREES):
            state[name] = copy_tree(value)
    return clone


_TREES = (dict, list)


def copy_tree(value: Any) -> Any:
    """A copy of a JSON tree (or of a list of records) that shares nothing mutable with it.

    A JSON tree goes through ``marshal`` (C, and format 2 writes no references, so
    nothing inside the copy is shared either); anything it does not take (a
    record, a subclass of dict) is copied a node at a time.
    """
    try:
        return marshal.loads(marshal.dumps(value, 2))
    except ValueError:
        return _copy_nodes(value)


def _copy_nodes(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy_nodes(child) for key, child in value.items()}
    if isinstance(value, list):
        return [_copy_nodes(child) for child in value]
    if dataclasses.is_dataclass(value):
        return copy_record(value)
    return value


class MetadataIndex:
    """Sessions by (agent key, top-level metadata key, value text), as sorted sequence
    numbers: a page starts with a bisection, as a table's does."""

    def __init__(self) -> None:
        self._seqs: dict[tuple[str, str, str], list[int]] = {}

    @staticmethod
    def _entries(agent_key: str, metadata: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
        for key, value in metadata.items():
            text = metadata_value_text(value)
            if text is not None:
                yield agent_key, key, text

    def add(self, agent_key: str, seq: int, metadata: dict[str, Any]) -> None:
        for entry in self._entries(agent_key, metadata):
            bisect.insort(self._seqs.setdefault(entry, []), seq)

    def remove(self, agent_key: str, seq: int, metadata: dict[str, Any]) -> None:
        for entry in self._entries(agent_key, metadata):
            seqs = self._seqs[entry]
            del seqs[bisect.bisect_left(seqs, seq)]
            if not seqs:
                del self._seqs[entry]

    def after(self, agent_key: str, key: str, value: str, seq: int | None) -> Iterator[int]:
        """The sequence numbers of the agent's sessions with ``key`` = ``value``, past ``seq``."""
        seqs = self._seqs.get((agent_key, key, value), [])
        at = 0 if seq is None else bisect.bisect_right(seqs, seq)
        while at < len(seqs):
            yield seqs[at]
            at += 1
