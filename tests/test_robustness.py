"""Hostile and careless peers next to a healthy one: the healthy one keeps being served.

The latency bound asserted here is deliberately loose (it detects a blocked hub, which shows
as seconds, not a slow one); speed is measured by scripts/bench.py.
"""

from __future__ import annotations

import socket
import threading
import time

from conftest import wait_for
from rawpeer import RawPeer

from evserver import App
from evserver import protocol as p
from evserver.testing import serve_in_thread


def echo_app() -> App:
    app = App()
    app.processor("echo")(lambda event: event.data)
    return app


def healthy_latencies(address, n=200) -> list[float]:
    peer = RawPeer(address)
    out = []
    for corr in range(1, n + 1):
        t = time.perf_counter()
        assert peer.request(corr, "echo", corr).body == corr
        out.append(time.perf_counter() - t)
    peer.close()
    return sorted(out)


def test_healthy_client_is_served_beside_idle_slowloris_garbage_and_oversized_peers():
    with serve_in_thread(echo_app(), max_frame_bytes=64 * 1024, idle_timeout=30) as server:
        addr = server.address
        idle = [socket.create_connection(addr) for _ in range(1000)]
        stop = threading.Event()

        def slowloris():
            s = socket.create_connection(addr)
            frame = p.encode_event(1, ["echo", "x" * 100], request=True)
            i = 0
            while not stop.is_set() and i < len(frame):
                s.send(frame[i : i + 1])  # one byte at a time, forever incomplete
                i += 1
                stop.wait(0.02)
            s.close()

        def vandal():
            while not stop.is_set():
                for data in (b"\xc1" * 100, p.encode_event(0, ["echo", b"x" * 100_000])):
                    s = socket.create_connection(addr)
                    s.sendall(data)
                    s.recv(65536)  # the error frame (or HELLO first), then EOF
                    s.close()

        threads = [threading.Thread(target=f) for f in (slowloris, slowloris, vandal)]
        for t in threads:
            t.start()
        try:
            latencies = healthy_latencies(addr)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for s in idle:
                s.close()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        assert p99 < 0.25, f"healthy client p99 {p99 * 1000:.1f} ms: something blocked the hub"
        assert server.counters["protocol_errors"] > 0


def test_a_firehose_connection_does_not_starve_others():
    app = echo_app()
    app.listener("flood")(lambda event: None)
    with serve_in_thread(app) as server:
        stop = threading.Event()
        batch = p.encode_batch(0, [["flood", i] for i in range(500)]) * 20

        def firehose():
            s = socket.create_connection(server.address)
            while not stop.is_set():
                s.sendall(batch)
            s.close()

        t = threading.Thread(target=firehose)
        t.start()
        stats = server.dispatcher.stats
        try:
            wait_for(lambda: stats.events_in > 10_000, 10, "the firehose flowing")
            before = stats.events_in
            healthy_latencies(server.address, 100)  # a starved peer would time out here
            during = stats.events_in - before
        finally:
            stop.set()
            t.join(10)
        # Counted, not timed: the healthy peer got its 100 answers while the firehose kept
        # flowing (a reader that never yielded would have served one or the other).
        assert during > 0, "the firehose made no progress while the healthy peer was served"
