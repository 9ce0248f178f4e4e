"""prometheus_client's multiprocess files, with every page allocated before it is written.

Under gunicorn each process keeps its values in files of
``PROMETHEUS_MULTIPROC_DIR`` (``gunicorn.conf.py`` puts them in ``$TMPDIR``),
written through a memory map by ``prometheus_client.mmap_dict.MmapedDict``.
That class makes and grows its files with ``truncate``, which leaves them
sparse: the first write to a page that has no block yet is where the
filesystem finds room, and on a full one (a full tmpfs ``$TMPDIR``) the
kernel answers a write through a memory map with SIGBUS. A worker died so
at its first request, and every worker gunicorn started in its place.

:class:`AllocatedMmapedDict` takes the blocks first, with
``os.posix_fallocate``, where no room is an ``OSError``: a new file is made
whole (64 KiB, as the library would) under a temporary name and renamed into
place, and each new value's entry is allocated before the library writes it.
When there is no room, that file's values go on in the process's memory: the
file keeps what it had, ``/metrics`` misses this process's counts from then
on, the process logs one warning, and nothing else changes. prometheus_client
has no setting for the class of its files: :func:`install` sets the name its
value class looks up for each new one (``prometheus_client.values.MmapedDict``).

``gunicorn.conf.py`` also checks at start that the directory has room for the
first files of the master and every worker (:func:`room_error`), and refuses
to start with one line when it has not.

A worker that exits leaves its files behind, and every scrape would read
them, each a little more than the last, as workers come and go. Its
``child_exit`` hook calls :func:`fold`, which adds the worker's counters and
histograms into one merged file of each kind, so the directory holds the
live processes' files and those two. Folding and scraping take turns on
the directory's lock (:func:`locked`), so a scrape counts a dead worker once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Iterable, Iterator

from prometheus_client import multiprocess, values
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key

log = logging.getLogger("sessions_app.metric_files")  # the name log filters select it by

# The size the library gives a new file, and the files each process makes at start
# (counter, histogram, gauge_livesum: metrics.py's metrics).
INITIAL_SIZE = 1 << 16
FILES_PER_PROCESS = 3
# An entry is its length (4 bytes), the key padded to 8 bytes, and two doubles.
ENTRY_OVERHEAD = 4 + 8 + 16

# What the exited workers counted, by kind: counter_merged.db, histogram_merged.db.
MERGED = "merged"
FOLDED_KINDS = ("counter", "histogram")
# Taken by each scrape and each fold (not *.db: the collector reads only those).
LOCK_FILE = "files.lock"

_warned_pid: int | None = None


class AllocatedMmapedDict(MmapedDict):
    """A ``MmapedDict`` that allocates blocks before it writes to them, or goes on in memory."""

    def __init__(self, filename: str, read_mode: bool = False):
        if read_mode:
            super().__init__(filename, read_mode)
            return
        try:
            _make_allocated(filename)
        except OSError as err:
            self._start_in_memory(filename, err)
            return
        super().__init__(filename)

    def _init_value(self, key: str) -> None:
        """Allocate the new entry's bytes (growing as the library will), then let it write them."""
        end = self._used + len(key.encode("utf-8")) + ENTRY_OVERHEAD
        if self._f is not None:
            try:  # past the end, this makes the file longer: the library's truncate follows
                os.posix_fallocate(self._f.fileno(), self._used, end - self._used)
            except OSError as err:
                self._go_on_in_memory(err)
        capacity = self._capacity
        while end > capacity:
            capacity *= 2
        if self._f is None and capacity > self._capacity:
            memory = mmap.mmap(-1, capacity)
            memory[: self._used] = self._m[: self._used]
            self._m.close()
            self._m, self._capacity = memory, capacity
        super()._init_value(key)

    def _start_in_memory(self, filename: str, err: OSError) -> None:
        """What the library's ``__init__`` sets, over an anonymous map instead of a file."""
        self._f = None
        self._fname = filename
        self._capacity = INITIAL_SIZE
        self._m = mmap.mmap(-1, INITIAL_SIZE)
        self._positions = {}
        self._used = 8
        self._m[0:4] = struct.pack("i", self._used)
        _warn(filename, err)

    def _go_on_in_memory(self, err: OSError) -> None:
        """Copy what is written (its pages are allocated) to memory, and leave the file as it is."""
        memory = mmap.mmap(-1, self._capacity)
        memory[: self._used] = self._m[: self._used]
        self._m.close()
        self._f.close()
        self._m, self._f = memory, None
        _warn(self._fname, err)

    def close(self) -> None:
        if self._f is None and self._m is not None:
            self._m.close()
            self._m = None
        super().close()


