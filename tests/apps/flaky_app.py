"""Handlers that fail until the file named by ``FLAKY_FIXED`` exists (a deploy of the fix)."""

from __future__ import annotations

import os

from evserver import App, Event

app = App("flaky")
FIXED = os.environ.get("FLAKY_FIXED", "/nonexistent")


def _check(event: Event) -> None:
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
    return "ok"
