"""The asyncio SDK: ``AsyncClient`` has ``Client``'s methods and delivery rules on an event loop.

One connection per client, shared by every task that uses it. Each answerable frame gets a
correlation id and a future, so any number of concurrent ``request``s from any number of tasks
pipeline over the one connection and are matched by corr when their answers arrive, in any
order. Frames written in the same loop iteration leave in one ``write``.

The protocol state is the sans-I/O ``ClientSession`` that the blocking ``Client`` drives too,
so both follow one set of rules (see ``evserver.client`` and README "Delivery guarantees"):
acked sends, ``send_many(ack=True)`` and requests are at least once (kept until answered and
re-sent with the same event ids after a reconnect), fire-and-forget sends at most once; a
lost connection is retried ``retries`` times with jittered exponential backoff; with
``shared_key`` every connection runs the mutual handshake before anything is sent.

Built on ``asyncio.Protocol`` alone, it runs on any asyncio loop (the default one, uvloop) and
never imports eventlet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl as _ssl
import time
from collections.abc import Iterable
from typing import Any, cast

from . import auth as _auth
from . import protocol as p
from .errors import ClientConnectionError, RemoteError
from .session import (
    BatchSend,
    ClientBase,
    ConnectionLost,
    EventTuple,
    Meta,
    remote_error,
)

__all__ = ["AsyncClient"]

_FLUSH_BYTES = 1 << 16  # write at once rather than wait for the end of the loop iteration


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection's callbacks; the client does the work."""

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = loop.create_future()  # handshake done
        self.closed: asyncio.Future[None] = loop.create_future()
        self.reason: str | None = None  # why we closed it, if we did
        self._loop = loop
        self.paused = False  # the transport's buffer is over its high-water mark
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # small frames must not wait for Nagle
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client._connection_made(self)

    def data_received(self, data: bytes) -> None:
        self.client._received(self, data)

    def eof_received(self) -> bool:
        return False  # close: the server only half-closes on its way out

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.reason or (
            (exc.strerror if isinstance(exc, OSError) else None) or str(exc) if exc
            else "the server closed the connection")
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()
        if not self.ready.done():
            self.ready.set_exception(ConnectionLost(reason))
            self.ready.exception()  # the connecting task may have given up on it already
        self.client._connection_lost(self, reason)

    def abort(self, reason: str) -> None:
        """Drop the connection (and its unsent output) because of ``reason``."""
        if self.reason is None:
            self.reason = reason
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (TCP pushback)."""
        while self.paused and not self.closed.done():
            if self._drained is None:
                self._drained = self._loop.create_future()
            await self._drained


class AsyncClient(ClientBase):
    """An asyncio evserver client over one connection, opened on first use.

    Arguments and errors are ``Client``'s: ``timeout`` bounds every wait (a connect attempt
    with its TLS and shared-key handshakes, an answer); after a broken connection it
    reconnects up to ``retries`` times, backing off ``backoff * 2**n`` seconds (capped at
    ``backoff_max``, jittered), and re-sends every unanswered frame; ``window`` is how many
    batches ``send_many(ack=True)`` keeps in flight. Unlike ``Client`` it is safe to share
    between the tasks of its loop (and only its loop).

    >>> async with AsyncClient("127.0.0.1", 7878) as client:
    ...     await client.request("order.created", {"id": 1})
    """

    def _init_io(self) -> None:
        self._conn: _Connection | None = None
        self._opening: _Connection | None = None  # the connection a connect task is setting up
        self._connecting: asyncio.Task[_Connection] | None = None
        # corr -> the future its caller awaits: the answer, or None once its deadline passed.
        self._waiters: dict[int, asyncio.Future[p.Frame | None]] = {}
        self._out: list[bytes] = []  # frames written in this loop iteration, sent together
        self._out_bytes = 0
        self._epoch = 0  # bumped whenever the connection changes: waits restart their clock

    # ------------------------------------------------------------------ public API

    async def connect(self) -> None:
        """Connect now instead of on first use; ``ClientConnectionError`` if it cannot."""
        if self._conn is None:
            self._session.failures = 0
            await self._connected()

    async def send(self, type: str, data: Any = None, *, meta: Meta = None, ack: bool = False,
                   id: str | None = None) -> str:
        """Send one event and return its id; with ``ack=True`` return once the processor
        and listeners ran (``RemoteError`` if one of them failed)."""
        event_id, wire, corr = self._session.event_frame(type, data, meta, id, ack=ack)
        if corr:
            await self._roundtrip(wire, corr)
        else:
            await self._submit(wire)
        return event_id

    async def request(self, type: str, data: Any = None, *, meta: Meta = None,
                      timeout: float | None = None) -> Any:
        """Return the processor's return value for this event; ``RemoteError`` on failure."""
        _, wire, corr = self._session.event_frame(type, data, meta, request=True)
        return (await self._roundtrip(wire, corr, timeout)).body

    async def send_many(
        self, events: Iterable[EventTuple], *, ack: bool = False, batch_size: int = 500
    ) -> int:
        """Send ``(type, data)`` or ``(type, data, meta)`` tuples in BATCH frames.

        As ``Client.send_many``: up to ``batch_size`` events a frame; with ``ack=True`` up to
        ``window`` batches in flight, and once all are settled the first failure (if any) is
        raised as ``RemoteError`` with a note of how many failed. Returns the events sent.
        """
        batches = BatchSend(self._session, events, batch_size=batch_size, ack=ack,
                            window=self.window)
        try:
            for step in batches:
                if step is None:
                    await self._settle(batches)
                else:
                    await self._submit(*step)
        finally:
            self._forget(batches.inflight)
        return batches.result()

    async def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        start = time.perf_counter()
        await self._roundtrip(*self._session.ping_frame())
        return time.perf_counter() - start

    async def flush(self) -> None:
        """Return once the server has read everything sent so far and answered all it owes
        (one PING: fire-and-forget events reached it, their handlers may still run)."""
        if self._conn is not None or self._connecting is not None:
            await self._roundtrip(*self._session.ping_frame())

    async def close(self) -> None:
        """Write what is buffered, then close; unanswered frames are dropped and their
        callers get ``ClientConnectionError``. A later call reconnects."""
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
        self._flush()
        conn, self._conn = self._conn, None
        self._fail_waiters(ClientConnectionError(f"the client for {self.address} was closed"))
        if conn is not None and conn.transport is not None:
            conn.transport.close()  # after the buffered output is written
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.closed), self.timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None else "not connected"
        return f"<evserver.AsyncClient {self.address} {state}>"

    # ------------------------------------------------------------------ frames

    async def _roundtrip(self, wire: bytes, corr: int, timeout: float | None = None) -> p.Frame:
        """Send one frame that gets an answer, ``corr``, and wait for it; ERROR ->
        ``RemoteError``."""
        try:
            await self._submit(wire, corr)
            frame = await self._answer(corr, self.timeout if timeout is None else timeout)
        finally:
            self._forget((corr,))
        if frame.kind == p.ERROR:
            raise remote_error(frame)
        return frame

    async def _submit(self, wire: bytes, corr: int = 0) -> None:
        """Write one frame, connecting as needed; with ``corr`` keep it until answered."""
        session = self._session
        session.check_size(wire)
        session.failures = 0  # each new frame gets the full reconnection budget
        conn = self._conn
        if corr:
            session.keep(corr, wire)
            self._waiters[corr] = asyncio.get_running_loop().create_future()
            if conn is None:
                conn = await self._connected()  # the new connection re-sent it
            else:
                self._write(wire)
        else:
            if conn is None:
                conn = await self._connected()
            self._write(wire)
        if conn.paused:  # TCP pushback; checked here to spare a coroutine per frame
            await conn.drain()

    def _write(self, wire: bytes) -> None:
        """Queue a frame for the current connection; it leaves with the others
        written in this loop iteration. A connection change empties the queue: its
        answerable frames are re-sent by the next connection, the others were
        fire-and-forget (at most once)."""
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(wire)
        self._out_bytes += len(wire)
        if self._out_bytes >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.write(data)

    async def _answer(self, corr: int, timeout: float) -> p.Frame:
        """Wait for the answer to ``corr``. The clock restarts when the connection changes
        (a reconnect re-sent the frame); ``TimeoutError`` once a connected wait runs out."""
        loop = asyncio.get_running_loop()
        while True:
            waiter = self._waiters[corr]
            epoch = self._epoch
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                frame = await waiter
            finally:
                timer.cancel()
            if frame is not None:
                return frame
            if self._epoch == epoch and self._conn is not None:
                raise TimeoutError(f"no answer from {self.address} within {timeout:g}s")
            self._waiters[corr] = loop.create_future()

    async def _settle(self, batches: BatchSend) -> None:
        """Wait until at least one batch in flight is answered; report it to ``batches``."""
        inflight = batches.inflight
        while True:
            epoch = self._epoch
            waiters = [self._waiters[c] for c in inflight]
            done, _ = await asyncio.wait(waiters, timeout=self.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
            if self._epoch == epoch and self._conn is not None:
                raise TimeoutError(f"no answer from {self.address} within {self.timeout:g}s")
        for corr in list(inflight):
            waiter = self._waiters[corr]
            if waiter.done():
                batches.answered(corr, waiter.result())

    def _forget(self, corrs: Iterable[int]) -> None:
        self._session.forget(corrs)
        for corr in corrs:
            waiter = self._waiters.pop(corr, None)
            if waiter is not None and waiter.done() and not waiter.cancelled():
                waiter.exception()  # seen: a failure its caller did not wait for is not news

    def _answered(self, corr: int, frame: p.Frame) -> None:
        waiter = self._waiters.get(corr)
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)

    def _fail_waiters(self, exc: BaseException) -> None:
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(exc)
        self._session.pending.clear()

    # ------------------------------------------------------------------ connection

    async def _connected(self) -> _Connection:
        """The ready connection, opening it (once, for every task that asks) if needed."""
        if self._conn is not None:
            return self._conn
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.ensure_future(self._connect())
            task.add_done_callback(_retrieve)
        try:
            return await asyncio.shield(task)  # one caller's cancellation must not stop it
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                # ``close()`` stopped the connect this call was waiting for.
                raise ClientConnectionError(f"the client for {self.address} was closed") \
                    from None
            raise

    async def _connect(self) -> _Connection:
        """Open a connection (with backoff between attempts) and re-send unanswered frames.

        A failure that ends the attempts reaches every waiting call, not only the one that
        started it."""
        session = self._session
        loop = asyncio.get_running_loop()
        try:
            while True:
                if delay := session.reconnect_delay():
                    await asyncio.sleep(delay)
                conn: _Connection | None = None

                def factory() -> _Connection:
                    nonlocal conn
                    conn = self._opening = _Connection(self, loop)
                    return conn

                try:
                    async with asyncio.timeout(self.timeout):
                        await loop.create_connection(
                            factory, self.host, self.port, ssl=self.ssl,
                            server_hostname=self.server_hostname if self.ssl else None)
                        assert conn is not None
                        await conn.ready
                except _auth.AuthError:
                    raise  # a wrong key or an impostor: retrying cannot help
                except _ssl.SSLCertVerificationError as exc:
                    raise ClientConnectionError(f"cannot connect to {self.address}: {exc}") \
                        from None
                except TimeoutError:
                    _abort(conn, "connect timeout")
                    session.connect_failed(f"no connection within {self.timeout:g}s")
                    continue
                except (ConnectionLost, OSError) as exc:  # incl. ssl.SSLError
                    _abort(conn, str(exc))
                    session.connect_failed(_reason(exc))
                    continue
                except BaseException:
                    _abort(conn, "cancelled")
                    raise
                finally:
                    self._opening = None
                assert conn is not None and conn.transport is not None
                self._out.clear()
                self._out_bytes = 0
                self._conn = conn
                self._epoch += 1
                if session.pending:
                    conn.transport.write(session.unanswered())
                session.connected()
                return conn
        except Exception as exc:
            self._fail_waiters(exc)
            raise
        finally:
            if self._connecting is asyncio.current_task():
                self._connecting = None

    def _connection_made(self, conn: _Connection) -> None:
        self._session.connection_made()
        if not self._session.handshaking:
            conn.ready.set_result(None)

    def _received(self, conn: _Connection, data: bytes) -> None:
        session = self._session
        try:
            if not conn.ready.done():
                self._handshake(conn, data)
                if not conn.ready.done():
                    return
                data = b""  # the frames pipelined behind the handshake are still buffered
            if conn is self._conn or conn is self._opening:
                session.receive_data(data, self._answered)
        except ConnectionLost as exc:
            conn.abort(str(exc))
        except RemoteError as exc:  # our own fault (a bad frame): retrying cannot help
            self._fail_waiters(exc)
            conn.abort(str(exc))

    def _handshake(self, conn: _Connection, data: bytes) -> None:
        session = self._session
        assert conn.transport is not None
        session.reader.receive_data(data)
        try:
            while session.handshaking and (frame := session.reader.next_frame()) is not None:
                answer = session.handshake_frame(frame)
                if answer is not None:
                    conn.transport.write(answer)
        except (ConnectionLost, _auth.AuthError) as exc:
            conn.ready.set_exception(exc)
            conn.abort(str(exc))
            return
        except p.ProtocolError as exc:
            conn.ready.set_exception(ConnectionLost(f"bad frame from the server: {exc}"))
            conn.abort(str(exc))
            return
        if not session.handshaking:
            conn.ready.set_result(None)

    def _connection_lost(self, conn: _Connection, reason: str) -> None:
        if conn is not self._conn:
            return  # a connection that never became ready, or one we closed
        self._conn = None
        self._out.clear()
        self._out_bytes = 0
        self._epoch += 1
        if not any(not w.done() for w in self._waiters.values()):
            self._session.lost = reason  # nobody waits: the next call reconnects
            return
        try:
            self._session.lose(reason)
        except ClientConnectionError as exc:
            self._fail_waiters(exc)
            return
        if self._connecting is None:  # reconnect now: callers are waiting for answers
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(_retrieve)


def _reason(exc: Exception) -> str:
    """A failed attempt's reason as ``Client`` words it (asyncio says "Connect call failed
    (address)" where the socket module says "Connection refused")."""
    if isinstance(exc, OSError) and not isinstance(exc, _ssl.SSLError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _expire(waiter: asyncio.Future[p.Frame | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _abort(conn: _Connection | None, reason: str) -> None:
    if conn is not None:
        conn.abort(reason)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Connect tasks report failures to their waiters; this keeps asyncio from also
    logging them as never retrieved."""
    if not task.cancelled():
        task.exception()
