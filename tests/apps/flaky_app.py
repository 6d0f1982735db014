"""Handlers that fail until the file named by ``FLAKY_FIXED`` exists (a deploy of the fix).

Set ``FLAKY_SEEN=/path`` to have the id of every event a handler is called with appended
there, one line per call (one ``os.write``, so lines never interleave): tests see exactly
which events, under which ids, a replay re-sent and how often each ran.
"""

from __future__ import annotations

import os

from evserver import App, Event

app = App("flaky")
FIXED = os.environ.get("FLAKY_FIXED", "/nonexistent")
_seen = os.environ.get("FLAKY_SEEN")
_seen_fd = os.open(_seen, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if _seen else None


def _saw(event: Event) -> None:
    if _seen_fd is not None:
        os.write(_seen_fd, f"{event.id}\n".encode())


def _check(event: Event) -> None:
    _saw(event)
    if not os.path.exists(FIXED):
        raise RuntimeError(f"not fixed yet: {event.data}")


@app.processor("pay.*", retries=1, backoff=0.01)
def pay(event: Event) -> str:
    _check(event)
    return "paid"


@app.listener("notify.**", retries=0)
def notify(event: Event) -> None:
    _check(event)


@app.processor("ok")
def ok(event: Event) -> str:
    _saw(event)
    return "ok"
