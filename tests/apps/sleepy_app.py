"""Handlers that sleep (cooperatively: the server monkey-patches), for backpressure tests."""

from __future__ import annotations

import time

from evserver import App, Event

app = App("sleepy")
processed = 0


@app.listener("flood")
def flood(event: Event) -> None:
    global processed
    time.sleep(0.001)
    processed += 1


@app.processor("count")
def count(event: Event) -> int:
    return processed
