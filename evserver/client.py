"""The blocking Python SDK: one TCP connection, pipelined where it pays, reconnecting.

Built on the stdlib ``socket`` module, so it needs no event loop; in a monkey-patched
process the same code runs green. A ``Client`` is **not thread-safe**, like a socket: use
one per thread (or per green thread).

Delivery (see README "Delivery guarantees"):

- ``send(ack=True)``, ``send_many(ack=True)`` and ``request`` are *at least once*: each
  frame's encoded bytes are kept by correlation id until the server answers, and re-sent
  (same event ids) after a reconnect. Handlers that must not act twice dedupe on ``event.id``.
- Fire-and-forget ``send``/``send_many`` are *at most once*: events still in the kernel's
  buffers when a connection dies are lost.

Errors: ``RemoteError`` (the server reported a failure), ``ClientConnectionError`` (no
server after ``retries`` reconnection attempts), ``TimeoutError`` (connected, but no answer
within ``timeout``; that call's frames are then abandoned, not re-sent), ``FrameTooLarge``
(a ``ValueError``: the frame exceeds the server's ``max_frame_bytes``; nothing was sent).
"""

from __future__ import annotations

import itertools
import random
import socket
import ssl as _ssl
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

from . import auth as _auth
from . import protocol as p
from .errors import (
    ClientConnectionError,
    FrameTooLarge,
    ProtocolError,
    RemoteError,
    UnsupportedVersion,
)
from .event import new_event_id, type_problem

__all__ = ["Client"]

_READ_SIZE = 1 << 16
_BATCH_BYTES = 256 * 1024  # a BATCH stays well under the server's frame limit
# Connection-level errors caused by what this client sent: reconnecting would not help.
_OWN_FAULT = frozenset({ProtocolError.code, FrameTooLarge.code, UnsupportedVersion.code,
                        _auth.AuthError.code})
# Replies come from a server we chose to trust, but a runaway one must not eat all memory.
_MAX_REPLY_BYTES = 64 << 20

EventTuple = tuple[str, Any] | tuple[str, Any, Mapping[str, Any] | None]


