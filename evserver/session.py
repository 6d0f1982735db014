"""The client side of the wire protocol, sans-I/O: everything the two clients share.

A ``ClientSession`` outlives the connections it runs over. It builds the frames of sends,
requests and pings and numbers the answerable ones, keeps each one's encoded bytes until the
server answers it (so they can be re-sent, same event ids, after a reconnect), decodes what
the server sends, runs the shared-key handshake and counts reconnection failures against the
retry budget. It never touches a socket or an event loop:
``Client`` drives it with blocking sockets, ``AsyncClient`` with an asyncio protocol, so both
follow one set of delivery and reconnection rules by construction.
"""

from __future__ import annotations

import itertools
import random
import ssl as _ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from . import auth as _auth
from . import protocol as p
from . import tracing
from .errors import (
    ClientConnectionError,
    FrameTooLarge,
    ProtocolError,
    RemoteError,
    UnsupportedVersion,
)
from .event import new_event_id, type_problem

__all__ = ["BATCH_BYTES", "BatchSend", "ClientBase", "ClientSession", "ConnectionLost",
           "EventTuple", "Meta", "remote_error"]

BATCH_BYTES = 256 * 1024  # a BATCH stays well under the server's frame limit
# Connection-level errors caused by what this client sent: reconnecting would not help.
OWN_FAULT = frozenset({ProtocolError.code, FrameTooLarge.code, UnsupportedVersion.code,
                       _auth.AuthError.code})
# Replies come from a server we chose to trust, but a runaway one must not eat all memory.
MAX_REPLY_BYTES = 64 << 20

#: An event's ``meta`` as callers give it: headers for the handlers, or None.
Meta = Mapping[str, Any] | None
EventTuple = tuple[str, Any] | tuple[str, Any, Meta]

#: Adds the active span's trace context to an event's meta when OpenTelemetry is installed;
#: None (one check per event) when it is not.
meta_hook = tracing.client_meta_hook()


class ConnectionLost(Exception):
    """The connection broke (EOF, reset, failed write, server-side connection error)."""


def remote_error(frame: p.Frame) -> RemoteError:
    """The ``RemoteError`` an ERROR frame stands for."""
    code, type_, message = frame.body
    return RemoteError(type_, message, code)


def wire_event(type: str, data: Any, meta: Meta, id: str | None) -> list[Any]:
    """The wire event with a client-assigned id and time, so a re-send is recognisable."""
    if (problem := type_problem(type)) is not None:  # the server's rule, checked here
        raise ValueError(f"event type {problem}")
    headers = dict(meta) if meta else None
    if meta_hook is not None:
        headers = meta_hook(headers)
    return p.event_wire(type, data, id or new_event_id(), time.time(), headers)


