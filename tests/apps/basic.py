"""A test app whose handlers exercise the client: echo, failures, slowness, counting.

Set ``BASIC_RECORD=/path`` to have every event's id and data appended to that file, one
``id<TAB>data`` line per processed event, written with one ``os.write`` before the ack so
it survives SIGKILL: tests compare it with what they sent, across server restarts.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

from evserver import App, Event

app = App("basic")
counts: Counter[str] = Counter()
_record = os.environ.get("BASIC_RECORD")
_record_fd = os.open(_record, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if _record else None


@app.processor("echo")
def echo(event: Event) -> Any:
    return event.data


@app.processor("fail")
def fail(event: Event) -> None:
    raise ValueError(event.data or "bad id")


started: Counter[str] = Counter()


@app.processor("sleep")
def sleep(event: Event) -> Any:
    started["sleep"] += 1
    time.sleep(event.data)  # green: the server monkey-patches
    return event.data


@app.processor("started")
def report_started(event: Event) -> dict[str, int]:
    """How many ``sleep`` handlers have started; with ``{"sleep": n}``, first wait (<= 10 s)
    until n have, so a test can act while they are surely in flight."""
    return _when_reached(started, event.data or {})


@app.processor("pid")
def pid(event: Event) -> int:
    return os.getpid()


@app.processor("event")
def describe(event: Event) -> dict[str, Any]:
    """What the server saw: lets tests check client-assigned ids, times and meta."""
    return {"id": event.id, "time": event.time, "meta": event.meta, "data": event.data}


@app.processor("counts")
def report(event: Event) -> dict[str, int]:
    """Event counts by type; with ``{type: n}`` data, first wait (<= 10 s) until reached,
    since fire-and-forget events of earlier reads may still be running."""
    return _when_reached(counts, event.data or {})


def _when_reached(counter: Counter[str], want: dict[str, int]) -> dict[str, int]:
    """The counter's values once every ``want`` count is reached (or after 10 s)."""
    deadline = time.monotonic() + 10
    while any(counter[t] < n for t, n in want.items()) and time.monotonic() < deadline:
        time.sleep(0.005)  # green (monkey-patched): other events keep being served
    return dict(counter)


@app.listener("**")
def count(event: Event) -> None:
    """Types without a processor (e.g. ``tick``) are handled by this listener alone."""
    counts[event.type] += 1
    if _record_fd is not None:
        os.write(_record_fd, f"{event.id}\t{json.dumps(event.data)}\n".encode())
