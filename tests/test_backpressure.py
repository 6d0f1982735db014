"""A flood against slow handlers: the client is slowed down, the server's memory stays bounded
and nothing is dropped."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from conftest import APPS

from evserver import Client

RSS_BOUND_MIB = 150  # docs/delivery.md states this bound for the default settings


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_flood_of_200k_events_against_sleeping_handlers(server_factory):
    server = server_factory(f"{APPS}/sleepy_app.py:app", "--pool-size", "128")
    total = 200_000
    peak = [0.0]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_mib(server.proc.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        with Client(*server.address, timeout=60) as client:
            # Fire-and-forget: without backpressure this would finish in well under a second
            # and pile everything up in the server's memory.
            sent = client.send_many((("flood", {"n": i, "pad": "x" * 40}) for i in range(total)),
                                    batch_size=100)
            send_time = time.monotonic() - started
            client.flush()
            deadline = time.monotonic() + 120
            while (n := client.request("count")) < total and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        done.set()
        sampler.join()
    assert sent == total
    assert n == total, f"{total - n} events dropped"
    processing_time = time.monotonic() - started
    # The sender was held back by TCP: it could not finish long before processing did.
    assert send_time > processing_time * 0.5, (send_time, processing_time)
    assert peak[0] < RSS_BOUND_MIB, f"server RSS peaked at {peak[0]:.0f} MiB"
    print(f"flood: sent in {send_time:.1f}s, processed in {processing_time:.1f}s, "
          f"peak RSS {peak[0]:.0f} MiB")