def packed_batches(
    events: Iterable[EventTuple], batch_size: int, limit: int
) -> Iterator[list[bytes]]:
    """Encoded events grouped into batches of at most ``batch_size`` events and about
    ``limit`` bytes (a single larger event still gets its own batch)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    batch: list[bytes] = []
    size = 0
    for item in events:
        packed = p.pack_event(wire_event(item[0], item[1], item[2] if len(item) > 2 else None,
                                         None))
        if batch and (len(batch) >= batch_size or size + len(packed) > limit):
            yield batch
            batch, size = [], 0
        batch.append(packed)
        size += len(packed)
    if batch:
        yield batch


#: What a ``BatchSend`` asks its driver to do next: write ``(wire, corr)``, or (None) wait
#: until at least one batch in flight is answered and report it with ``answered``.
BatchStep = tuple[bytes, int] | None


class BatchSend:
    """One ``send_many`` call, sans-I/O: which BATCH frames to write, when to wait for
    answers so that at most ``window`` batches are in flight (acked sends only), and which
    failure to raise once every batch is settled. Both clients drive it, each with its own
    I/O, so the batching, the window and the error report are one set of rules.

    Iterating yields ``BatchStep``s. An answerable batch counts as in flight from the
    moment it is yielded, so a driver interrupted while writing it forgets it too.
    """

    def __init__(self, session: ClientSession, events: Iterable[EventTuple], *,
                 batch_size: int, ack: bool, window: int) -> None:
        self._session = session
        self._batches = packed_batches(events, batch_size, session.batch_limit())
        self._ack = ack
        self._window = window
        #: The corrs of the batches written and not yet answered.
        self.inflight: set[int] = set()
        self._failed: list[RemoteError] = []
        self._sent = self._count = 0

    def __iter__(self) -> Iterator[BatchStep]:
        for packed in self._batches:
            corr = self._session.next_corr() if self._ack else 0
            if corr:
                self.inflight.add(corr)
            self._sent += len(packed)
            self._count += 1
            yield p.encode_batch_packed(corr, packed), corr
            while len(self.inflight) >= self._window:
                yield None
        while self.inflight:
            yield None

    def answered(self, corr: int, frame: p.Frame | None) -> None:
        """The batch ``corr`` is settled: by ``frame``, or by None when no answer will come."""
        self.inflight.discard(corr)
        if frame is not None and frame.kind == p.ERROR:
            self._failed.append(remote_error(frame))

    def result(self) -> int:
        """The number of events sent, once all is settled; else the first failure as
        ``RemoteError``, its notes saying how many batches failed."""
        if self._failed:
            error = self._failed[0]
            error.add_note(f"{len(self._failed)} of {self._count} batches failed; "
                           "the others were processed")
            raise error
        return self._sent


class ClientSession:
    """One client's protocol state across reconnects.

    The driver calls ``connection_made`` on every new connection, feeds ``handshake_frame``
    the frames read while ``handshaking`` (writing back what it returns), then writes
    ``unanswered()`` and feeds every later read to ``receive_data``. Broken connections go
    to ``lose`` or ``connect_failed``; both raise ``ClientConnectionError`` once more than
    ``retries`` consecutive attempts failed without the server answering anything, and
    ``reconnect_delay`` says how long to back off before the next attempt.
    """

    def __init__(
        self,
        address: str,
        *,
        retries: int = 5,
        backoff: float = 0.1,
        backoff_max: float = 2.0,
        shared_key: str | bytes | None = None,
        key_id: str | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.address = address
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.key = _auth.as_key(shared_key) if shared_key is not None else None
        self.key_id = key_id
        #: The server's HELLO info (``server``, ``max_frame_bytes``, ...), once received.
        self.server_info: dict[str, Any] = {}
        #: Encoded answerable frames by corr, until the server answers them.
        self.pending: dict[int, bytes] = {}
        #: Consecutive connection failures without progress; reset by an answer.
        self.failures = 0
        self.lost: str | None = None  # why the last connection broke, for error messages
        self.reader = self._new_reader()
        self._corrs = itertools.count(1)
        self._snonce: bytes | None = None
        self._cnonce: bytes | None = None
        self.handshaking = False

    @staticmethod
    def _new_reader() -> p.FrameReader:
        return p.FrameReader(p.CLIENT_RECEIVES, max_frame_bytes=MAX_REPLY_BYTES)

    # ------------------------------------------------------------------ frames

    def next_corr(self) -> int:
        return next(self._corrs)

    def event_frame(self, type: str, data: Any, meta: Meta, id: str | None = None, *,
                    ack: bool = False, request: bool = False) -> tuple[str, bytes, int]:
        """One ``send`` (EVENT) or ``request`` (REQUEST) as ``(event id, frame, corr)``: corr
        numbers the answer to wait for when one is wanted (``ack`` or ``request``), else it
        is 0. The client only writes the frame and waits if corr says so."""
        event = wire_event(type, data, meta, id)
        corr = self.next_corr() if ack or request else 0
        return event[2], p.encode_event(corr, event, request=request), corr

    def ping_frame(self) -> tuple[bytes, int]:
        """A PING and the corr of its PONG, the answer ``ping`` and ``flush`` wait for."""
        corr = self.next_corr()
        return p.encode_ping(corr), corr

    def max_frame_bytes(self) -> int:
        return int(self.server_info.get("max_frame_bytes", p.DEFAULT_MAX_FRAME_BYTES))

    def batch_limit(self) -> int:
        """Bytes of events per BATCH: well under the server's frame limit."""
        return min(BATCH_BYTES, self.max_frame_bytes() // 2)

    def check_size(self, wire: bytes) -> None:
        """``FrameTooLarge`` (nothing is sent) when the server would refuse the frame."""
        if len(wire) > self.max_frame_bytes():
            raise FrameTooLarge(f"frame of {len(wire)} bytes exceeds the server's "
                                f"max_frame_bytes={self.max_frame_bytes()}")

    def keep(self, corr: int, wire: bytes) -> None:
        """Hold an answerable frame's bytes until it is answered, for re-sending."""
        self.pending[corr] = wire

    def forget(self, corrs: Iterable[int]) -> None:
        """Drop frames whose caller is gone; late answers to them are ignored."""
        for corr in corrs:
            self.pending.pop(corr, None)

    def unanswered(self) -> bytes:
        """What a new connection must send first: every frame still owed an answer."""
        return b"".join(self.pending.values())

    def receive_data(self, data: bytes | bytearray | memoryview,
                     answered: Callable[[int, p.Frame], None]) -> None:
        """Decode a read; call ``answered(corr, frame)`` for each answer to a pending frame.

        Raises ``ConnectionLost`` for a connection-level error the client should recover from
        by reconnecting (or for undecodable bytes), ``RemoteError`` for one it caused itself.
        Answers decoded before the error have been delivered.
        """
        self.reader.receive_data(data)
        pending = self.pending
        try:
            for frame in self.reader:
                corr = frame.corr
                if corr and pending.pop(corr, None) is not None:
                    self.failures = 0  # progress: the connection works
                    answered(corr, frame)
                elif frame.kind == p.HELLO:
                    self.server_info = frame.body
                elif frame.kind == p.ERROR and not corr:
                    code, type_, message = frame.body
                    if code in OWN_FAULT:
                        raise RemoteError(type_, message, code)
                    raise ConnectionLost(f"{code}: {message}")
                # else: the answer to an abandoned frame
        except ProtocolError as exc:
            raise ConnectionLost(f"bad frame from the server: {exc}") from None

    # ------------------------------------------------------------------ connections

    def connection_made(self) -> None:
        """A new connection (TLS done, if any): fresh decoder, handshake pending if keyed."""
        self.reader = self._new_reader()
        self._snonce = self._cnonce = None
        self.handshaking = self.key is not None

    def handshake_frame(self, frame: p.Frame) -> bytes | None:
        """Feed a frame read during the shared-key handshake; return the bytes to send back,
        if any. ``handshaking`` turns False once the server has proven the key.

        ``AuthError`` when either side fails to prove the key (retrying cannot help),
        ``ConnectionLost`` when the server refused for another reason.
        """
        assert self.key is not None
        if frame.kind != p.HELLO:
            self._refused(frame)
        if self._cnonce is None:
            self.server_info = frame.body
            snonce = frame.body.get("nonce")
            if frame.body.get("auth") != _auth.AUTH_SCHEME or not isinstance(snonce, bytes):
                # Sending events anyway would let an impostor without the key collect them.
                raise _auth.AuthError(f"{self.address} does not offer shared-key authentication")
            info, self._cnonce = _auth.client_hello(self.key, self.key_id, snonce)
            self._snonce = snonce
            return p.encode_hello(info)
        assert self._snonce is not None
        _auth.verify_server(self.key, self._snonce, self._cnonce, frame.body)
        self.handshaking = False
        return None

    def _refused(self, frame: p.Frame) -> None:
        """An ERROR instead of the handshake's HELLO: the server refused us."""
        if frame.kind == p.ERROR:
            code, _, message = frame.body
            if code == _auth.AuthError.code:
                raise _auth.AuthError(f"{self.address}: {message}")
            raise ConnectionLost(f"{code}: {message}")
        raise ConnectionLost(f"unexpected {p.KIND_NAMES.get(frame.kind)} during the handshake")

    def connected(self) -> None:
        """The connection is ready and the unanswered frames were written."""
        self.lost = None

    def reconnect_delay(self) -> float:
        """Seconds to wait before the next attempt: exponential after failures, jittered."""
        if not self.failures:
            return 0.0
        delay = min(self.backoff_max, self.backoff * 2 ** (self.failures - 1))
        return delay * (0.5 + random.random() / 2)

    def connect_failed(self, reason: str) -> None:
        """An attempt to connect failed; raises ``ClientConnectionError`` when out of retries."""
        after = f" (after the connection was lost: {self.lost})" if self.lost else ""
        self._fail(f"cannot connect to {self.address}: {reason}{after}")

    def lose(self, reason: str) -> None:
        """A connection broke; raises ``ClientConnectionError`` when out of retries."""
        self.lost = reason
        self._fail(f"connection to {self.address} lost: {reason}")

    def _fail(self, message: str) -> None:
        self.failures += 1
        if self.failures > self.retries:
            self.lost = None
            raise ClientConnectionError(message)


class ClientBase:
    """The configuration both clients share: their constructor, address and server info.

    The arguments are documented on ``Client``; each client adds its own I/O state in
    ``_init_io``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7878,
        timeout: float = 10.0,
        *,
        retries: int = 5,
        backoff: float = 0.1,
        backoff_max: float = 2.0,
        window: int = 16,
        shared_key: str | bytes | None = None,
        key_id: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        tls: bool = False,
        cafile: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        server_hostname: str | None = None,
    ) -> None:
        if window < 1 or retries < 0:
            raise ValueError("window must be >= 1 and retries >= 0")
        self._session = ClientSession(f"{host}:{port}", retries=retries, backoff=backoff,
                                      backoff_max=backoff_max, shared_key=shared_key,
                                      key_id=key_id)
        if ssl is None and (tls or cafile or certfile):
            from .tls import client_context

            ssl = client_context(cafile, certfile, keyfile)
        self.ssl = ssl
        self.server_hostname = server_hostname or host
        self.host = host
        self.port = port
        self.timeout = timeout
        self.window = window
        self._init_io()

    def _init_io(self) -> None:
        """Set up the client's connection state (nothing connects yet)."""
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def server_info(self) -> dict[str, Any]:
        """The server's HELLO info (``server``, ``max_frame_bytes``, ...), once received."""
        return self._session.server_info
