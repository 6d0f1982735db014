"""The app tests/test_workers.py serves: it says which process ran it and records what ran.

``RECORD_ENV`` names a file that gets one line per processed ``record`` event (its id), so a
test can check that every acknowledged event was processed, by whichever worker.
"""

from __future__ import annotations

import os
import time

from evserver import App, Event

RECORD_ENV = "WORKERS_APP_RECORD"
VERSION = 1

if os.environ.get("WORKERS_APP_EXIT_AT_IMPORT"):  # a worker that dies while booting
    os._exit(int(os.environ["WORKERS_APP_EXIT_AT_IMPORT"]))

app = App("workers-test")
_record_fd: int | None = None


@app.processor("pid")
def pid(event: Event) -> int:
    return os.getpid()


@app.processor("version")
def version(event: Event) -> int:
    return VERSION


@app.processor("record")
def record(event: Event) -> int:
    """Append the id with one O_APPEND write: atomic between the workers' processes."""
    global _record_fd
    if _record_fd is None:
        _record_fd = os.open(os.environ[RECORD_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(_record_fd, f"{event.id}\n".encode())
    return os.getpid()


@app.processor("block")
def block(event: Event) -> None:
    """Hold the hub (no yielding) for ``data`` seconds, like a CPU-bound handler would."""
    end = time.monotonic() + float(event.data)
    while time.monotonic() < end:
        pass
