"""The dead-letter store: events whose handler failed for good, kept for inspection and replay.

Layout: the ``[dead_letters] path`` directory holds one append-only file per store (one per
server process), ``dead-letters-<pid>-<start ms>-<n>.msgpack``, so worker processes never
interleave writes; readers merge every file, ordered by failure time.

Framing: each record is ``EVDL | length | crc32 | msgpack map``. A crash (or a full disk) can
leave a torn record; reading skips any bytes that are not a whole, checksummed record and
resumes at the next valid one, so one bad record never hides the rest. A failed append is
also truncated away at once, so a live file never has a torn record in its middle.

Durability: an append reaches the OS at once (a killed process loses nothing); ``fsync``
runs at most every ``fsync_interval`` seconds (``0`` = after every append). The store starts
no threads: ``append`` calls the cheap ``maybe_sync`` and the server's own timer calls it too,
so a lone record is not left unsynced; ``close`` syncs.

Locking rule: every access to a file's bytes holds an ``flock`` on the file the path names
*now*: appends and rewrites ``LOCK_EX``, reads ``LOCK_SH``. ``remove`` rewrites a file into a
temporary one, fsyncs it and renames it over the original (or unlinks an emptied file), so
a crash leaves either the old or the new file, never half of one. Whoever was waiting for
the lock then finds the path names another file (or none) and reopens it, so a replay never
loses an append that raced it. Locks are only held for one write or one read of the file,
never while events are re-sent. Readers and rewriters (the CLI) wait in the kernel's queue,
so a busy writer cannot starve them; the server's appends poll with ``time.sleep``, which is
green when monkey-patched, so a replay cannot stall a worker's event loop.
"""

from __future__ import annotations

import fcntl
import heapq
import itertools
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import msgpack

from .app import compile_pattern, matches

__all__ = ["DeadLetter", "DeadLetterStore"]

log = logging.getLogger("evserver.deadletters")

_PREFIX, _SUFFIX = "dead-letters-", ".msgpack"
_MAGIC = b"EVDL"
_HEADER = struct.Struct(">4sII")  # magic, payload length, crc32 of the payload
_LOCK_POLL_MAX = 0.05
_store_seq = itertools.count(1)  # two stores in one process (tests, reloads) get two files


@dataclass(frozen=True)
class DeadLetter:
    """One event that a handler could not process, with why and how often it was tried.

    The event's own id is kept so a replay re-sends it under that id and handlers that
    deduplicate on ``event.id`` recognise it.
    """

    event_type: str
    data: Any
    event_id: str
    event_time: float
    meta: dict[str, Any]
    handler: str
    kind: Literal["processor", "listener"]
    error_type: str
    message: str
    traceback: str
    attempts: int
    failed_at: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a flat dict (no deep copy of ``data``, unlike ``dataclasses.asdict``)."""
        return {name: getattr(self, name) for name in _FIELDS}


_FIELDS = tuple(f.name for f in fields(DeadLetter))


class DeadLetterStore:
    """Appends this process's dead letters to its own file; reads and removes everyone's."""

    def __init__(self, path: str | os.PathLike[str], *, fsync_interval: float = 1.0) -> None:
        self.dir = Path(path).absolute()  # relative to the cwd at start, whatever chdirs later
        self.fsync_interval = fsync_interval
        start_ms = int(time.time() * 1000)
        self.file = self.dir / f"{_PREFIX}{os.getpid()}-{start_ms}-{next(_store_seq)}{_SUFFIX}"
        self._fd: int | None = None
        self._dirty = False
        self._last_sync = time.monotonic()

    def __enter__(self) -> DeadLetterStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def append(self, record: DeadLetter) -> None:
        """Write one record to this store's file (to the OS now, to disk per fsync_interval)."""
        frame = _encode(record)
        fd = self._lock_own_file()
        try:
            _write_all(fd, frame)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._dirty = True
        self.maybe_sync()

    def _lock_own_file(self) -> int:
        """This store's file, open and exclusively locked; reopened if a replay replaced it."""
        fd = self._fd
        if fd is not None:
            _flock(fd, fcntl.LOCK_EX, poll=True)
            if _names(self.file, fd):
                return fd
            self._fd = None  # a replay rewrote or emptied our file
            os.close(fd)  # also drops the lock
        self.dir.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        fd = _open_locked(self.file, flags, fcntl.LOCK_EX, poll=True)
        assert fd is not None  # O_CREAT
        self._fd = fd
        _fsync_dir(self.dir)  # the new name must survive a crash as well as its bytes
        return fd

    def maybe_sync(self) -> None:
        """fsync if something was appended and the last fsync is ``fsync_interval`` old."""
        if self._dirty and time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        """fsync now whatever was appended since the last fsync."""
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Sync and close this store's file; a later ``append`` reopens it."""
        if self._fd is not None:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = None

    # ------------------------------------------------------------------ reading and removing

    def files(self) -> list[Path]:
        """Every process's dead-letter file in the directory."""
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob(f"{_PREFIX}*{_SUFFIX}"))

    def read(self, pattern: str | None = None) -> Iterator[DeadLetter]:
        """Every stored dead letter (all files), oldest failure first; ``pattern`` filters
        event types like handler patterns do (exact, ``*``, ``**``)."""
        if pattern is not None:
            compile_pattern(pattern)  # a bad pattern fails now, even for an empty store
        per_file = [_decode(_read_locked(path), path) for path in self.files()]
        for record in heapq.merge(*per_file, key=lambda r: r.failed_at):
            if pattern is None or matches(pattern, record.event_type):
                yield record

    def __iter__(self) -> Iterator[DeadLetter]:
        return self.read()

    def count(self) -> int:
        """How many records are stored (reads every file)."""
        return sum(1 for _ in self.read())

    def remove(self, ids: Iterable[str]) -> int:
        """Delete every record of these event ids, file by file and crash-safely.

        Returns how many records went. Unreadable bytes in a rewritten file go too.
        """
        wanted = set(ids)
        removed = 0
        if not wanted:
            return 0
        for path in self.files():
            fd = _open_locked(path, os.O_RDONLY, fcntl.LOCK_EX)
            if fd is None:  # emptied by another replay meanwhile
                continue
            try:
                records = list(_decode(_read_all(fd), path))
                keep = [r for r in records if r.event_id not in wanted]
                if len(keep) < len(records):
                    _rewrite(path, keep)
                    removed += len(records) - len(keep)
            finally:
                os.close(fd)  # drops the lock; waiters find the new file (or none)
        return removed


