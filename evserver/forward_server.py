"""The eventlet adapter for the Fluentd Forward Protocol: one more listener for ``Server``.

Forward requests become ordinary ``BATCH`` frames for the same dispatcher, so processors,
listeners, handler options, dead letters, ``tail`` and the stats treat them exactly like
native events: the tag is ``event.type``, the record ``event.data``, the entry time
``event.time`` and the v1.5 entry metadata ``event.meta`` (plus ``"protocol": "forward"``).

Acks: a request with a ``chunk`` option becomes a frame with ``corr`` = the connection's
request number. ``{"ack": chunk}`` is written once its frame's processor and listeners
completed, always in request order (a later job may finish first, so finished acks wait for
earlier ones). A failed request is never acked: the connection is closed instead, which is
the only way Forward has to tell a client to retry. Unmatched tags are acked (and counted as
``unrouted``), as Fluentd does, because no retry could ever route them.

Each worker binds its own SO_REUSEPORT socket (TCP, and UDP for heartbeats) when the server
does, so the kernel spreads Forward connections over the workers like native ones.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from . import protocol as p
from ._eventlet import eventlet, wrap_server_socket
from .config import parse_users
from .connection import JOB_EVENTS, Host, StreamConnection, accept_loop, peer_name
from .dispatch import Job
from .errors import ConfigError, HandshakeFailed, ProtocolError, RoutingError
from .event import Event
from .forward import ForwardConnection as ForwardDecoder
from .forward import ForwardHandshake, ForwardRequest, ack_bytes
from .reuseport import allow_migration

log = logging.getLogger("evserver.forward")

_HEARTBEAT = b"\x00"
_COUNTERS = ("forward_connections", "forward_requests", "forward_events", "forward_skipped",
             "forward_errors", "forward_auth_failures", "forward_unacked", "forward_heartbeats")


@dataclass(frozen=True)
class ForwardSettings:
    """The ``[forward]`` table, resolved: ``users`` maps user names to passwords."""

    host: str = "127.0.0.1"
    port: int = 24224
    shared_key: str | None = None
    users: dict[str, str] | None = None
    max_request_bytes: int = 8 << 20
    max_decompressed_bytes: int = 64 << 20
    tls: bool = False  # with the server's SSLContext, the [tls] certificate
    hostname: str = field(default_factory=socket.gethostname)  # sent in PONG

    def __post_init__(self) -> None:
        if self.users and not self.shared_key:
            raise ConfigError("forward.users: a user handshake needs forward.shared_key too")

    @classmethod
    def from_config(cls, cfg: Any) -> ForwardSettings | None:
        """The settings of ``cfg.forward``, or None when the listener is not enabled."""
        f = cfg.forward
        if not f.enabled:
            return None
        return cls(f.host, f.port, f.shared_key, parse_users(f.users) if f.users else None,
                   f.max_request_bytes, f.max_decompressed_bytes, f.tls)

    def decoder(self) -> ForwardDecoder:
        """A fresh sans-I/O decoder for one connection (HELO queued when a key is set)."""
        handshake = None
        if self.shared_key:
            handshake = ForwardHandshake(self.shared_key, hostname=self.hostname,
                                         users=self.users)
        return ForwardDecoder(max_request_bytes=self.max_request_bytes,
                              max_decompressed_bytes=self.max_decompressed_bytes,
                              handshake=handshake)


class ForwardListener:
    """The TCP listener, its accept loop and the UDP heartbeat echo, owned by a ``Server``."""

    def __init__(self, server: Host, settings: ForwardSettings) -> None:
        self.server = server
        self.settings = settings
        self._listener: Any = None
        self._udp: Any = None
        self._threads: list[Any] = []
        for name in _COUNTERS:
            server.counters.setdefault(name, 0)

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
            eventlet.spawn(accept_loop, self.server, self._listener, self._connection,
                           ForwardConnection.refuse),
            eventlet.spawn(self._heartbeats),
        ]
        auth = "shared key" + (" and users" if self.settings.users else "")
        log.info("Forward protocol listening on %s:%d (TCP%s, UDP heartbeat; %s)", *self.address,
                 " with TLS" if self.settings.tls else "",
                 auth if self.settings.shared_key else "no handshake")

    def _connection(self, sock: Any, addr: Any) -> ForwardConnection:
        return ForwardConnection(self.server, sock, addr, self.settings)

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


class ForwardConnection(StreamConnection):
    """One Forward client: its decoder, and the acks owed in request order.

    ``chunks`` maps a request number to its chunk until it is acked or dropped; ``done``
    holds finished request numbers (True = processed) until every earlier one finished.
    """

    protocol = "Forward"

    __slots__ = ("chunks", "decoder", "done", "failed", "next_ack", "requests")

    def __init__(self, server: Host, sock: Any, addr: Any, settings: ForwardSettings) -> None:
        super().__init__(server, sock, addr)
        self.decoder = settings.decoder()
        self.requests = 0  # numbers handed to requests with a chunk
        self.next_ack = 1
        self.chunks: dict[int, bytes | str] = {}
        self.done: dict[int, bool] = {}
        self.failed = False

    def greet(self) -> bool:
        self.server.counters["forward_connections"] += 1
        if isinstance(self.sock, ssl.SSLSocket):
            return False  # the reader runs the TLS handshake first
        self._send_helo()
        return True

    def _send_helo(self) -> None:
        if helo := self.decoder.data_to_send():
            self.write(helo)  # HELO, when a shared key is configured

    def _start_tls(self) -> bool:
        """The TLS handshake eventlet's accept deferred, bounded by ``handshake_timeout``."""
        server = self.server
        try:
            with eventlet.Timeout(server.handshake_timeout):
                self.sock.do_handshake()
            return True
        except eventlet.Timeout:
            server.counters["handshake_timeouts"] += 1
            reason = f"no TLS handshake within {server.handshake_timeout:g}s"
        except ssl.SSLError as exc:
            server.counters["tls_failures"] += 1
            reason = f"TLS handshake failed: {exc.reason or exc}"
        log.info("Forward %s: %s", peer_name(self.addr), reason)
        return False

    def serve(self, resumed: bool) -> None:
        server = self.server
        decoder = self.decoder
        counters = server.counters
        if not resumed:
            if not self._start_tls():
                return
            self._send_helo()
        try:
            while not server.stopping:
                try:
                    data = self._recv()
                except TimeoutError:
                    if self.jobs:
                        continue  # waiting on our own handlers is not idleness
                    counters["idle_closed"] += 1
                    return
                if data is None:
                    return  # parked
                if not data:
                    if decoder.in_request and not server.stopping:
                        raise ProtocolError("connection closed in the middle of a request")
                    return
                decoder.receive_data(data)
                try:
                    # A job's worth at a time, run while it is in cache (as native reads).
                    while requests := decoder.requests(max_events=JOB_EVENTS):
                        self._submit(requests)
                finally:
                    if out := decoder.data_to_send():
                        self.write(out)  # the failing PONG, before the connection closes
                eventlet.sleep(0)  # fairness, as for native connections
        except HandshakeFailed as exc:
            counters["forward_auth_failures"] += 1
            self.server.limit_log("forward_auth", "Forward %s: handshake failed: %s; closing",
                                  peer_name(self.addr), exc)
        except ProtocolError as exc:
            counters["forward_errors"] += 1
            self.server.limit_log("forward_protocol", "Forward %s: closing connection: %s [%s]",
                                  peer_name(self.addr), exc, exc.code)

    def _submit(self, requests: list[ForwardRequest]) -> None:
        """Turn requests into BATCH frames and run them as jobs: each acked request is a
        numbered frame of its own; the others share corr-0 frames of up to a job's size."""
        if out := self.decoder.data_to_send():
            self.write(out)  # PONG goes out before any ack
        server = self.server
        frames: list[p.Frame] = []
        batch: list[Event] | None = None  # the open frame of requests nobody waits for
        events = skipped = 0
        for request in requests:
            if request.chunk is None:
                if batch is None or len(batch) >= JOB_EVENTS:
                    batch = []
                    frames.append(p.Frame(p.BATCH, 0, batch))
                batch += request.events
            else:
                self.requests += 1
                self.chunks[self.requests] = request.chunk
                frames.append(p.Frame(p.BATCH, self.requests, request.events))
                batch = None
            events += len(request.events)
            skipped += request.skipped
        counters = server.counters
        counters["forward_requests"] += sum(r.count for r in requests)
        counters["forward_events"] += events
        if skipped:
            counters["forward_skipped"] += skipped
            log.info("Forward %s: skipped %d invalid event(s)", peer_name(self.addr), skipped)
        server.dispatcher.stats.events_in += events
        self._dispatch(frames)

    def job_done(self, job: Job) -> None:
        start = 0
        for frame in job.context:
            stop = start + len(frame.body)
            if frame.corr:
                failure = job.failure(start, stop)
                self.done[frame.corr] = failure is None or failure.code == RoutingError.code
            start = stop
        acks = []
        failed_now = False
        while (ok := self.done.pop(self.next_ack, None)) is not None:
            chunk = self.chunks.pop(self.next_ack)
            self.next_ack += 1
            if ok and not self.failed:
                acks.append(ack_bytes(chunk))
            elif not self.failed:
                self.failed = failed_now = True
        if acks:
            self.write(b"".join(acks))
        if failed_now:
            self.server.counters["forward_unacked"] += 1
            log.warning("Forward %s: a request failed in its handlers; closing without its ack "
                        "so the client retries", peer_name(self.addr))
            self._abort("request failed")
        self._job_finished()


__all__ = ["ForwardConnection", "ForwardListener", "ForwardSettings"]
