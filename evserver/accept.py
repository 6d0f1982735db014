"""The one listener loop, for every protocol's port: accept, turn away what is beyond
``max_connections``, and hand each socket to a ``Connection`` with its protocol object."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from ._eventlet import eventlet
from .connection import Connection, Host, WireProtocol

log = logging.getLogger("evserver.server")


def accept_loop(host: Host, listener: Any, make: Callable[[str], WireProtocol],
                refusal: Callable[[int], bytes]) -> None:
    """The one listener loop: accept sockets on ``listener`` until the host stops, and drive
    each with the protocol object ``make(peer)`` builds; turn away those beyond
    ``max_connections`` with the protocol's ``refusal(limit)``."""
    while not host.stopping:
        try:
            sock, addr = listener.accept()
        except OSError as exc:
            if host.stopping:
                return
            # EMFILE and friends: back off instead of spinning; keep serving.
            log.warning("accept failed: %s", exc)
            eventlet.sleep(0.1)
            continue
        host.counters["connections_total"] += 1
        if len(host.connections) >= host.max_connections:
            host.counters["refused_connections"] += 1
            host.limit_log("max_connections", "refusing %s: at max_connections=%d",
                           peer_name(addr), host.max_connections)
            eventlet.spawn_n(_refuse, sock, refusal(host.max_connections))
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if host.idle_timeout:
            sock.settimeout(host.idle_timeout)
        conn = Connection(host, sock, addr, make(peer_name(addr)))
        host.connections.add(conn)
        conn.start()


def _refuse(sock: Any, data: bytes) -> None:
    """Tell a socket accepted beyond ``max_connections`` why (if the protocol can), close it."""
    try:
        if data:
            sock.settimeout(5.0)  # a TLS peer must not pin this green thread in its handshake
            sock.sendall(data)
    except OSError:
        pass
    finally:
        sock.close()


def peer_name(addr: Any) -> str:
    """``host:port`` of a peer address, for log lines."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)