class _Lost(Exception):
    """The connection broke (EOF, reset, failed write, server-side connection error)."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _remote(frame: p.Frame) -> RemoteError:
    code, type_, message = frame.body
    return RemoteError(type_, message, code)


class Client:
    """A blocking evserver client over one TCP connection, opened on first use.

    ``timeout`` bounds every wait for the server (a connect attempt, a write, an answer).
    After a broken connection it reconnects up to ``retries`` times per call, sleeping
    ``backoff * 2**n`` seconds (capped at ``backoff_max``, jittered) between attempts, then
    re-sends every unanswered frame. ``window`` is how many batches ``send_many(ack=True)``
    keeps in flight.

    Security: with ``shared_key`` every connection runs the mutual handshake of
    docs/protocol.md ("Authentication") before anything is sent: the client proves it knows
    the key (named by ``key_id``, or any the server holds) and refuses a server that cannot
    prove the same; ``AuthError`` (a ``PermissionError``) when either side fails. TLS comes
    from ``ssl`` (an ``SSLContext``) or ``tls=True`` with ``cafile`` (else the system's
    trust store) and, for servers that require one, ``certfile``/``keyfile``;
    ``server_hostname`` defaults to ``host``.

    >>> with Client("127.0.0.1", 7878) as client:
    ...     client.request("order.created", {"id": 1})
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
        self._key = _auth.as_key(shared_key) if shared_key is not None else None
        self.key_id = key_id
        if ssl is None and (tls or cafile or certfile):
            from .tls import client_context

            ssl = client_context(cafile, certfile, keyfile)
        self.ssl = ssl
        self.server_hostname = server_hostname or host
        self.host = host
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.window = window
        #: The server's HELLO info (``server``, ``max_frame_bytes``, ...), once received.
        self.server_info: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._reader = p.FrameReader(p.CLIENT_RECEIVES, max_frame_bytes=_MAX_REPLY_BYTES)
        self._buf = bytearray(_READ_SIZE)
        self._view = memoryview(self._buf)
        self._corrs = itertools.count(1)
        self._pending: dict[int, bytes] = {}  # corr -> encoded frame, until answered
        self._answers: dict[int, p.Frame] = {}  # answered, not yet collected by its caller
        self._failures = 0  # consecutive connection failures without progress
        self._lost: str | None = None  # why the last connection broke, for error messages

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ public API

    def connect(self) -> None:
        """Connect now instead of on first use; ``ClientConnectionError`` if it cannot."""
        if self._sock is None:
            self._failures = 0
            self._connect()

    def send(
        self,
        type: str,
        data: Any = None,
        *,
        meta: Mapping[str, Any] | None = None,
        ack: bool = False,
        id: str | None = None,
    ) -> str:
        """Send one event and return its id.

        Without ``ack`` the event is written and forgotten (at most once). With ``ack=True``
        this returns once the processor and listeners ran, and raises ``RemoteError`` if one
        of them failed.
        """
        event = self._event(type, data, meta, id)
        if ack:
            self._roundtrip(lambda corr: p.encode_event(corr, event))
        else:
            self._send(p.encode_event(0, event))
        return event[2]

    def request(
        self,
        type: str,
        data: Any = None,
        *,
        meta: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Return the processor's return value for this event; ``RemoteError`` on failure."""
        event = self._event(type, data, meta, None)
        frame = self._roundtrip(lambda corr: p.encode_event(corr, event, request=True), timeout)
        return frame.body

    def send_many(
        self, events: Iterable[EventTuple], *, ack: bool = False, batch_size: int = 500
    ) -> int:
        """Send ``(type, data)`` or ``(type, data, meta)`` tuples in BATCH frames.

        Frames hold up to ``batch_size`` events and stay well under the frame size limit.
        With ``ack=True`` up to ``window`` batches are in flight; once every batch is
        settled, the first failure (if any) is raised as ``RemoteError`` (its notes say how
        many batches failed; the others were processed). Returns the number of events sent.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        limit = min(_BATCH_BYTES, self._max_frame_bytes() // 2)
        inflight: set[int] = set()
        failed: list[RemoteError] = []
        sent = batches = 0
        try:
            for packed in self._packed_batches(events, batch_size, limit):
                corr = next(self._corrs) if ack else 0
                self._send(p.encode_batch_packed(corr, packed), corr)
                sent += len(packed)
                batches += 1
                if ack:
                    inflight.add(corr)
                while len(inflight) >= self.window:
                    self._settle(inflight, failed)
            while inflight:
                self._settle(inflight, failed)
        finally:
            self._forget(inflight)
        if failed:
            error = failed[0]
            error.add_note(f"{len(failed)} of {batches} batches failed; the others were processed")
            raise error
        return sent

    def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        start = time.perf_counter()
        self._roundtrip(p.encode_ping)
        return time.perf_counter() - start

    def flush(self) -> None:
        """Return once the server has read everything sent so far and answered all it owes.

        Calls that want answers already wait for them, so this is a barrier (one PING) for
        fire-and-forget events: they reached the server, though handlers may still be running.
        """
        if self._sock is not None:
            self._roundtrip(p.encode_ping)

    def close(self) -> None:
        """Close the connection; unanswered frames are dropped. A later call reconnects."""
        self._disconnect()
        self._pending.clear()
        self._answers.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "not connected"
        return f"<evserver.Client {self.address} {state}>"

    # ------------------------------------------------------------------ frames

    @staticmethod
    def _event(
        type: str, data: Any, meta: Mapping[str, Any] | None, id: str | None
    ) -> list[Any]:
        """The wire event with a client-assigned id and time, so a re-send is recognisable."""
        if (problem := type_problem(type)) is not None:  # the server's rule, checked here
            raise ValueError(f"event type {problem}")
        return p.event_wire(type, data, id or new_event_id(), time.time(),
                            dict(meta) if meta else None)

    def _packed_batches(
        self, events: Iterable[EventTuple], batch_size: int, limit: int
    ) -> Iterator[list[bytes]]:
        batch: list[bytes] = []
        size = 0
        for item in events:
            packed = p.pack_event(self._event(item[0], item[1], item[2] if len(item) > 2 else None,
                                              None))
            if batch and (len(batch) >= batch_size or size + len(packed) > limit):
                yield batch
                batch, size = [], 0
            batch.append(packed)
            size += len(packed)
        if batch:
            yield batch

    def _max_frame_bytes(self) -> int:
        return int(self.server_info.get("max_frame_bytes", p.DEFAULT_MAX_FRAME_BYTES))

    def _roundtrip(self, encode: Callable[[int], bytes], timeout: float | None = None) -> p.Frame:
        """Send one frame that gets an answer and wait for it; ERROR -> ``RemoteError``."""
        corr = next(self._corrs)
        try:
            self._send(encode(corr), corr)
            ((_, frame),) = self._answered({corr}, self.timeout if timeout is None else timeout)
        finally:
            self._forget((corr,))
        if frame.kind == p.ERROR:
            raise _remote(frame)
        return frame

    def _settle(self, inflight: set[int], failed: list[RemoteError]) -> None:
        for corr, frame in self._answered(inflight, self.timeout):
            inflight.discard(corr)
            if frame.kind == p.ERROR:
                failed.append(_remote(frame))

    def _forget(self, corrs: Iterable[int]) -> None:
        """Drop frames whose caller is gone (done, failed or interrupted); late answers to
        them are ignored."""
        for corr in corrs:
            self._pending.pop(corr, None)
            self._answers.pop(corr, None)

    # ------------------------------------------------------------------ I/O

    def _send(self, wire: bytes, corr: int = 0) -> None:
        """Write one frame, reconnecting as needed; with ``corr`` keep it until answered."""
        if len(wire) > self._max_frame_bytes():
            raise FrameTooLarge(f"frame of {len(wire)} bytes exceeds the server's "
                                f"max_frame_bytes={self._max_frame_bytes()}")
        self._failures = 0  # each new frame gets the full reconnection budget
        while True:
            try:
                if self._sock is None:
                    self._connect()
                self._read(0)  # learn of a close (idle timeout, restart) before writing
                self._write(wire)
                break
            except _Lost as lost:
                self._lose(str(lost))
        if corr:
            self._pending[corr] = wire

    def _answered(self, corrs: Collection[int], timeout: float) -> list[tuple[int, p.Frame]]:
        """Read until at least one of ``corrs`` is answered; return the answered ones."""
        deadline = time.monotonic() + timeout
        while True:
            done = [(c, self._answers.pop(c)) for c in corrs if c in self._answers]
            if done:
                return done
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer from {self.address} within {timeout:g}s")
            try:
                if self._sock is None:
                    self._connect()  # re-sends everything pending: a fresh wait
                    deadline = time.monotonic() + timeout
                self._read(remaining)
            except _Lost as lost:
                self._lose(str(lost))

    def _write(self, wire: bytes) -> None:
        sock = self._sock
        assert sock is not None
        try:
            sock.settimeout(self.timeout)
            sock.sendall(wire)
        except OSError as exc:  # includes a write timeout: the stream may hold half a frame
            raise _Lost(f"write failed: {_reason(exc)}") from None
        except BaseException:  # e.g. KeyboardInterrupt mid-frame: the stream is corrupt
            self._disconnect()
            raise

    def _read(self, wait: float) -> None:
        """Handle the frames of one ``recv`` that waits up to ``wait`` seconds (0: only take
        what already arrived). Returns quietly when nothing came."""
        sock = self._sock
        assert sock is not None
        try:
            sock.settimeout(wait)
            n = sock.recv_into(self._buf)
        except (TimeoutError, BlockingIOError, _ssl.SSLWantReadError, _ssl.SSLWantWriteError):
            return  # (non-blocking TLS reports "nothing yet" as SSLWantRead)
        except OSError as exc:
            raise _Lost(_reason(exc)) from None
        if not n:
            raise _Lost("the server closed the connection")
        self._reader.receive_data(self._view[:n])
        try:
            for frame in self._reader:
                self._handle(frame)
        except ProtocolError as exc:
            raise _Lost(f"bad frame from the server: {exc}") from None

    def _handle(self, frame: p.Frame) -> None:
        corr = frame.corr
        if corr and self._pending.pop(corr, None) is not None:
            self._answers[corr] = frame
            self._failures = 0  # progress: the connection works
        elif frame.kind == p.HELLO:
            self.server_info = frame.body
        elif frame.kind == p.ERROR and not corr:
            code, type_, message = frame.body
            if code in _OWN_FAULT:
                self._disconnect()
                raise RemoteError(type_, message, code)
            raise _Lost(f"{code}: {message}")
        # else: the answer to an abandoned frame

    # ------------------------------------------------------------------ connection

    def _connect(self) -> None:
        """Open a connection (with backoff between attempts) and re-send unanswered frames."""
        while True:
            if self._failures:
                delay = min(self.backoff_max, self.backoff * 2 ** (self._failures - 1))
                time.sleep(delay * (0.5 + random.random() / 2))
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except OSError as exc:
                after = f" (after the connection was lost: {self._lost})" if self._lost else ""
                self._fail(f"cannot connect to {self.address}: {_reason(exc)}{after}")
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._reader = p.FrameReader(p.CLIENT_RECEIVES, max_frame_bytes=_MAX_REPLY_BYTES)
            try:
                sock = self._secure(sock)
            except (_auth.AuthError, _ssl.SSLCertVerificationError) as exc:
                sock.close()  # a wrong key or an untrusted server: retrying cannot help
                if isinstance(exc, _auth.AuthError):
                    raise
                raise ClientConnectionError(f"cannot connect to {self.address}: {exc}") from None
            except (_Lost, OSError) as exc:  # incl. ssl.SSLError, e.g. an untrusted server
                sock.close()
                self._fail(f"cannot connect to {self.address}: "
                           f"{_reason(exc) if isinstance(exc, OSError) else exc}")
                continue
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            if not self._pending:
                break
            try:
                self._write(b"".join(self._pending.values()))
                break
            except _Lost as lost:
                self._lose(str(lost))
        self._lost = None

    def _secure(self, sock: socket.socket) -> socket.socket:
        """TLS, then the shared-key handshake, on a fresh connection; bounded by ``timeout``."""
        if self.ssl is not None:
            sock = self.ssl.wrap_socket(sock, server_hostname=self.server_hostname)
        if self._key is None:
            return sock
        deadline = time.monotonic() + self.timeout
        hello = self._next_frame(sock, deadline)
        if hello.kind != p.HELLO:
            self._raise_frame(hello)
        self.server_info = hello.body
        snonce = hello.body.get("nonce")
        if hello.body.get("auth") != _auth.AUTH_SCHEME or not isinstance(snonce, bytes):
            # Sending events anyway would let an impostor without the key collect them.
            raise _auth.AuthError(f"{self.address} does not offer shared-key authentication")
        info, cnonce = _auth.client_hello(self._key, self.key_id, snonce)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(p.encode_hello(info))
        reply = self._next_frame(sock, deadline)
        if reply.kind != p.HELLO:
            self._raise_frame(reply)
        _auth.verify_server(self._key, snonce, cnonce, reply.body)
        return sock

    def _next_frame(self, sock: socket.socket, deadline: float) -> p.Frame:
        while (frame := self._reader.next_frame()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Lost(f"no handshake from {self.address} within {self.timeout:g}s")
            sock.settimeout(remaining)
            try:
                n = sock.recv_into(self._buf)
            except TimeoutError:
                continue
            if not n:
                raise _Lost("the server closed the connection during the handshake")
            self._reader.receive_data(self._view[:n])
        return frame

    def _raise_frame(self, frame: p.Frame) -> None:
        """An ERROR instead of the handshake's HELLO: the server refused us."""
        if frame.kind == p.ERROR:
            code, _, message = frame.body
            if code == _auth.AuthError.code:
                raise _auth.AuthError(f"{self.address}: {message}")
            raise _Lost(f"{code}: {message}")
        raise _Lost(f"unexpected {p.KIND_NAMES.get(frame.kind)} during the handshake")

    def _lose(self, reason: str) -> None:
        """The connection broke: close it and count the failure (a reconnect follows)."""
        self._disconnect()
        self._lost = reason
        self._fail(f"connection to {self.address} lost: {reason}")

    def _fail(self, message: str) -> None:
        self._failures += 1
        if self._failures > self.retries:
            self._lost = None
            raise ClientConnectionError(message)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
