"""The handler costs the bench gives its servers, read once from the environment.

scripts/bench.py sets these for every server it starts (evserver serving bench_app.py and the
asyncio reference, scripts/ref_asyncio.py), so both run the same handler; unset, there is no
cost and the servers keep their no-op paths:

- ``BENCH_HANDLER_WAIT_MS``: a wait per event that yields to the loop (I/O-bound, like a
  handler waiting on a database or an HTTP call);
- ``BENCH_HANDLER_CPU_US``: a CPU spin per event (after the wait when both are set);
- ``BENCH_ORDERED_KEYS``: K > 0 orders the events by ``data["key"]``, which the bench's events
  carry (K keys, cycling);
- ``BENCH_LISTENER=1``: evserver's app also runs a no-op listener for every event;
- ``BENCH_STATS``: a path prefix; each server process writes the most handlers it has had in
  flight at once to ``<prefix>.<pid>``.
"""

from __future__ import annotations

import os
import time

WAIT = float(os.environ.get("BENCH_HANDLER_WAIT_MS") or 0) / 1e3
SPIN = float(os.environ.get("BENCH_HANDLER_CPU_US") or 0) / 1e6
KEYS = int(os.environ.get("BENCH_ORDERED_KEYS") or 0)
LISTENER = os.environ.get("BENCH_LISTENER", "") not in ("", "0")
STATS = os.environ.get("BENCH_STATS", "")


def spin(seconds: float) -> None:
    """Burn CPU for ``seconds`` without yielding: parsing, encoding, computing."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Concurrency:
    """Handlers in flight and the most ever reached, written to a file each time it rises.

    It rises at most pool-size times, so the file writes stay off the per-event path. Green
    threads and asyncio tasks switch only where a handler yields, so plain integers need no lock.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.now = 0
        self.max = 0

    def enter(self) -> None:
        self.now += 1
        if self.now > self.max:
            self.max = self.now
            if self.prefix:  # the pid now, not at import: workers are forked after it
                with open(f"{self.prefix}.{os.getpid()}", "w") as f:
                    f.write(str(self.max))

    def leave(self) -> None:
        self.now -= 1


in_flight = Concurrency(STATS)
