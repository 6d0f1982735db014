"""The evserver app the bench drives: `evserver serve bench_app:app` with scripts/ on the path.

By default it does exactly the work of scripts/ref_receiver.py (one no-op call per event), so
the ratio between the two is the cost of evserver itself. The bench sends type "bench", which
the "bench.*" listener does not match: it is there so the listener lookup is paid but not a
second call the reference does not make.

With the bench's handler options (scripts/bench_costs.py reads them from the environment) the
processor waits and/or spins per event and counts the handlers in flight, may be ordered by
key, and ``BENCH_LISTENER=1`` makes the listener match every event, as in real apps.
"""

from __future__ import annotations

import time

from bench_costs import KEYS, LISTENER, SPIN, WAIT, in_flight, spin

from evserver import App

app = App()


def costly(event: object) -> None:
    """A processor with the configured costs, counted while it runs."""
    in_flight.enter()
    try:
        if WAIT:
            time.sleep(WAIT)  # a green wait under evserver's monkey patching
        if SPIN:
            spin(SPIN)
    finally:
        in_flight.leave()


def noop(event: object) -> None:
    """No-op: REQUEST gets REPLY None, acked EVENT/BATCH get ACK."""
    return None


app.processor("bench", ordered_by="key" if KEYS else None)(costly if WAIT or SPIN else noop)


@app.listener("bench" if LISTENER else "bench.*")
def bench_listener(event: object) -> None:
    return None
