"""Every operation of the SQL backends, written once over a small dialect.

:class:`SQLStorage` holds the statements and what they mean, one module per
record kind (agents, sessions, events, forks, state, api_keys, idempotency, console,
usage; released, the freeing of a removed session's events) over the schema
(schema.py: migrations, tables, statements) and the dialect (dialect.py); a
backend subclass supplies only what differs between databases:

- ``placeholder``: the statements here are written with ``?``; PostgreSQL's
  driver wants ``%s``.
- the encodings of JSON, timestamps and flags (``encode_*`` and ``decode_*``);
- connections and transactions: ``_reading`` (a read), ``_writing`` (one
  write statement, in autocommit), ``_transaction`` (statements that commit
  together), ``_update_transaction`` (update_session's UPDATE, and the removal
  of the session it found expired), ``_scan`` (rows read lazily, for filters);
  inside an open :meth:`SQLStorage.atomic` block each of them uses its
  connection (``_unit``), and a transaction of its own becomes a savepoint;
- ``row_lock``: what a SELECT adds to hold its row until the transaction ends
  (PostgreSQL's ``FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` already holds the
  whole database), so a write's precondition and the write see one version;
- error mapping: ``unique_violation`` and ``missing_reference`` are the
  driver's exceptions for a duplicate key and a missing agent; failures to
  reach the database become :class:`Unavailable` inside the connection hooks;
- the schema's bookkeeping: where the applied version is recorded.

Rows become records in one way, by column name (:class:`Table`). The schema is
one ordered list of versioned migrations (:data:`MIGRATIONS`), with DDL per
dialect where the two databases' types differ.
"""

from __future__ import annotations

import abc

from .agents import AgentRecords
from .api_keys import ApiKeyRecords
from .console import ConsoleSQL
from .dialect import identity, to_pyformat, with_hints
from .events import EventRecords
from .forks import ForkRecords
from .idempotency import IdempotencyRecords
from .schema import MIGRATIONS, SCHEMA_VERSION, SESSION_INSERT_COLUMNS, SESSION_PAGE
from .sessions import SessionRecords
from .state import StateRecords
from .usage import UsageRecords


class SQLStorage(
    ConsoleSQL,
    AgentRecords,
    SessionRecords,
    EventRecords,
    ForkRecords,
    StateRecords,
    ApiKeyRecords,
    IdempotencyRecords,
    UsageRecords,
    abc.ABC,
):
    """The operations of :class:`Storage` in SQL; subclasses supply the dialect."""


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SESSION_INSERT_COLUMNS",
    "SESSION_PAGE",
    "SQLStorage",
    "identity",
    "to_pyformat",
    "with_hints",
]
