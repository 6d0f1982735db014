"""The app tests/test_admin.py serves: several event types, a failing one, a listener."""

from __future__ import annotations

import os

from evserver import App, Event

app = App("admin-test")


@app.processor("order.created")
def created(event: Event) -> dict:
    return {"id": event.data}


@app.processor("order.*", retries=1, backoff=0)
def other_order(event: Event) -> None:
    pass


@app.processor("fail")
def fail(event: Event) -> None:
    raise ValueError("always fails")


@app.listener("order.**", timeout=5)
def audit(event: Event) -> None:
    pass


@app.processor("whoami")
def whoami(event: Event) -> int:
    return os.getpid()
