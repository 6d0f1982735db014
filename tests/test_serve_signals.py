"""`evserver serve` in one process: SIGTERM and SIGINT drain in-flight work and exit 0."""

from __future__ import annotations

import signal
import socket

import pytest
from conftest import APPS
from rawpeer import RawPeer

from evserver import Client
from evserver import protocol as p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_finishes_in_flight_requests_and_exits_0(server_factory, sig):
    server = server_factory(f"{APPS}/basic.py:app")
    peers = [RawPeer(server.address) for _ in range(5)]
    for i, peer in enumerate(peers):
        peer.send(p.encode_event(1, ["sleep", 0.5 + i / 10], request=True))
    with Client(*server.address) as client:  # returns once all five handlers are running
        assert client.request("started", {"sleep": 5})["sleep"] == 5
    server.proc.send_signal(sig)
    for i, peer in enumerate(peers):
        reply = peer.recv_frames(1)[0]
        assert (reply.kind, reply.body) == (p.REPLY, 0.5 + i / 10)
        assert peer.read_until_eof() == b""
    assert server.proc.wait(10) == 0
    assert "stopped" in server.log()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.address, timeout=2)
