"""A test app for the Forward listener: records every event it sees, as JSON lines.

``FORWARD_RECORD=/path`` names the file; each processed event appends one line
``{"pid", "type", "data", "time", "time_ns", "meta"}`` with a single ``os.write`` before the
event is acked, so a test can compare it with what it sent. Tags under ``fail.`` raise, to
test that a failed request is not acked.
"""

from __future__ import annotations

import json
import os

from evserver import App, Event

app = App("forward")
_record = os.environ.get("FORWARD_RECORD")
_fd = os.open(_record, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if _record else None


def _write(event: Event) -> None:
    if _fd is not None:
        line = {"pid": os.getpid(), "type": event.type, "data": event.data,
                "time": event.time, "time_ns": event.time_ns, "meta": event.meta}
        os.write(_fd, (json.dumps(line, default=repr) + "\n").encode())


@app.processor("**")
def record(event: Event) -> str:
    _write(event)
    return "ignored"  # Forward has no replies: the value must simply be dropped


@app.processor("fail.**")
def fail(event: Event) -> None:
    raise RuntimeError(f"refusing {event.type}")


@app.listener("listened.**")
def listened(event: Event) -> None:
    event.meta.setdefault("seen_by", "listener")
