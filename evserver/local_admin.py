"""The admin backend of a single-process server: it runs on the server's own hub.

``LocalBackend`` reads the ``Server`` directly and ``serve_green`` serves the admin app
with eventlet.wsgi on its own listener. The master of ``--workers N`` has no hub and uses
``admin.ThreadedAdmin`` over ``master_admin.MasterAdmin`` instead, which is why this lives
apart from ``admin``: importing ``admin`` must not bring eventlet into the master.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ._eventlet import eventlet, wrap_server_socket, wsgi_server
from .admin import TAIL_FLUSH, AdminApp, AdminError, TailStream, Taps, describe_handlers
from .metrics import aggregate, snapshot
from .server import Server

log = logging.getLogger("evserver.admin")


class LocalBackend:
    """Single-process mode: the admin app runs on the server's hub and reads it directly."""

    mode = "single"

    def __init__(self, server: Server, defaults: dict[str, Any] | None = None) -> None:
        self.server = server
        self.defaults = defaults or {}
        self.taps = Taps(server.dispatcher)

    def stats(self) -> dict[str, Any]:
        return aggregate([snapshot(self.server)], mode=self.mode,
                         uptime=time.time() - self.server.started_at)

    def ready(self) -> tuple[bool, str]:
        if self.server.stopping:
            return False, "stopping"
        return True, f"listening on {self.server.address[0]}:{self.server.address[1]}"

    def handlers(self) -> list[dict[str, Any]]:
        return describe_handlers(self.server.app, self.defaults)

    def reload(self) -> dict[str, Any]:
        raise AdminError(409, "reload needs the multi-worker mode (serve --workers N); "
                              "restart a single-process server instead")

    def scale(self, n: int) -> dict[str, Any]:
        raise AdminError(409, "scaling needs the multi-worker mode (serve --workers N)")

    def stop(self, now: bool) -> dict[str, Any]:
        if now:
            self.server.drain_timeout = 0.0  # abandon in-flight work, as SIGQUIT would
        log.info("admin: %s stop requested", "immediate" if now else "graceful")
        eventlet.spawn_n(self.server.stop)  # after this response is written
        return {"stopping": "quick" if now else "graceful", "pid": os.getpid()}

    def tail(self, pattern: str, rate: int) -> TailStream:
        return _LocalTail(self.taps, pattern, rate)


class _LocalTail:
    def __init__(self, taps: Taps, pattern: str, rate: int) -> None:
        self.taps = taps
        self.key = object()
        self.tap = taps.open(self.key, pattern, rate)

    def next_batch(self) -> list[dict[str, Any]]:
        eventlet.sleep(TAIL_FLUSH)  # a batching cadence: the tap never wakes anyone
        return self.tap.drain()

    def close(self) -> None:
        self.taps.close(self.key)


def serve_green(app: AdminApp, host: str, port: int,
                ssl_context: Any = None) -> tuple[Any, tuple[str, int]]:
    """Serve ``app`` on the calling thread's hub; returns (green thread, bound address).

    No tracebacks to clients, no keep-alive, a socket timeout, so idle
    admin clients cannot pin green threads, and ``kill()`` (not closing the socket) stops it.
    """
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = eventlet.listen((host, port), family=family, reuse_port=False)
    if ssl_context is not None:  # handshakes per request, in its green thread
        sock = wrap_server_socket(ssl_context, sock)
    gt = wsgi_server(sock, app, log=log, log_output=False, debug=False, keepalive=False,
                     socket_timeout=5, max_size=64)
    return gt, sock.getsockname()[:2]
