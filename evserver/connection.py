"""One accepted stream connection of any protocol, as the eventlet adapter drives it.

A connection with bytes to read has one reader green thread: it ``recv_into``s a buffer
shared by every connection of the process (nothing yields between the ``recv_into`` and the
decoder copying the bytes, so sharing is safe and an idle connection costs no buffer),
decodes with its protocol's sans-I/O reader and hands the results to the dispatcher a job of
about ``JOB_EVENTS`` events at a time. A silent connection has no green thread at all: it is
parked in the hub until bytes arrive. Responses go through ``StreamConnection.write``:
whichever green thread finds the connection idle becomes its single writer and drains
everything queued meanwhile, so writes coalesce and two green threads never write one socket
at once (eventlet raises if they do).

A connection sees the server that accepted it only as a ``Host``: the limits and the few
callbacks it needs, so this module (and each protocol's adapter) does not import ``server``.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import protocol as p
from ._eventlet import ReadWait, call_in_hub, eventlet, getcurrent
from .dispatch import Dispatcher, Job

log = logging.getLogger("evserver.server")


class Intake(Protocol):
    """Where a connection hands its jobs: the dispatcher, or in cluster mode the node's edge
    (which appends them to Redis; the partitions' owners run them on their dispatchers)."""

    def submit(self, job: Job) -> None: ...

    def run_inline(self, job: Job) -> bool: ...


class Host(Protocol):
    """What a connection needs from the server that accepted it."""

    dispatcher: Dispatcher
    intake: Intake
    counters: dict[str, int]
    connections: set[StreamConnection]
    stopping: bool
    idle_timeout: float
    park_after: float
    drain_timeout: float
    handshake_timeout: float
    max_connections: int
    jobs_per_connection: int
    reuse_port: bool
    backlog: int
    ssl_context: Any

    def closed(self, conn: StreamConnection) -> None:
        """The connection is closed and its jobs are done: forget it."""

    def limit_log(self, kind: str, msg: str, *args: Any) -> None:
        """A rate-limited warning about a misbehaving peer."""


_READ_SIZE = 1 << 16
_BUF = bytearray(_READ_SIZE)  # shared by every reader of every protocol: see _recv
_VIEW = memoryview(_BUF)
# Reads are decoded and dispatched in jobs of about this many events (a BATCH is never
# split), so a long run of single-event frames spreads over several workers.
JOB_EVENTS = 64
# A reader runs its own job when the pool is idle (no hand-off: the request/reply fast path).
# A job that took longer than this means slow handlers: hand this connection's next jobs to
# the pool, where they run in parallel, and try inline again after that many jobs.
_INLINE_MAX_SECONDS = 0.002
_INLINE_BACKOFF_JOBS = 256
_OUT_LIMIT = 4 << 20  # reply bytes queued for one connection before its reader pauses


class _Park(BaseException):
    """Thrown into a reader blocked in ``recv`` to make it give up its green thread."""


class StreamConnection:
    """An accepted stream socket of any protocol: one writer, jobs in flight, drain on close.

    Subclasses read their protocol in ``serve`` (with ``_recv``) and answer in ``job_done``
    (the dispatcher's ``Sink``), calling ``_job_finished`` so a reader waiting for pipeline
    room wakes up.

    Parking: a connection waits for its first bytes, and again after ``park_after``
    seconds without data with nothing in flight, as a ``ReadWait`` in the hub instead of a
    reader green thread blocked in ``recv`` (whose stack is most of an idle connection's
    memory). Data, EOF, a graceful stop or the idle timeout start a new reader, which goes
    on where the last one stopped: all a reader's state lives on the connection.
    """

    __slots__ = (
        "addr", "closing", "flush_waiter", "idle_expired", "inline_skip", "jobs", "last_active",
        "out", "out_bytes", "parked", "reader_glet", "receiving", "server", "sock", "waiter",
        "writing",
    )

    protocol = "native"  # for log lines

    def __init__(self, server: Host, sock: Any, addr: Any) -> None:
        self.server = server
        self.sock = sock
        self.addr = addr
        self.out: list[bytes] = []
        self.out_bytes = 0  # queued or being sent: bounded by _OUT_LIMIT via the reader
        self.flush_waiter: Any = None  # an Event the reader waits on while out_bytes is high
        self.writing = False
        self.closing = False
        self.jobs = 0  # jobs queued or running
        self.inline_skip = 0  # jobs to hand to the pool before running one inline again
        self.waiter: tuple[int, Any] | None = None  # (below, Event) for _wait_jobs
        self.reader_glet: Any = None  # the reader's green thread, None while parked
        self.receiving = False  # the reader is blocked in recv (where it may be parked)
        self.last_active = time.monotonic()  # when bytes last arrived or the last job ended
        self.parked: ReadWait | None = None
        self.idle_expired = False  # woken by the idle timeout while parked

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer; the first caller to find no writer becomes it."""
        self.out.append(data)
        self.out_bytes += len(data)
        if self.writing:
            return
        self.writing = True
        try:
            while self.out:
                chunk = b"".join(self.out) if len(self.out) > 1 else self.out[0]
                self.out.clear()
                self.sock.sendall(chunk)
                self.out_bytes -= len(chunk)
        except (OSError, AttributeError) as exc:  # peer gone, or socket closed under us
            self.out.clear()
            self._abort(f"write failed: {exc}")
        finally:
            self.writing = False
            if not self.out:
                self.out_bytes = 0
            if self.flush_waiter is not None and self.out_bytes < _OUT_LIMIT:
                waiter, self.flush_waiter = self.flush_waiter, None
                waiter.send()

    def start(self) -> None:
        """Serve a socket just accepted. A peer greeted here waits for its first bytes
        parked, so a connection that never sends costs no green thread at all."""
        if not self.greet():
            eventlet.spawn_n(self.run)
        elif self.server.park_after > 0:
            self._park_wait()
        else:
            eventlet.spawn_n(self.run, True)

    def greet(self) -> bool:
        """Queue the protocol's greeting; False when the reader must handshake first."""
        raise NotImplementedError

    def run(self, resumed: bool = False) -> None:
        """The reader green thread: the protocol's ``serve``, then the ending every protocol
        shares: a vanished peer quietly, any other error loudly, and ``_finish`` unless the
        connection was parked."""
        self.reader_glet = getcurrent()
        try:
            self.serve(resumed)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF, errno.ENOTCONN):
                log.info("%s connection %s: %s", self.protocol, peer_name(self.addr), exc)
        except Exception:
            log.exception("internal error on %s connection %s", self.protocol, peer_name(self.addr))
        finally:
            self.reader_glet = None
            if self.parked is None:
                self._finish()

    def serve(self, resumed: bool) -> None:
        """Read and decode the protocol, submit jobs; errors and ``_finish`` are ``run``'s.
        ``resumed``: the peer was greeted already (``greet``, or an earlier reader)."""
        raise NotImplementedError

    def _recv(self) -> memoryview | None:
        """The next bytes received, a view of the buffer every connection shares (decode it
        before anything can yield); empty at EOF; None when the connection was parked
        instead (``serve`` must then return). TimeoutError when idle for ``idle_timeout``."""
        if self.idle_expired:
            self.idle_expired = False
            raise TimeoutError
        self.receiving = True
        try:
            n = self.sock.recv_into(_BUF)
        except _Park:
            self._park_wait()
            return None
        finally:
            self.receiving = False
        self.last_active = time.monotonic()
        return _VIEW[:n]

    def sweep(self, now: float) -> None:
        """Called every ``park_after`` seconds: park a reader that has been waiting in recv
        that long with nothing in flight. TLS readers stay: decrypted bytes may be waiting
        where the fd does not show them."""
        if (self.receiving and not self.jobs and now - self.last_active >= self.server.park_after
                and not isinstance(self.sock, ssl.SSLSocket)):
            call_in_hub(self._park)

    def _park(self) -> None:
        """In the hub: end the reader if it is still blocked in recv with nothing in flight."""
        if (self.receiving and not self.jobs and not self.closing and self.reader_glet is not None
                and time.monotonic() - self.last_active >= self.server.park_after):
            self.reader_glet.throw(_Park())

    def _park_wait(self) -> None:
        timeout = self.server.idle_timeout
        left = max(0.0, self.last_active + timeout - time.monotonic()) if timeout else None
        self.parked = ReadWait(self.sock.fileno(), self._wake, left)

    def _wake(self, timed_out: bool) -> None:
        """In the hub, when the parked connection's wait ended: a new reader goes on."""
        self.parked = None
        self.idle_expired = timed_out
        eventlet.spawn_n(self.run, True)

    @staticmethod
    def refuse(sock: Any, limit: int) -> None:
        """Turn away a socket accepted beyond ``max_connections`` (close it, at least)."""
        sock.close()

    def job_done(self, job: Job) -> None:
        """The dispatcher's ``Sink`` callback: each protocol answers in its own way."""
        raise NotImplementedError

    def _dispatch(self, frames: list[p.Frame]) -> None:
        """Run a read's frames as jobs: inline while the pool is idle, else through the
        queue, holding the reader while this connection has too many jobs in flight."""
        server = self.server
        dispatcher = server.intake
        for job_frames in _split(frames):
            self.jobs += 1
            job = _job(self, job_frames)
            started = time.perf_counter()
            if not self.inline_skip and dispatcher.run_inline(job):
                if time.perf_counter() - started > _INLINE_MAX_SECONDS:
                    self.inline_skip = _INLINE_BACKOFF_JOBS
            else:
                self.inline_skip = max(0, self.inline_skip - 1)
                dispatcher.submit(job)
            # Also after an inline run: its job stays open while ordered events are parked.
            self._wait_jobs(server.jobs_per_connection, timeout=None)
        if self.out_bytes >= _OUT_LIMIT and not self.closing:
            # The peer is not reading its replies: stop reading its requests until it does
            # (the blocked writer is bounded by the socket timeout, idle_timeout).
            self.flush_waiter = eventlet.event.Event()
            self.flush_waiter.wait()

    def _job_finished(self) -> None:
        self.jobs -= 1
        if not self.jobs:  # waiting on its own handlers is not idleness: the clock restarts
            self.last_active = time.monotonic()
        waiter = self.waiter
        if waiter is not None and self.jobs < waiter[0]:
            self.waiter = None
            waiter[1].send()

    def _wait_jobs(self, below: int, timeout: float | None) -> bool:
        """Block until fewer than ``below`` jobs are in flight; False on timeout."""
        if self.jobs < below:
            return True
        event = eventlet.event.Event()
        self.waiter = (below, event)
        try:
            with eventlet.Timeout(timeout):
                event.wait()
            return True
        except eventlet.Timeout:
            return False
        finally:
            self.waiter = None

    def _abort(self, why: str) -> None:
        self.closing = True
        log.debug("aborting %s: %s", peer_name(self.addr), why)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _finish(self) -> None:
        """Wait for this connection's jobs so their responses are written, then close."""
        self.closing = True
        self._wait_jobs(1, timeout=self.server.drain_timeout)
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.closed(self)


