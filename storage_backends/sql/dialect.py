"""The dialect of the SQL backends: the hooks a database supplies, and rows made records."""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import functools
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import config

from ..base import (
    Grant,
    Page,
    SchemaTooNew,
    Storage,
)
from .schema import MIGRATIONS, SCHEMA_VERSION, Table


def identity(value: Any) -> Any:
    """The encoding of a value the driver adapts by itself."""
    return value


@functools.lru_cache(maxsize=256)
def with_hints(statement: str) -> str:
    """A statement with its ``/*INDEXED BY name*/`` comments made SQLite's index hints.

    SQLite's planner knows only each index's average number of rows per
    session: with one large session in the table, it may read the table in
    seq order and skip other sessions' rows, a cost that grows with the store.
    The hint pins the index that holds exactly a query's rows (and fails the
    statement if that index cannot serve it). PostgreSQL keeps per-value
    statistics, and reads the comments as comments.
    """
    return _HINT.sub(r"\1", statement)


_HINT = re.compile(r"/\*(INDEXED BY \w+)\*/")


@functools.lru_cache(maxsize=256)
def to_pyformat(statement: str) -> str:
    """A statement written with ``?`` placeholders, in the ``%s`` style (no literal ``%``)."""
    return statement.replace("?", "%s")


def _builder(table: Table, decoder: Callable[[Table, str], Any]) -> Callable[[Any], Any]:
    """A function from a row of (position, *fields) to the table's record, by column name.

    Written out once per table, as ``dataclasses`` writes ``__init__``: a call
    with each field taken from its place in the row and decoded where the
    dialect needs it, a third cheaper per row than a loop over the columns.
    """
    namespace: dict[str, Any] = {"record": table.record}
    arguments = []
    for index, column in enumerate(table.fields, start=1):
        decode = decoder(table, column)
        if decode is None:
            arguments.append(f"{column}=row[{index}]")
        else:
            namespace[f"decode_{column}"] = decode
            arguments.append(f"{column}=decode_{column}(row[{index}])")
    exec(f"def build(row):\n    return record({', '.join(arguments)})", namespace)
    return namespace["build"]


class BulkRun:
    """One run of short transactions (see :meth:`SQLDialect._bulk`)."""

    __slots__ = ("wrote_much",)

    def __init__(self) -> None:
        self.wrote_much = False


