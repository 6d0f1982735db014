"""The app ``evserver soak`` serves: handlers that wait, fail, retry and dead-letter on cue.

The soak's clients decide everything in the event's data (so a seeded run is repeatable):
``i`` the soak id, ``w`` milliseconds of green wait (``time.sleep`` is green in a worker:
it is monkey-patched), ``fails`` how many attempts of ``soak.flaky`` fail. Each handler
records its completed run (``records.Recorder``) before it returns, so before the ACK.
"""

from __future__ import annotations

import os
import time
from typing import Any

from evserver import App, Event

from .records import Recorder

app = App("soak")
record = Recorder()
record.open()
_attempts: dict[str, int] = {}  # soak.flaky: event id -> failed attempts in this worker
FLAKY_RETRIES = 2  # 3 attempts: ``fails`` >= 3 ends in the dead-letter store


class InjectedFailure(Exception):
    """The failure the soak asked for (``fails`` in the event's data)."""


def _work(event: Event) -> str:
    wait = event.data.get("w", 0)
    if wait:
        time.sleep(wait / 1000)
    return str(event.data["i"])


@app.processor("soak.fire")
@app.processor("soak.batch")
@app.processor("soak.fwd")
def plain(event: Event) -> None:
    record(_work(event))


@app.processor("soak.rr")
def request_reply(event: Event) -> dict[str, Any]:
    soak_id = _work(event)
    record(soak_id)
    return {"i": soak_id, "pid": os.getpid()}


@app.processor("soak.ordered", ordered_by="k")
def ordered(event: Event) -> None:
    record(_work(event))


@app.processor("soak.flaky", retries=FLAKY_RETRIES, backoff=0.005)
def flaky(event: Event) -> None:
    failed = _attempts.get(event.id, 0)
    if failed < int(event.data.get("fails", 0)):
        if failed >= FLAKY_RETRIES:
            _attempts.pop(event.id, None)  # the last attempt: no state outlives the event
        else:
            _attempts[event.id] = failed + 1
        raise InjectedFailure(f"attempt {failed + 1} fails on purpose")
    _attempts.pop(event.id, None)
    record(_work(event))


@app.processor("soak.blob")
def blob(event: Event) -> bytes:
    """A 16 KiB reply, for the client that stops reading its replies."""
    return b"x" * 16384


@app.processor("soak.pid")
def pid(event: Event) -> int:
    return os.getpid()
