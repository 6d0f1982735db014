"""The dead-letter store: events whose handler failed for good, kept for inspection and replay.

Layout: one append-only file per server process, ``dead-letters-<pid>-<start>.msgpack``, in
the ``[dead_letters] path`` directory, so worker processes never interleave writes; readers
merge every file. Each record is one msgpack map. A crash can tear only the last record of a
file, and a torn record is detected (incomplete msgpack) and skipped when reading.

Durability: every append is written to the OS at once (a killed process loses nothing);
``fsync`` runs at most every ``fsync_interval`` seconds (``0`` = after every append), from
``maybe_sync`` on the append path and from the server's timer, and on ``close``.

Concurrency: appends and rewrites take an exclusive ``flock`` on the file. ``remove`` (used
by replay) rewrites a file into a temporary one and renames it over the original; a writer
notices the rename under its lock and reopens, so no append is lost to a rewrite.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack

from .app import matches

log = logging.getLogger("evserver.deadletters")

_PREFIX, _SUFFIX = "dead-letters-", ".msgpack"


@dataclass(frozen=True)
class DeadLetter:
    """One event that a handler could not process, with why and how often it was tried."""

    event_type: str
    data: Any
    event_id: str
    event_time: float
    meta: dict[str, Any]
    handler: str
    kind: str  # "processor" or "listener"
    error_type: str
    message: str
    traceback: str
    attempts: int
    failed_at: float


class DeadLetterStore:
    """Appends this process's dead letters; reads and removes everyone's."""

    def __init__(self, path: str | os.PathLike[str], *, fsync_interval: float = 1.0) -> None:
        self.dir = Path(path)
        self.fsync_interval = fsync_interval
        self.file = self.dir / f"{_PREFIX}{os.getpid()}-{int(time.time() * 1000)}{_SUFFIX}"
        self._fd: int | None = None
        self._dirty = False
        self._last_sync = time.monotonic()

    # ------------------------------------------------------------------ writing

    def append(self, record: DeadLetter) -> None:
        """Write one record (to the OS at once; fsynced per ``fsync_interval``)."""
        data = msgpack.packb(asdict(record), use_bin_type=True, default=repr)
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if self._replaced(fd):  # a replay rewrote our file: append to the new one
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                self._fd = None
                fd = self._open()
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._dirty = True
        self.maybe_sync()

    def maybe_sync(self) -> None:
        if self._dirty and time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        if self._fd is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return self._fd

    def _replaced(self, fd: int) -> bool:
        try:
            return os.stat(self.file).st_ino != os.fstat(fd).st_ino
        except FileNotFoundError:
            return True

    # ------------------------------------------------------------------ reading

    def files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob(f"{_PREFIX}*{_SUFFIX}"))

    def read(self, pattern: str | None = None) -> Iterator[DeadLetter]:
        """Every stored dead letter (all processes' files), oldest file first."""
        for path in self.files():
            for record in _read_file(path):
                if pattern is None or matches(pattern, record.event_type):
                    yield record

    __iter__ = read

    def count(self) -> int:
        return sum(1 for _ in self.read())

    def remove(self, ids: Iterable[str]) -> int:
        """Delete the records with these event ids, crash-safely; return how many went."""
        wanted = set(ids)
        removed = 0
        for path in self.files():
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                records = list(_read_file(path))
                keep = [r for r in records if r.event_id not in wanted]
                if len(keep) == len(records):
                    continue
                removed += len(records) - len(keep)
                if not keep:
                    path.unlink()  # a live writer sees it gone and starts a new file
                    continue
                tmp = path.with_suffix(".tmp")
                with open(tmp, "wb") as out:
                    for r in keep:
                        out.write(msgpack.packb(asdict(r), use_bin_type=True, default=repr))
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            finally:
                os.close(fd)  # closing drops the lock
        return removed


def _read_file(path: Path) -> Iterator[DeadLetter]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    try:
        for raw in unpacker:
            try:
                yield DeadLetter(**raw)
            except TypeError:
                log.warning("skipping a malformed dead letter in %s", path)
    except (ValueError, msgpack.UnpackException) as exc:
        log.warning("stopped reading %s at a corrupt record: %s", path, exc)
    # An incomplete last record (torn by a crash) ends the iteration quietly.