class SQLDialect(Storage, abc.ABC):
    """What every record kind's operations stand on: the dialect's hooks, the
    transactions, and rows made records; a backend subclass supplies the dialect."""

    #: which statements of a :class:`Migration` this dialect runs
    dialect_name: str
    placeholder = "?"
    unique_violation: type[BaseException] | tuple[type[BaseException], ...] = ()
    missing_reference: type[BaseException] | tuple[type[BaseException], ...] = ()
    #: a SQL expression for a session's new expires_at from its stored tti_minutes
    #: and a ``?`` for the time of the update
    expires_from_tti: str
    #: ``{}`` in it is a JSON column: true when that column's text holds the ``?``
    json_contains: str
    #: whether deleting an agent deletes its sessions by itself (a foreign key)
    sessions_cascade = False
    #: appended to a SELECT in a write transaction: the row stays this transaction's
    #: until it ends (nothing for a database whose write transactions hold it all)
    row_lock = ""
    #: the same, shared: other holders of the share may read on, writers of the row wait
    share_lock = ""
    #: the bytes of an event's stored fields, read without handing them to Python
    fields_bytes = "length(CAST(fields AS BLOB))"

    filter_scan_rows = config.Config.FILTER_SCAN_ROWS
    filter_scan_seconds = config.Config.FILTER_SCAN_SECONDS

    def _read_filter_options(self, options: Mapping[str, Any]) -> None:
        """The filtered list's budget, from the settings (config.Config has the defaults)."""
        rows = int(options.get("FILTER_SCAN_ROWS", config.Config.FILTER_SCAN_ROWS))
        seconds = float(options.get("FILTER_SCAN_SECONDS", config.Config.FILTER_SCAN_SECONDS))
        if rows < 1 or seconds <= 0:
            raise ValueError("FILTER_SCAN_ROWS and FILTER_SCAN_SECONDS must be positive")
        self.filter_scan_rows, self.filter_scan_seconds = rows, seconds

    # The dialect

    @staticmethod
    @abc.abstractmethod
    def encode_json(value: Any) -> Any: ...

    @staticmethod
    @abc.abstractmethod
    def decode_json(value: Any) -> Any: ...

    @staticmethod
    @abc.abstractmethod
    def encode_ts(value: dt.datetime | None) -> Any: ...

    @staticmethod
    @abc.abstractmethod
    def decode_ts(value: Any) -> dt.datetime | None: ...

    encode_flag: Callable[[bool], Any] = staticmethod(identity)

    @abc.abstractmethod
    def _reading(self) -> contextlib.AbstractContextManager[Any]:
        """A connection for reads."""

    @abc.abstractmethod
    def _writing(self) -> contextlib.AbstractContextManager[Any]:
        """A connection for one write statement, committed on its own."""

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A connection in one write transaction: committed on success, else rolled back."""

    @abc.abstractmethod
    def _update_transaction(self) -> contextlib.AbstractContextManager[Any]:
        """Where update_session runs its UPDATE and, when it found none live, the removal."""

    @abc.abstractmethod
    def _scan(
        self, query: str, params: list[Any], batch: int
    ) -> contextlib.AbstractContextManager[Iterable[Any]]:
        """The rows of ``query``, read as they are consumed."""

    def _bulk(self) -> contextlib.AbstractContextManager[BulkRun]:
        """Around the many short transactions of one long copy or freeing (forks.py,
        released.py): what the database needs so that none of them grows long. The
        caller sets ``wrote_much`` on what it yields once it wrote more than a chunk."""
        return contextlib.nullcontext(BulkRun())

    #: per thread: ``unit``, the connection of the open atomic() block, if any
    _local: threading.local

    def _unit(self) -> Any:
        """The connection of this thread's open :meth:`atomic` block, or None."""
        return getattr(self._local, "unit", None)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """One :meth:`_transaction` for the block, whose connection every call inside
        uses (the dialect's ``_reading``, ``_writing`` and ``_transaction`` look for it:
        a transaction of their own becomes a savepoint). Nested, a savepoint."""
        nested = self._unit() is not None
        with self._transaction() as conn:
            if nested:
                yield
                return
            self._local.unit = conn
            try:
                yield
            finally:
                self._local.unit = None

    def _sql(self, statement: str) -> str:
        return with_hints(statement) if self.placeholder == "?" else to_pyformat(statement)

    def _migrate_from(self, conn: Any, current: int) -> list[int]:
        """Apply every migration after ``current`` on ``conn``; return the versions applied.

        Raises :class:`SchemaTooNew` for a database newer than :data:`MIGRATIONS`.
        """
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(current, SCHEMA_VERSION)
        applied = []
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            for statement in getattr(migration, self.dialect_name):
                conn.execute(statement)
            if migration.backfill is not None:
                getattr(self, migration.backfill)(conn, 0)
            self._record_version(conn, migration.version)
            applied.append(migration.version)
        return applied

    @abc.abstractmethod
    def _record_version(self, conn: Any, version: int) -> None:
        """Note in the database that ``version`` is applied."""

    # Rows and records

    def _encode(self, table: Table, record: Any, columns: tuple[str, ...]) -> list[Any]:
        """The parameters for ``columns`` from a record or a mapping of field to value."""
        get = record.get if isinstance(record, Mapping) else functools.partial(getattr, record)
        return [
            get(column) if encode is None else encode(get(column))
            for column, encode in self._encoders(table, columns)
        ]

    def _record(self, table: Table, row: Any) -> Any:
        """A record from a row of (position, *fields, ...)."""
        build = self._plans.get(table.name)
        if build is None:
            build = self._plans[table.name] = _builder(table, self._decoder)
        return build(row)

    @functools.cached_property
    def _plans(self) -> dict[Any, Any]:
        return {}

    def _encoders(self, table: Table, columns: tuple[str, ...]) -> Any:
        """(column, encoder or None) for ``columns``, worked out once per table and columns."""
        plan = self._plans.get((table.name, columns))
        if plan is None:
            plan = self._plans[table.name, columns] = tuple(
                (column, self._encoder(table, column)) for column in columns
            )
        return plan

    def _encoder(self, table: Table, column: str) -> Callable[[Any], Any] | None:
        if column == "grants":
            encode_json = self.encode_json
            return lambda grants: encode_json([[g.agent, list(g.scopes)] for g in grants])
        if column == "forked_from":
            encode_json = self.encode_json
            return lambda value: None if value is None else encode_json(value)
        if column in table.json:
            return self.encode_json
        if column in table.flags:
            return None if self.encode_flag is identity else self.encode_flag
        if column in table.times or column == "expires_at":
            return None if self.encode_ts is identity else self.encode_ts
        return None

    def _decoder(self, table: Table, column: str) -> Callable[[Any], Any] | None:
        decode_json = self.decode_json
        if column == "grants":
            return lambda value: [
                Grant(agent, tuple(scopes)) for agent, scopes in decode_json(value)
            ]
        if column in table.json:
            if decode_json is identity:
                return None
            if column == "forked_from":
                return lambda value: None if value is None else decode_json(value)
            return decode_json
        if column in table.times:
            return self.decode_ts
        if column in table.flags:
            return bool
        return None

    def _page(self, table: Table, rows: list[Any], limit: int) -> Page:
        """Rows were fetched with ``limit + 1``: the extra one only says another page exists."""
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([self._record(table, r) for r in rows], rows[-1][0] if more else None)

    def _assignments(
        self, table: Table, changes: Mapping[str, Any], now: dt.datetime
    ) -> tuple[str, list[Any]]:
        """``col = ?, ...`` for ``changes`` plus ``updated_at``, with the parameters.

        Raises ValueError for a field that cannot change.
        """
        unknown = set(changes) - table.changeable
        if unknown:
            raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
        columns = (*changes, "updated_at")
        values = self._encode(table, {**changes, "updated_at": now}, columns)
        return ", ".join(f"{column} = ?" for column in columns), values

    def _live(self, expires_at: Any, now: dt.datetime) -> bool:
        expires = self.decode_ts(expires_at)
        return expires is None or expires > now
