"""Peers slow to read their answers, over real loopback sockets: bytes owed are written
whole even when the connection is closing behind them."""

from __future__ import annotations

import socket
import time
from typing import Any

import msgpack
from conftest import hold_the_pool, wait_for
from rawpeer import RawPeer

from evserver import App, Event
from evserver import protocol as p
from evserver.testing import serve_in_thread

FORWARD = {"forward.enabled": True, "forward.port": 0}


def slow_reader(address: Any) -> socket.socket:
    """A client whose receive window is tiny, so the server's replies back up at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(address)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    deadline = time.monotonic() + 10
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
        assert time.monotonic() < deadline, "no EOF"
    return b"".join(chunks)


def test_forward_acks_owed_before_a_failed_request_all_reach_a_slow_peer() -> None:
    """A Forward job whose last request failed owes the acks of the requests before it,
    then closes (so the client retries only the failed one). Written by a pool worker, what
    the socket does not take at once goes to the writer green thread; the close must wait
    for it, or the acks are cut off mid-frame and the client resends requests that were
    processed (duplicates)."""
    app = App()
    release = hold_the_pool(app)  # the Forward jobs queue for the pool's one worker

    @app.processor("ok")
    def ok(event: Event) -> None:
        pass

    @app.processor("bad")
    def bad(event: Event) -> None:
        raise RuntimeError("fails on purpose")

    chunks = ["c" * (6 << 20)]  # an ack larger than the socket buffers hold (4 MiB at most)
    wire = b"".join(msgpack.packb(["ok", [[1_700_000_000, {"i": i}]], {"chunk": chunk}])
                    for i, chunk in enumerate(chunks))
    wire += msgpack.packb(["bad", [[1_700_000_000, {"i": 99}]], {"chunk": "bad-one"}])
    with serve_in_thread(app, pool_size=1, settings=FORWARD) as server:
        holder = RawPeer(server.address)
        holder.send(p.encode_event(1, ["hold", None], request=True))
        wait_for(lambda: server.dispatcher.stats.events_in == 1, 10, "the holding job")
        sock = slow_reader(server.forward.address)
        sock.sendall(wire)
        wait_for(lambda: server.dispatcher.stats.events_in == 3, 10, "the Forward jobs")
        release.set()
        wait_for(lambda: server.counters["forward_unacked"] == 1, 10, "the failed request")
        unpacker = msgpack.Unpacker()
        unpacker.feed(read_to_eof(sock))
        acks = [a["ack"] for a in unpacker]
        sock.close()
        holder.close()
    assert acks == chunks, f"{len(acks)} of {len(chunks)} acks arrived"

