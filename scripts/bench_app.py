"""The evserver app the bench drives: `evserver serve bench_app:app` with scripts/ on the path.

It does exactly the work of scripts/ref_receiver.py (one no-op call per event), so the ratio
between the two is the cost of evserver itself. The bench sends type "bench", which the
"bench.*" listener does not match: it is there so the listener lookup is paid but not a
second call the reference does not make.
"""

from __future__ import annotations

from evserver import App

app = App()


@app.processor("bench")
def bench(event: object) -> None:
    """No-op: REQUEST gets REPLY None, acked EVENT/BATCH get ACK."""
    return None


@app.listener("bench.*")
def bench_listener(event: object) -> None:
    return None
