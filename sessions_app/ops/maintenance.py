"""What the operator's CLI does to a database as a whole: schema version, backup, restore.

Kept apart from the storage backends, which serve requests: these run once,
from the CLI, on the same URL and configuration as the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import urllib.parse
from collections.abc import Iterator
from typing import Any

from storage_backends import Storage
from storage_backends.sql import MIGRATIONS, SCHEMA_VERSION

# SQLite keeps a byte of the WAL index (``<db>-shm``) read-locked by every
# process that has the database open in WAL mode (the "DMS" slot, at offset
# 120 + 8 in os_unix.c); an exclusive lock on it is granted only when no other
# process has the database open.
SHM_DMS_OFFSET = 128


class MaintenanceError(Exception):
    """The operation cannot be done; the message is one line for the operator."""


def backend_name(store: Storage) -> str:
    return type(store).__name__.removesuffix("Storage").lower()


def sqlite_uri(path: str, mode: str) -> str:
    """The ``file:`` URI of ``path``: quoted, so that a ``#``, ``?`` or ``%`` in a name is
    part of the name, not the start of a fragment, a query or an escape."""
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?mode={mode}"


def sqlite_connect(path: str, *, readonly: bool = False) -> Any:
    """A plain connection of the SQLite library the service uses (sqlite-utils' choice).

    Always by URI: that library reads a name starting with ``file:`` as one anyway.
    """
    from sqlite_utils.utils import sqlite3

    uri = sqlite_uri(path, "ro" if readonly else "rwc")
    return sqlite3.connect(uri, uri=True, isolation_level=None)


def schema_version(store: Storage) -> int | None:
    """The schema version the database records, read without migrating; None: no database yet."""
    if backend_name(store) == "sqlite":
        if not os.path.exists(store.path):  # type: ignore[attr-defined]
            return None
        conn = sqlite_connect(store.path, readonly=True)  # type: ignore[attr-defined]
        try:
            return conn.execute("PRAGMA user_version").fetchone()[0] or None
        finally:
            conn.close()
    if backend_name(store) == "postgres":
        import psycopg

        try:
            with psycopg.connect(store.conninfo, connect_timeout=5) as conn:  # type: ignore[attr-defined]
                row = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
                if row[0] is None:
                    return None
                found = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
                return found[0]
        except psycopg.Error as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MaintenanceError(f"PostgreSQL: {message}") from None
    raise MaintenanceError(f"the {backend_name(store)} backend has no schema")


def migrations() -> list[tuple[int, str]]:
    return [(m.version, m.summary) for m in MIGRATIONS]


def known_version() -> int:
    return SCHEMA_VERSION


@contextlib.contextmanager
def sole_user(path: str) -> Iterator[None]:
    """Take the database's WAL-index lock: refuse when another process has it open.

    SQLite in another process cannot open the database while the lock is
    exclusive; once this process opens it too, the lock becomes SQLite's
    shared one. What is written inside is one SQLite transaction anyway.
    """
    try:
        fd = os.open(path + "-shm", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise MaintenanceError(f"cannot open {path}-shm: {err.strerror}") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SHM_DMS_OFFSET)
        except OSError:
            raise MaintenanceError(
                f"{path} is in use by another process (a running server?): "
                "stop the server, then restore"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def in_use(path: str) -> bool:
    try:
        with sole_user(path):
            return False
    except MaintenanceError:
        return True


def sqlite_backup(source: str, target: str) -> int:
    """Copy the database at ``source`` into a new file ``target``; return its page count.

    SQLite's online backup API reads one consistent snapshot, whatever other
    processes write meanwhile (with WAL they are not blocked), including the
    commits still in ``<db>-wal`` that a copy of the file alone would miss.
    The copy is written beside ``target`` and renamed into place once checked,
    so ``target`` is never half-written.
    """
    if not os.path.exists(source):
        raise MaintenanceError(f"{source} does not exist: nothing to back up")
    if os.path.exists(target):
        raise MaintenanceError(f"{target} exists; choose a new path")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise MaintenanceError(f"directory {directory} does not exist")
    partial = f"{target}.partial-{os.getpid()}"
    try:
        src = sqlite_connect(source, readonly=True)
        dst = sqlite_connect(partial)
        try:
            src.backup(dst)
            # One self-contained file: no -wal beside it to carry along.
            dst.execute("PRAGMA journal_mode = DELETE")
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise MaintenanceError(f"the copy failed its integrity check: {check}")
            pages = dst.execute("PRAGMA page_count").fetchone()[0]
        finally:
            dst.close()
            src.close()
        with open(partial, "rb") as copied:
            os.fsync(copied.fileno())
        os.link(partial, target)  # fails, rather than overwrites, if target appeared meanwhile
    except FileExistsError:
        raise MaintenanceError(f"{target} exists; choose a new path") from None
    except OSError as err:
        raise MaintenanceError(f"cannot write {target}: {err.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return pages


def check_backup(path: str) -> int:
    """Return the schema version of the backup at ``path``, or raise why it cannot be restored."""
    if not os.path.isfile(path):
        raise MaintenanceError(f"{path} does not exist")
    try:
        conn = sqlite_connect(path, readonly=True)
        try:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
    except Exception as err:  # the library's DatabaseError: not a database at all
        raise MaintenanceError(f"{path} is not a SQLite database ({err})") from None
    if check != "ok":
        raise MaintenanceError(f"{path} failed its integrity check: {check}")
    if not {"agents", "sessions", "api_keys"} <= tables or version < 1:
        raise MaintenanceError(f"{path} is not a backup of this service")
    if version > SCHEMA_VERSION:
        raise MaintenanceError(
            f"{path} has schema version {version}, newer than this release ({SCHEMA_VERSION})"
        )
    return version


def sqlite_restore(backup: str, target: str) -> int:
    """Replace the database at ``target`` with the backup at ``backup``; return its page count.

    Refused while another process has ``target`` open. The backup API writes
    the whole copy in one transaction of ``target`` (WAL included), so a
    failure leaves the old database as it was.
    """
    check_backup(backup)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise MaintenanceError(f"directory {directory} does not exist")
    with sole_user(target):
        src = sqlite_connect(backup, readonly=True)
        dst = sqlite_connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = WAL")
            dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = dst.execute("PRAGMA page_count").fetchone()[0]
        finally:
            dst.close()
            src.close()
    return pages
