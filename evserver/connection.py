"""The one connection driver: every protocol's accepted sockets, served the same way.

A ``Connection`` owns what is I/O about a connection, whatever its protocol: the TLS
handshake and the protocol's opening, bounded together by ``handshake_timeout``; the reads;
the idle timeout; the single writer; the jobs in flight and the limits on them; parking;
the drain on close; the counters and log lines of a connection's end. What the bytes mean is
the business of a sans-I/O protocol object plugged into it (``native.NativeProtocol``,
``forward_session.ForwardProtocol``), which turns bytes into units of work for the
dispatcher and outcomes into bytes, and keeps its lifecycle as a table of states.

Reading: a connection with bytes to read has one reader green thread. It ``recv_into``s a
buffer shared by every connection of its server (nothing yields between the ``recv_into``
and the decoder copying the bytes, so sharing is safe and an idle connection costs no
buffer) and hands the protocol's units to the dispatcher one job of about ``JOB_EVENTS``
events at a time, each dispatched (inline, usually) before the next is decoded, so its
memory is reused while still in cache. A silent connection has no green thread at all: it is
parked in the hub until bytes arrive.

Handing off: when a job the reader runs inline waits in a handler, the work behind it on the
connection must not wait too. If some is decoded or buffered already, a new reader green
thread goes on with it at once; if not, the connection waits for bytes in the hub
(``standby``, like parking), and a new reader starts only if some arrive before the job is
done. Either way the old reader finishes its job as a plain runner and then leaves. So a
request answered before its client sends again (request/reply) costs no green thread (a new
one costs ~10 µs), and a job whose handlers never wait costs no hand-off at all.

Writing: whichever green thread finds the connection idle becomes its single writer and
drains everything queued meanwhile (two green threads never write one socket at once); a pool
worker leaves what a slow peer does not take at once to a writer green thread (``write``).

A connection sees the server that accepted it only as a ``Host``: the limits and the few
callbacks it needs, so neither this module nor the protocols import ``server``.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

from ._eventlet import ReadWait, call_in_hub, cooperate, eventlet, getcurrent, os_socket
from .dispatch import Dispatcher, Job
from .errors import (
    AuthError,
    HandshakeTimeout,
    IdleTimeout,
    PeerError,
    ProtocolError,
)
from .logs import LogBudget

log = logging.getLogger("evserver.server")
security_log = logging.getLogger("evserver.security")


class Intake(Protocol):
    """Where a connection hands its jobs: the dispatcher, or in cluster mode the node's edge
    (which appends them to Redis; the partitions' owners run them on their dispatchers)."""

    def submit(self, job: Job) -> None: ...

    def run_inline(self, job: Job, handoff: Callable[[], None] | None = None) -> bool: ...


class Host(Protocol):
    """What a connection needs from the server that accepted it."""

    dispatcher: Dispatcher
    intake: Intake
    counters: dict[str, int]
    connections: set[Connection]
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
    auth_log: LogBudget
    read_buffer: memoryview  # see ``read_buffer()``

    def closed(self, conn: Connection) -> None:
        """The connection is closed and its jobs are done: forget it."""

    def limit_log(self, kind: str, msg: str, *args: Any) -> None:
        """A rate-limited warning about a misbehaving peer."""


Unit = tuple[list[Any], frozenset[int], Any]  # (events, indexes of requests, sink context)


class WireProtocol(Protocol):
    """A sans-I/O protocol object, one per connection (see the module docstring)."""

    name: str
    peer: str
    opening: bool  # the peer must finish a handshake before any work (handshake_timeout)
    ERROR_COUNTERS: dict[type[PeerError], str]  # the counter of each way a connection ends

    def data_to_send(self) -> bytes: ...
    def receive_data(self, data: bytes | memoryview) -> None: ...
    def receive_eof(self) -> None: ...
    def next_jobs(self) -> list[Any]: ...  # Units; [] when more bytes are needed
    @property
    def pending_input(self) -> bool: ...  # bytes received that are not yet units
    def job_done(self, job: Job) -> tuple[bytes, str | None]: ...  # (answers, why to close)
    def error_bytes(self, exc: PeerError) -> bytes: ...
    def refusal(self, limit: int) -> bytes: ...


_READ_SIZE = 1 << 16
_OPENING_READ = 4096  # bytes read at a time while a peer has not authenticated
# Reads are decoded and dispatched in jobs of about this many events (a BATCH is never
# split), so a long run of single-event frames spreads over several workers.
JOB_EVENTS = 64
_OUT_LIMIT = 4 << 20  # reply bytes queued for one connection before its reader pauses


# Two private signals of the driver's own control flow, not errors anyone handles: they
# never leave this module, which is why they are not in evserver.errors.
class _Park(BaseException):
    """Thrown into a reader blocked in ``recv`` to make it give up its green thread."""


class _Closed(Exception):
    """The peer went away during the opening handshake."""


class _HandedOff(BaseException):
    """Unwinds a reader whose inline job waited: another reader has its connection now."""


class Connection:
    """An accepted stream socket driving one protocol object: one writer, jobs in flight,
    the idle and handshake timeouts, drain on close.

    Parking: a connection waits for its first bytes, and again after ``park_after``
    seconds without data with nothing in flight, as a ``ReadWait`` in the hub instead of a
    reader green thread blocked in ``recv`` (whose stack is most of an idle connection's
    memory). Data, EOF, a graceful stop or the idle timeout start a new reader, which goes
    on where the last one stopped: all a reader's state lives on the connection.
    """

    __slots__ = (
        "addr", "closing", "flush_waiter", "idle_expired", "jobs", "last_active", "out",
        "out_bytes", "parked", "protocol", "raw", "reader_glet", "receiving", "server", "sock",
        "standby", "tls", "units", "waiter", "writing",
    )

    def __init__(self, server: Host, sock: Any, addr: Any, protocol: WireProtocol) -> None:
        self.server = server
        self.sock = sock
        self.addr = addr
        self.protocol = protocol
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.raw = os_socket(sock)  # written to directly while it takes the bytes at once
        self.out: list[bytes] = []
        self.out_bytes = 0  # queued or being sent: bounded by _OUT_LIMIT via the reader
        self.flush_waiter: Any = None  # an Event the reader waits on while out_bytes is high
        self.writing = False
        self.closing = False
        self.jobs = 0  # jobs queued or running
        self.units: list[Unit] = []  # decoded, not dispatched yet: the reader's, whichever
        self.waiter: tuple[int, Any] | None = None  # (below, Event) for _wait_jobs
        self.reader_glet: Any = None  # the reader's green thread, None while parked
        self.receiving = False  # the reader is blocked in recv (where it may be parked)
        self.last_active = time.monotonic()  # when bytes last arrived or the last job ended
        self.parked: ReadWait | None = None
        self.standby: ReadWait | None = None  # bytes awaited while the reader's job waits
        self.idle_expired = False  # woken by the idle timeout while parked

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer; the first caller to find no writer becomes it.

        What the socket takes at once goes at once. If the peer is slow to read, the reader
        waits for it (its own peer's pace), but a pool worker leaves the rest to a writer
        green thread: a peer that does not read must not hold a worker until the idle
        timeout. TLS writers always wait (an SSL write may need a read)."""
        self.out.append(data)
        self.out_bytes += len(data)
        if self.writing:
            return
        self.writing = True
        if self.raw is not None and getcurrent() is not self.reader_glet:
            if not self._flush(wait=False):
                eventlet.spawn_n(self._flush)
            return
        self._flush()

    def _flush(self, wait: bool = True) -> bool:
        """Write everything queued (what the OS socket does not take at once, waiting for the
        peer, up to ``idle_timeout``), then stop being the writer; with ``wait=False`` stop
        where the socket is full instead, still the writer, and return False."""
        done = True
        try:
            while self.out:
                chunk = b"".join(self.out) if len(self.out) > 1 else self.out[0]
                self.out.clear()
                sent = 0
                if self.raw is not None:
                    try:
                        sent = self.raw.send(chunk)
                    except BlockingIOError:
                        pass
                if sent < len(chunk):
                    rest = chunk[sent:] if sent else chunk
                    if not wait:
                        self.out.insert(0, rest)
                        self.out_bytes -= sent
                        done = False
                        return False
                    self.sock.sendall(rest)
                self.out_bytes -= len(chunk)
        except (OSError, AttributeError) as exc:  # peer gone, or socket closed under us
            self.out.clear()
            self._abort(f"write failed: {exc}")
        finally:
            if done:
                self._written()
        return True

    def _written(self) -> None:
        """No writer any more: wake a reader (or ``_finish``) waiting for the bytes to go."""
        self.writing = False
        if not self.out:
            self.out_bytes = 0
        if self.flush_waiter is not None and self.out_bytes < _OUT_LIMIT:
            waiter, self.flush_waiter = self.flush_waiter, None
            waiter.send()

    # ------------------------------------------------------------------ reading

    def start(self) -> None:
        """Serve a socket just accepted. A peer with no handshake to make is greeted here and
        waits for its first bytes parked, so a connection that never sends costs no green
        thread at all; the reader runs the TLS handshake and the protocol's opening."""
        if self.tls or self.protocol.opening:
            eventlet.spawn_n(self.run)
            return
        if greeting := self.protocol.data_to_send():
            self.write(greeting)
        if self.server.park_after > 0:
            self._park_wait()
        else:
            eventlet.spawn_n(self.run, True)

    def run(self, resumed: bool = False) -> None:
        """The reader green thread: ``serve``, then a vanished peer ends quietly, any other
        error loudly, and the connection is closed unless it was parked or handed off."""
        self.reader_glet = getcurrent()
        reader = True
        try:
            self.serve(resumed)
        except _HandedOff:
            reader = False
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF, errno.ENOTCONN):
                log.info("%s connection %s: %s", self.protocol.name, self.protocol.peer, exc)
        except Exception:
            log.exception("internal error on %s connection %s", self.protocol.name,
                          self.protocol.peer)
        finally:
            if reader:
                self.reader_glet = None
                if self.parked is None:
                    self._finish()

    def serve(self, resumed: bool) -> None:
        """Open (unless ``resumed``), then read, decode and dispatch until EOF, a stop, an
        error or parking. A peer's error is answered and ends the connection."""
        server = self.server
        protocol = self.protocol
        try:
            if not resumed and not self._open():
                return
            if not self._pump():  # the units a reader that handed off left, if any
                return
            while not server.stopping:
                try:
                    data = self._recv()
                except TimeoutError:
                    if self.jobs:
                        continue  # waiting on our own handlers is not idleness
                    raise IdleTimeout(f"no data for {server.idle_timeout:g}s") from None
                if data is None:
                    return  # parked
                if not data:
                    if not server.stopping:
                        protocol.receive_eof()
                    return
                protocol.receive_data(data)
                if not self._pump():
                    return
                # Fairness: recv only yields on EAGAIN, so a connection that always has
                # data would otherwise never let others run. It pays for request/reply too:
                # the recv then often finds the next request instead of registering with the
                # hub (measured without it: 50 connections' no-op round trips at 0.6x the
                # reference receiver instead of 0.9x).
                cooperate()
        except PeerError as exc:
            self._fail(exc)

    def _pump(self) -> bool:
        """Dispatch every unit of work the protocol has decoded, one job at a time, and send
        what it owes; False once the connection is closing."""
        protocol = self.protocol
        while True:
            if not self.units:  # none left by a reader that handed off: decode more
                self.units = protocol.next_jobs()
                if not self.units:
                    break
                if out := protocol.data_to_send():
                    self.write(out)  # a Forward PONG goes out before any ack
            self._dispatch()
        if out := protocol.data_to_send():
            self.write(out)
        return not self.closing

    def _open(self) -> bool:
        """The TLS handshake eventlet's accept deferred, the greeting, and the protocol's
        opening exchange, all within one absolute ``handshake_timeout`` (a slow-loris peer
        trickling bytes gains nothing); False when the connection must be closed."""
        server = self.server
        protocol = self.protocol
        timer = eventlet.Timeout(server.handshake_timeout)
        try:
            if self.tls:
                self.sock.do_handshake()
            if greeting := protocol.data_to_send():
                self.write(greeting)
            while protocol.opening:
                data = self.sock.recv(_OPENING_READ)
                if not data:
                    raise _Closed
                protocol.receive_data(data)
                protocol.next_jobs()  # consumes the handshake only: no work before it ends
            return True
        except eventlet.Timeout as exc:
            if exc is not timer:
                raise
            if self.tls and self.sock.version() is None:
                # No TLS session to send an ERROR frame through.
                server.counters["handshake_timeouts"] += 1
                self._log_handshake_timeout()
                self.closing = True
                return False
            self._fail(HandshakeTimeout(
                f"handshake not completed within {server.handshake_timeout:g}s"))
            return False
        except ssl.SSLError as exc:
            server.counters["tls_failures"] += 1
            security_log.info("%s %s: TLS handshake failed: %s", protocol.name, protocol.peer,
                              exc.reason or exc)
            return False
        except _Closed:
            return False
        finally:
            timer.cancel()

    def _log_handshake_timeout(self) -> None:
        security_log.info("%s %s: no handshake within %gs; closing", self.protocol.name,
                          self.protocol.peer, self.server.handshake_timeout)

    def _fail(self, exc: PeerError) -> None:
        """The peer broke the protocol (or went silent): count it, log it (rate-limited),
        answer the frames before the bad one, then send the protocol's error and close."""
        server = self.server
        protocol = self.protocol
        peer = protocol.peer
        if isinstance(exc, IdleTimeout):
            server.counters["idle_closed"] += 1
            server.limit_log("idle_timeout", "closing idle connection %s after %gs", peer,
                             server.idle_timeout)
        elif isinstance(exc, HandshakeTimeout):
            server.counters["handshake_timeouts"] += 1
            self._log_handshake_timeout()
        else:
            counter = next((key for kind, key in protocol.ERROR_COUNTERS.items()
                            if isinstance(exc, kind)), None)
            if counter is not None:
                server.counters[counter] += 1
            if isinstance(exc, AuthError):
                server.auth_log.warning(security_log, "auth", "authentication failed for %s: %s",
                                        peer, str(exc))
            else:
                server.limit_log(f"{protocol.name}_{exc.code}",
                                 "%s %s: closing connection: %s [%s]", protocol.name, peer,
                                 exc, exc.code)
        if isinstance(exc, ProtocolError):
            # The frames before the bad one are answered first: a client that sees the
            # connection-level error gives up on whatever is still unanswered.
            self._wait_jobs(1, timeout=server.drain_timeout)
        out = protocol.data_to_send() + protocol.error_bytes(exc)
        self.closing = True
        if out:
            try:
                self.write(out)
            except Exception:  # best effort: the peer may be gone already
                pass

    def _recv(self) -> memoryview | None:
        """The next bytes received, a view of the buffer the server's connections share
        (decode it before anything can yield); empty at EOF; None when the connection was
        parked instead (``serve`` must then return). TimeoutError when idle for
        ``idle_timeout``."""
        if self.idle_expired:
            self.idle_expired = False
            raise TimeoutError
        self.receiving = True
        try:
            n = self._read()
        except _Park:
            self._park_wait()
            return None
        finally:
            self.receiving = False
        self.last_active = time.monotonic()
        return self.server.read_buffer[:n]

    def _read(self) -> int:
        """``recv_into`` the server's buffer: from the OS socket when bytes are there, as in
        ``write``; else (or on any error, reported alike) through the green socket, which
        waits in the hub."""
        buffer = self.server.read_buffer
        if self.raw is not None:
            try:
                return self.raw.recv_into(buffer)
            except OSError:
                pass
        return self.sock.recv_into(buffer)

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


    def job_done(self, job: Job) -> None:
        """The dispatcher's ``Sink`` callback: answers go out, a reader waiting for room wakes."""
        try:
            out, close = self.protocol.job_done(job)
            if out:
                self.write(out)
            if close is not None:
                self._abort(close, keep_writing=True)
        finally:
            self._job_finished()  # whatever happened, the reader must not wait for this job

    def _dispatch(self) -> None:
        """Run the decoded units as jobs: inline while the pool is idle, else through the
        queue, holding the reader while this connection has too many jobs in flight.
        Raises ``_HandedOff`` in a reader whose inline job waited and whose connection
        another reader has taken over meanwhile (see ``_hand_off``)."""
        server = self.server
        intake = server.intake
        stats = server.dispatcher.stats
        units = self.units
        while units:
            # Before, not only after: a reader that took over from one whose job waits must
            # not start one job after another while the others still wait.
            self._wait_jobs(server.jobs_per_connection, timeout=None)
            events, requests, context = units.pop(0)
            stats.events_in += len(events)
            self.jobs += 1
            job = Job(self, events, requests, context)
            if intake.run_inline(job, self._hand_off):
                if self.reader_glet is not getcurrent():
                    raise _HandedOff  # (the standby, if any, is the new reader's)
                self._end_standby()  # nothing arrived while it waited: read on
            else:
                intake.submit(job)
            # Also after an inline run: its job stays open while ordered events are parked.
            self._wait_jobs(server.jobs_per_connection, timeout=None)
        if self.out_bytes >= _OUT_LIMIT and not self.closing:
            # The peer is not reading its replies: stop reading its requests until it does
            # (the blocked writer is bounded by the socket timeout, idle_timeout).
            self.flush_waiter = eventlet.event.Event()
            self.flush_waiter.wait()

    def _hand_off(self) -> None:
        """Called in the hub's switch (must not block) when the reader's inline job is about
        to wait in a handler: see the module docstring. A TLS socket gets a new reader at
        once: decrypted bytes may be waiting where the fd does not show them."""
        if self.units or self.protocol.pending_input or self.tls or self.closing:
            self._new_reader()
        else:
            self.standby = ReadWait(self.sock.fileno(), self._standby_ended, None)

    def _standby_ended(self, _timed_out: bool) -> None:
        """In the hub: bytes arrived while the old reader's job still waits."""
        self.standby = None
        self._new_reader()

    def _end_standby(self) -> None:
        if self.standby is not None:
            self.standby.cancel()
            self.standby = None

    def _new_reader(self) -> None:
        self.reader_glet = None
        eventlet.spawn_n(self.run, True)

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

    def _wait_written(self, timeout: float) -> bool:
        """Block until the writer ``write`` spawned for a slow peer is done; False on timeout."""
        if not self.writing:
            return True
        self.flush_waiter = eventlet.event.Event()
        with eventlet.Timeout(timeout, False):
            self.flush_waiter.wait()
        return not self.writing

    def _abort(self, why: str, keep_writing: bool = False) -> None:
        """Stop now; ``keep_writing``: only the reading while owed bytes are still going out."""
        self.closing = True
        log.debug("aborting %s: %s", self.protocol.peer, why)
        try:
            self.sock.shutdown(socket.SHUT_RD if keep_writing and self.writing
                               else socket.SHUT_RDWR)
        except OSError:
            pass

    def _finish(self) -> None:
        """Wait for this connection's jobs so their responses are written, then close."""
        self.closing = True
        self._end_standby()
        # A peer that half-closed may still read its replies: its jobs take the time their
        # handlers take (each handler has its own timeout); a stopping server gives them
        # drain_timeout.
        while not self._wait_jobs(1, timeout=self.server.drain_timeout):
            if self.server.stopping:
                break
        while self.writing and not self._wait_written(self.server.drain_timeout):
            if self.server.stopping:
                break
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.closed(self)


def read_buffer() -> memoryview:
    """The buffer every connection of one server reads into, one read at a time: its green
    threads never switch between a ``recv_into`` and the decoder copying the bytes, so they
    can share it, and an idle connection costs no buffer. Not shared beyond one server: a
    ``recv_into`` releases the GIL, so a server in another thread could overwrite it."""
    return memoryview(bytearray(_READ_SIZE))
