"""A flood against slow handlers: the client is slowed down, the server's memory stays bounded
and nothing is dropped."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from conftest import APPS, hold_the_pool, wait_for
from rawpeer import RawPeer

from evserver import App, Client, Event
from evserver import protocol as p
from evserver.testing import serve_in_thread

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


def test_a_peer_that_does_not_read_holds_no_pool_worker() -> None:
    """A pool worker answering a job of a peer that reads nothing leaves the bytes to a
    writer green thread of the connection's own, so the pool goes on with the next job:
    here a pool of one, whose worker would otherwise wait out the 60 s idle timeout."""
    app = App()
    release = hold_the_pool(app)

    @app.processor("big")
    def big(event: Event) -> bytes:
        return b"x" * (512 << 10)

    @app.processor("echo")
    def echo(event: Event) -> object:
        return event.data

    def jobs_of(server: Any, peer: RawPeer) -> int:
        port = peer.sock.getsockname()[1]
        return sum(c.jobs for c in list(server.connections) if c.addr[1] == port)

    def wait_jobs(server: Any, peer: RawPeer) -> None:
        wait_for(lambda: jobs_of(server, peer), 10, "the job to reach the dispatcher")

    with serve_in_thread(app, pool_size=1, idle_timeout=60) as server:
        holder, silent, other = (RawPeer(server.address) for _ in range(3))
        holder.send(p.encode_event(1, ["hold", None], request=True))
        wait_jobs(server, holder)
        # 40 replies of 512 KiB to a peer that reads none: far beyond the socket buffers.
        silent.send(b"".join(p.encode_event(i, ["big", None], request=True)
                             for i in range(1, 41)))
        wait_jobs(server, silent)
        other.send(p.encode_event(1, ["echo", "served"], request=True))
        wait_jobs(server, other)  # queued behind the silent peer's job
        release.set()
        assert holder.recv_frames(1)[0].body == "released"
        reply = other.recv_frames(1)[0]  # within RawPeer's 10 s, not the 60 s idle timeout
        assert (reply.kind, reply.body) == (p.REPLY, "served")
        assert jobs_of(server, silent) == 0  # answered: its bytes wait in its own writer
        frames = silent.recv_frames(40)  # and they all arrive once it reads
        assert [(f.corr, len(f.body)) for f in frames] == [(i, 512 << 10) for i in range(1, 41)]
        for peer in (holder, silent, other):
            peer.close()
