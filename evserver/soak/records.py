"""What the soak app records per processed event, and how the soak reads it back.

Each worker appends one line per completed handler run to its own file,
``rec-<pid>.log`` in the soak directory: ``<soak id> <CLOCK_MONOTONIC ns>``. Each line is one
``write(2)`` on an ``O_APPEND`` descriptor, so it is in the kernel's page cache before the
handler returns (and so before any ACK or reply): a SIGKILLed worker loses none of its
records. The monotonic clock is system-wide, so the times of different workers compare.

Soak ids name what was sent: ``<kind>-<rest>``; ordered events are ``o-<key>-<seq>``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

DIR_ENV = "EVSERVER_SOAK_DIR"


class Recorder:
    """The app side: one append-only file per worker process, opened on first use."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._pid = 0

    def open(self) -> None:
        """Open this process's file now, so a fresh worker's fd count already includes it."""
        if self._fd is None or self._pid != os.getpid():
            self._pid = os.getpid()
            path = Path(os.environ[DIR_ENV]) / f"rec-{self._pid}.log"
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, soak_id: str) -> None:
        self.open()
        assert self._fd is not None
        os.write(self._fd, f"{soak_id} {time.monotonic_ns()}\n".encode())


def read_records(directory: Path) -> Iterator[tuple[str, int, int]]:
    """Every record of every worker: (soak id, monotonic ns, worker pid).

    A line torn by a SIGKILL mid-write (never seen: the writes are tiny) is skipped.
    """
    for path in sorted(directory.glob("rec-*.log")):
        pid = int(path.stem.split("-", 1)[1])
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                yield parts[0], int(parts[1]), pid

