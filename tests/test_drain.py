"""What a closing listener and a graceful stop do to connections that just arrived.

A reload closes the old workers' listeners and stops their servers while clients keep
connecting. Nothing that reached a listener, or a server that accepted it, may be reset.
"""

from __future__ import annotations

import socket
import sys
import threading

import pytest
from conftest import wait_for
from rawpeer import RawPeer

from evserver import App
from evserver import protocol as p
from evserver.reuseport import allow_migration
from evserver.testing import serve_in_thread

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SO_REUSEPORT migration is Linux's")


def _listener(port: int = 0) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    return s


@linux_only
def test_closing_a_reuseport_listener_migrates_its_queue() -> None:
    first = _listener()
    port = first.getsockname()[1]
    second = _listener(port)
    if not allow_migration(second):
        first.close()
        second.close()
        pytest.skip("no CAP_BPF here and net.ipv4.tcp_migrate_req=0: nothing to migrate with")
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
    for c in clients:
        c.sendall(b"hi")
    first.close()  # whatever was queued on it must move to the second listener
    second.settimeout(5)
    accepted = [second.accept()[0] for _ in clients]  # a reset one would never arrive
    assert sorted(a.recv(2) for a in accepted) == [b"hi"] * len(clients)
    for s in (*clients, *accepted, second):
        s.close()


def test_a_request_arriving_as_a_graceful_stop_begins_is_answered() -> None:
    """The late connection was accepted (and parked) long before; its PING arrives after
    the stop closed the listener. It gets its PONG: the stop reads what peers send while
    connections are still active, instead of closing them with unread bytes (a reset)."""
    with serve_in_thread(App(), park_after=0.05) as srv:
        address = srv.address
        late = RawPeer(address, timeout=5)  # each peer has read its HELLO
        keeper = RawPeer(address, timeout=5)
        halt = threading.Event()

        def keep_active() -> None:  # a busy peer: the stop's grace lasts its full 0.5 s
            n = 0
            while not halt.is_set():
                n += 1
                try:
                    keeper.send(p.encode_ping(n))
                    keeper.recv_frames(1)
                except OSError:
                    return
                halt.wait(0.01)

        busy = threading.Thread(target=keep_active, daemon=True)
        busy.start()
        stopper = threading.Thread(target=srv.stop, daemon=True)
        stopper.start()

        def refused() -> bool:
            try:
                socket.create_connection(address, timeout=1).close()
                return False
            except ConnectionResetError:  # queued on the listener as it closed: ask again
                return False
            except ConnectionRefusedError:
                return True

        wait_for(refused, 5, "the stop to close the listener")
        late.send(p.encode_ping(7))
        (frame,) = late.recv_frames(1)
        halt.set()
        assert (frame.kind, frame.corr) == (p.PONG, 7)
        stopper.join(10)
        busy.join(5)
        for peer in (late, keeper):
            peer.close()
