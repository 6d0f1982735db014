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

import socket
import ssl as _ssl
import time
from collections.abc import Collection, Iterable
from typing import Any

from . import auth as _auth
from . import protocol as p
from .errors import ClientConnectionError, RemoteError
from .session import BatchSend, ClientBase, EventTuple, Meta, remote_error
from .session import ConnectionLost as _Lost

__all__ = ["Client", "EventTuple"]

_READ_SIZE = 1 << 16


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class Client(ClientBase):
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

    def _init_io(self) -> None:
        self._sock: socket.socket | None = None
        self._buf = bytearray(_READ_SIZE)
        self._view = memoryview(self._buf)
        self._answers: dict[int, p.Frame] = {}  # answered, not yet collected by its caller

    # ------------------------------------------------------------------ public API

    def connect(self) -> None:
        """Connect now instead of on first use; ``ClientConnectionError`` if it cannot."""
        if self._sock is None:
            self._session.failures = 0
            self._connect()

    def send(self, type: str, data: Any = None, *, meta: Meta = None, ack: bool = False,
             id: str | None = None) -> str:
        """Send one event and return its id.

        Without ``ack`` the event is written and forgotten (at most once). With ``ack=True``
        this returns once the processor and listeners ran, and raises ``RemoteError`` if one
        of them failed.
        """
        event_id, wire, corr = self._session.event_frame(type, data, meta, id, ack=ack)
        if corr:
            self._roundtrip(wire, corr)
        else:
            self._send(wire)
        return event_id

    def request(self, type: str, data: Any = None, *, meta: Meta = None,
                timeout: float | None = None) -> Any:
        """Return the processor's return value for this event; ``RemoteError`` on failure."""
        _, wire, corr = self._session.event_frame(type, data, meta, request=True)
        return self._roundtrip(wire, corr, timeout).body

    def send_many(
        self, events: Iterable[EventTuple], *, ack: bool = False, batch_size: int = 500
    ) -> int:
        """Send ``(type, data)`` or ``(type, data, meta)`` tuples in BATCH frames.

        Frames hold up to ``batch_size`` events and stay well under the frame size limit.
        With ``ack=True`` up to ``window`` batches are in flight; once every batch is
        settled, the first failure (if any) is raised as ``RemoteError`` (its notes say how
        many batches failed; the others were processed). Returns the number of events sent.
        """
        batches = BatchSend(self._session, events, batch_size=batch_size, ack=ack,
                            window=self.window)
        try:
            for step in batches:
                if step is None:
                    self._settle(batches)
                else:
                    self._send(*step)
        finally:
            self._forget(batches.inflight)
        return batches.result()

    def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        start = time.perf_counter()
        self._roundtrip(*self._session.ping_frame())
        return time.perf_counter() - start

    def flush(self) -> None:
        """Return once the server has read everything sent so far and answered all it owes.

        Calls that want answers already wait for them, so this is a barrier (one PING) for
        fire-and-forget events: they reached the server, though handlers may still be running.
        """
        if self._sock is not None:
            self._roundtrip(*self._session.ping_frame())

    def close(self) -> None:
        """Close the connection; unanswered frames are dropped. A later call reconnects."""
        self._disconnect()
        self._session.pending.clear()
        self._answers.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "not connected"
        return f"<evserver.Client {self.address} {state}>"

    # ------------------------------------------------------------------ frames

    def _roundtrip(self, wire: bytes, corr: int, timeout: float | None = None) -> p.Frame:
        """Send one frame that gets an answer, ``corr``, and wait for it; ERROR ->
        ``RemoteError``."""
        try:
            self._send(wire, corr)
            ((_, frame),) = self._answered({corr}, self.timeout if timeout is None else timeout)
        finally:
            self._forget((corr,))
        if frame.kind == p.ERROR:
            raise remote_error(frame)
        return frame

    def _settle(self, batches: BatchSend) -> None:
        for corr, frame in self._answered(batches.inflight, self.timeout):
            batches.answered(corr, frame)

    def _forget(self, corrs: Iterable[int]) -> None:
        """Drop frames whose caller is gone (done, failed or interrupted); late answers to
        them are ignored."""
        self._session.forget(corrs)
        for corr in corrs:
            self._answers.pop(corr, None)

    # ------------------------------------------------------------------ I/O

    def _send(self, wire: bytes, corr: int = 0) -> None:
        """Write one frame, reconnecting as needed; with ``corr`` keep it until answered."""
        self._session.check_size(wire)
        self._session.failures = 0  # each new frame gets the full reconnection budget
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
            self._session.keep(corr, wire)

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
        try:
            self._session.receive_data(self._view[:n], self._answers.__setitem__)
        except RemoteError:
            self._disconnect()
            raise

    # ------------------------------------------------------------------ connection

    def _connect(self) -> None:
        """Open a connection (with backoff between attempts) and re-send unanswered frames."""
        session = self._session
        while True:
            if delay := session.reconnect_delay():
                time.sleep(delay)
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except OSError as exc:
                session.connect_failed(_reason(exc))
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock = self._secure(sock)
            except (_auth.AuthError, _ssl.SSLCertVerificationError) as exc:
                sock.close()  # a wrong key or an untrusted server: retrying cannot help
                if isinstance(exc, _auth.AuthError):
                    raise
                raise ClientConnectionError(f"cannot connect to {self.address}: {exc}") from None
            except (_Lost, OSError) as exc:  # incl. ssl.SSLError, e.g. an untrusted server
                sock.close()
                session.connect_failed(_reason(exc) if isinstance(exc, OSError) else str(exc))
                continue
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            if not session.pending:
                break
            try:
                self._write(session.unanswered())
                break
            except _Lost as lost:
                self._lose(str(lost))
        session.connected()

    def _secure(self, sock: socket.socket) -> socket.socket:
        """TLS, then the shared-key handshake, on a fresh connection; bounded by ``timeout``."""
        if self.ssl is not None:
            sock = self.ssl.wrap_socket(sock, server_hostname=self.server_hostname)
        session = self._session
        session.connection_made()
        deadline = time.monotonic() + self.timeout
        while session.handshaking:
            answer = session.handshake_frame(self._next_frame(sock, deadline))
            if answer is not None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.sendall(answer)
        return sock

    def _next_frame(self, sock: socket.socket, deadline: float) -> p.Frame:
        reader = self._session.reader
        while (frame := reader.next_frame()) is None:
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
            reader.receive_data(self._view[:n])
        return frame

    def _lose(self, reason: str) -> None:
        """The connection broke: close it and count the failure (a reconnect follows)."""
        self._disconnect()
        self._session.lose(reason)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