def _make_allocated(filename: str) -> None:
    """A new file of ``INITIAL_SIZE`` allocated bytes at ``filename``; one with content is kept.

    Made under another name and renamed, so a scrape never reads it half made
    (the collector reads only ``*.db``).
    """
    with contextlib.suppress(FileNotFoundError):
        if os.stat(filename).st_size > 0:
            return  # a process of the same id had it: the library reads on from it
    partial = f"{filename}.{os.getpid()}.new"
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, INITIAL_SIZE)
        os.rename(partial, filename)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    finally:
        os.close(fd)


def _warn(filename: str, err: OSError) -> None:
    global _warned_pid
    if _warned_pid == os.getpid():
        return
    _warned_pid = os.getpid()
    log.warning(
        "metrics: no room for %s (%s): this process counts on in its memory only, and /metrics "
        "misses its counts from now on; free space in PROMETHEUS_MULTIPROC_DIR",
        filename,
        err.strerror or err,
    )


def install() -> None:
    """Have prometheus_client make every new multiprocess file with :class:`AllocatedMmapedDict`."""
    values.MmapedDict = AllocatedMmapedDict


def room_error(directory: str, processes: int) -> OSError | None:
    """Why ``directory`` cannot hold the first files of ``processes`` processes, or None.

    Allocates that much in a file of its own, then removes it.
    """
    probe = os.path.join(directory, f".room-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as err:
        return err
    try:
        os.posix_fallocate(fd, 0, processes * FILES_PER_PROCESS * INITIAL_SIZE)
    except OSError as err:
        return err
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return None


@contextlib.contextmanager
def locked(directory: str) -> Iterator[None]:
    """Hold the directory's lock (any thread of any process): scrapes and folds take turns.

    Without a lock file (the directory gone, no inode left) it goes on unlocked.
    """
    try:
        fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # which releases the lock


def fold(directory: str, pid: int) -> None:
    """The process ``pid`` is gone: its counts go into the merged files, and its files go.

    Counters and histograms are added into ``counter_merged.db`` and
    ``histogram_merged.db`` (prometheus_client's merge without accumulating
    the buckets, as it says for a merge written back to files), which is
    written whole under another name and renamed into place; then the dead
    process's file is removed, all under :func:`locked`. Its live gauges are
    removed (``mark_process_dead``). When the merged file cannot be written
    (no room) or a file cannot be read, the dead process's files stay, and
    are read as before.
    """
    with locked(directory):
        multiprocess.mark_process_dead(pid, directory)
        for kind in FOLDED_KINDS:
            dead = os.path.join(directory, f"{kind}_{pid}.db")
            if not os.path.exists(dead):
                continue
            merged = os.path.join(directory, f"{kind}_{MERGED}.db")
            partial = f"{merged}.new"  # not *.db: no scrape reads it half written
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)  # a fold cut short; its content would be read on
            sources = [dead, merged] if os.path.exists(merged) else [dead]
            try:
                _write(partial, multiprocess.MultiProcessCollector.merge(sources, accumulate=False))
                os.replace(partial, merged)
            except (OSError, ValueError, struct.error) as err:
                with contextlib.suppress(OSError):
                    os.unlink(partial)
                log.warning(
                    "metrics: the files of exited process %d stay as they are: %s", pid, err
                )
                continue
            os.unlink(dead)


def _write(filename: str, families: Iterable[Metric]) -> None:
    """Write merged metric families into a new file, every block allocated first."""
    target = AllocatedMmapedDict(filename)
    try:
        if target._f is None:
            raise OSError(f"no room for {filename}")
        for family in families:
            for sample in family.samples:
                labels = sample.labels
                key = mmap_key(
                    family.name,
                    sample.name,
                    list(labels),
                    list(labels.values()),
                    family.documentation,
                )
                target.write_value(key, sample.value, sample.timestamp or 0.0)
                if target._f is None:
                    raise OSError(f"no room for {filename}")
    finally:
        target.close()