# ---------------------------------------------------------------------- framing


def _encode(record: DeadLetter) -> bytes:
    payload = msgpack.packb(record.as_dict(), use_bin_type=True, default=repr)
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode(data: bytes, source: Path) -> Iterator[DeadLetter]:
    """The whole records in ``data``; skips (and logs) anything else, resyncing on the magic."""
    pos, end, bad_from = 0, len(data), None
    while pos < end:
        size, record = _decode_at(data, pos)
        if size:
            if bad_from is not None:
                _skipped(source, bad_from, pos)
                bad_from = None
            if record is not None:
                yield record
            else:
                log.warning("skipped a dead letter of an unknown format at offset %d of %s",
                            pos, source)
            pos += size
            continue
        if bad_from is None:
            bad_from = pos
        pos = data.find(_MAGIC, pos + 1)
        if pos < 0:
            _skipped(source, bad_from, end)
            return


def _decode_at(data: bytes, pos: int) -> tuple[int, DeadLetter | None]:
    """``(size, record)`` of a valid frame at ``pos``, ``(0, None)`` if there is none.

    A frame that checks out but holds no valid record (a foreign or future format) has a
    size and no record, so reading steps over it instead of resyncing inside it.
    """
    start = pos + _HEADER.size
    if start > len(data):
        return 0, None
    magic, length, crc = _HEADER.unpack_from(data, pos)
    payload = data[start:start + length]
    if magic != _MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
        return 0, None
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        return _HEADER.size + length, DeadLetter(**{k: raw[k] for k in _FIELDS})
    except (ValueError, TypeError, KeyError, msgpack.UnpackException):
        return _HEADER.size + length, None


def _skipped(source: Path, start: int, stop: int) -> None:
    log.warning("skipped %d unreadable bytes at offset %d of %s (a write torn by a crash?)",
                stop - start, start, source)


# ---------------------------------------------------------------------- files and locks


def _flock(fd: int, op: int, *, poll: bool = False) -> None:
    """Take ``op`` on ``fd``: block in the kernel's queue, or (``poll``, for the server's
    appends) retry with ``time.sleep``, which is green when monkey-patched."""
    if not poll:
        fcntl.flock(fd, op)
        return
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(delay)
            delay = min(delay * 2, _LOCK_POLL_MAX)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a rewrite replaces it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (own.st_ino, own.st_dev)


def _open_locked(path: Path, flags: int, op: int, *, poll: bool = False) -> int | None:
    """Open ``path`` holding ``op`` on the file it names once locked; None if there is none."""
    while True:
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        _flock(fd, op, poll=poll)
        if _names(path, fd):
            return fd
        os.close(fd)  # locked a file a rewrite had just replaced: try its successor


def _read_all(fd: int) -> bytes:
    with open(fd, "rb", closefd=False) as f:
        f.seek(0)
        return f.read()


def _read_locked(path: Path) -> bytes:
    fd = _open_locked(path, os.O_RDONLY, fcntl.LOCK_SH)
    if fd is None:
        return b""
    try:
        return _read_all(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (os.write may write less) or, failing, none of it."""
    start = os.fstat(fd).st_size  # O_APPEND under LOCK_EX: the write lands here
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        try:
            os.ftruncate(fd, start)  # no torn record left in a live file
        except OSError:
            pass  # reading resyncs past it anyway
        raise


def _rewrite(path: Path, records: list[DeadLetter]) -> None:
    """Replace ``path`` by ``records`` atomically (caller holds its LOCK_EX)."""
    if records:
        # One temporary name per file: the lock admits one rewriter, and a crashed one's
        # leftover is simply overwritten (the glob never matches it).
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as out:
            for record in records:
                out.write(_encode(record))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    else:
        path.unlink()  # a live writer finds it gone and starts the file afresh
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
