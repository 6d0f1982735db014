"""The Fluentd Forward Protocol listener: one more listener for ``Server``.

It binds TCP (and UDP on the same port, for Fluentd's heartbeats) and accepts through the
one connection driver (``accept.accept_loop``) with a ``forward_session.ForwardProtocol``
per connection, which is where requests become units of work and acks are kept in order.

Each worker binds its own SO_REUSEPORT socket (TCP, and UDP for heartbeats) when the server
does, so the kernel spreads Forward connections over the workers like native ones.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

from ._eventlet import eventlet, wrap_server_socket
from .accept import accept_loop
from .connection import JOB_EVENTS, Host
from .errors import ConfigError
from .forward import ForwardConnection as ForwardDecoder
from .forward import ForwardHandshake
from .forward_session import ForwardProtocol
from .metrics import new_counters
from .reuseport import allow_migration

log = logging.getLogger("evserver.forward")

_HEARTBEAT = b"\x00"


class ForwardListener:
    """The TCP listener, its accept loop and the UDP heartbeat echo, owned by a ``Server``."""

    def __init__(self, server: Host, settings: Any) -> None:
        """``settings`` is the config's ``[forward]`` table, taken whole."""
        self.server = server
        self.settings = settings
        self.hostname = socket.gethostname()  # sent in PONG
        self._listener: Any = None
        self._udp: Any = None
        self._threads: list[Any] = []
        server.counters.update(new_counters("forward"))

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]

    def start(self) -> None:
        """Bind TCP, then UDP on the same port; an OSError names the Forward address."""
        host, port = self.settings.host, self.settings.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        reuse_port = self.server.reuse_port
        try:
            self._listener = eventlet.listen((host, port), family=family,
                                             backlog=self.server.backlog, reuse_port=reuse_port)
            if reuse_port:
                allow_migration(self._listener)
            udp = socket.socket(family, socket.SOCK_DGRAM)
            if reuse_port:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            udp.bind(self.address)
        except OSError as exc:
            if self._listener is not None:
                self._listener.close()
            raise OSError(exc.errno, f"Forward {host}:{port}: {exc.strerror or exc}") from exc
        if self.settings.tls:
            if self.server.ssl_context is None:
                raise ConfigError("forward.tls: the server has no TLS certificate")
            self._listener = wrap_server_socket(self.server.ssl_context, self._listener)
        self._udp = eventlet.greenio.GreenSocket(udp)
        self._threads = [
            eventlet.spawn(accept_loop, self.server, self._listener, self._protocol,
                           ForwardProtocol.refusal),
            eventlet.spawn(self._heartbeats),
        ]
        auth = "shared key" + (" and users" if self.settings.users else "")
        log.info("Forward protocol listening on %s:%d (TCP%s, UDP heartbeat; %s)", *self.address,
                 " with TLS" if self.settings.tls else "",
                 auth if self.settings.shared_key else "no handshake")

    def decoder(self) -> ForwardDecoder:
        """A fresh sans-I/O decoder for one connection (HELO queued when a key is set)."""
        s = self.settings
        handshake = None
        if s.shared_key:
            handshake = ForwardHandshake(s.shared_key, hostname=self.hostname, users=s.users)
        return ForwardDecoder(max_request_bytes=s.max_request_bytes,
                              max_decompressed_bytes=s.max_decompressed_bytes,
                              handshake=handshake)

    def _protocol(self, peer: str) -> ForwardProtocol:
        return ForwardProtocol(self.decoder(), counters=self.server.counters,
                               job_events=JOB_EVENTS, peer=peer)

    def close(self) -> None:
        """Stop accepting and answering heartbeats; open connections drain with the server's."""
        for gt in self._threads:
            gt.kill()
        self._threads = []
        for sock in (self._listener, self._udp):
            if sock is not None:
                sock.close()

    def _heartbeats(self) -> None:
        """Echo 0x00 to a 0x00 datagram: Fluentd's ``heartbeat_type udp`` liveness probe."""
        udp = self._udp
        counters = self.server.counters
        while True:
            try:
                data, addr = udp.recvfrom(64)
                if data == _HEARTBEAT:
                    counters["forward_heartbeats"] += 1
                    udp.sendto(_HEARTBEAT, addr)
            except OSError as exc:  # e.g. ICMP unreachable from an earlier reply: keep going
                if self.server.stopping or exc.errno == errno.EBADF:
                    return
                log.debug("Forward heartbeat: %s", exc)


__all__ = ["ForwardListener"]