def _split(frames: list[p.Frame]) -> list[list[p.Frame]]:
    """Group frames into jobs of about ``JOB_EVENTS`` events (a frame is never split)."""
    jobs: list[list[p.Frame]] = [[]]
    size = 0
    for frame in frames:
        if size >= JOB_EVENTS:
            jobs.append([])
            size = 0
        jobs[-1].append(frame)
        size += p.weight(frame)
    return jobs


def _job(sink: StreamConnection, frames: list[p.Frame]) -> Job:
    """The dispatcher's unit of work for frames: their events, flat, and which are requests
    (the frames ride along as the job's context, to answer them)."""
    if len(frames) == 1 and frames[0].kind in p.EVENT_KINDS:  # a batch, usually
        frame = frames[0]
        return Job(sink, frame.body, _FIRST if frame.kind == p.REQUEST else _NONE, frames)
    events: list[Any] = []
    requests = []
    for frame in frames:
        if frame.kind in p.EVENT_KINDS:
            if frame.kind == p.REQUEST:
                requests.append(len(events))
            events += frame.body
    return Job(sink, events, frozenset(requests) if requests else _NONE, frames)


_NONE: frozenset[int] = frozenset()
_FIRST = frozenset({0})


def accept_loop(host: Host, listener: Any, make: Callable[[Any, Any], StreamConnection],
                refuse: Callable[[Any, int], None]) -> None:
    """Accept sockets on ``listener`` until the host stops; ``make(sock, addr)`` builds the
    protocol's connection, ``refuse(sock, limit)`` turns away one beyond the limit."""
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
            eventlet.spawn_n(refuse, sock, host.max_connections)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if host.idle_timeout:
            sock.settimeout(host.idle_timeout)
        conn = make(sock, addr)
        host.connections.add(conn)
        conn.start()


def peer_name(addr: Any) -> str:
    """``host:port`` of a peer address, for log lines."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)
