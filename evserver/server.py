"""The eventlet adapter: listen, accept, read, write, drain.

A connection with bytes to read has one reader green thread: it ``recv_into``s a buffer
shared by every connection of the process (nothing yields between the ``recv_into`` and the
decoder copying the bytes, so sharing is safe and an idle connection costs no buffer),
decodes with ``protocol.FrameReader`` and hands the frames to the dispatcher a job of about
``JOB_EVENTS`` events at a time. A silent connection has no green thread at all: it is
parked in the hub until bytes arrive (``StreamConnection``). Responses go through
``Connection.write``: whichever green thread finds the connection idle becomes its single
writer and drains everything queued meanwhile, so writes coalesce and two green threads never
write one socket at once (eventlet raises if they do).

Shutdown order (nameko's): stop accepting -> stop reading -> let in-flight jobs finish and
their responses flush -> close -> stop the workers; bounded by ``drain_timeout``.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, cast

import greenlet

from . import __version__
from . import protocol as p
from ._eventlet import ReadWait, call_in_hub, eventlet
from .app import App
from .auth import Authenticator, FailureLog
from .deadletters import DeadLetterStore
from .dispatch import Dispatcher, Job, Result
from .errors import ProtocolError
from .handshake import open_connection
from .logs import LogBudget
from .security import security_options
from .tls import shutdown_read

if TYPE_CHECKING:
    from .cluster import ClusterSettings
    from .cluster.node import Node
    from .forward_server import ForwardListener, ForwardSettings

log = logging.getLogger("evserver.server")

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

    def __init__(self, server: Server, sock: Any, addr: Any) -> None:
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
        self.reader_glet = greenlet.getcurrent()
        try:
            self.serve(resumed)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF, errno.ENOTCONN):
                log.info("%s connection %s: %s", self.protocol, _peer(self.addr), exc)
        except Exception:
            log.exception("internal error on %s connection %s", self.protocol, _peer(self.addr))
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

    def job_done(self, job: Job, results: list[Result]) -> None:
        """The dispatcher's ``Sink`` callback: each protocol answers in its own way."""
        raise NotImplementedError

    def _dispatch(self, frames: list[p.Frame]) -> None:
        """Run a read's frames as jobs: inline while the pool is idle, else through the
        queue, holding the reader while this connection has too many jobs in flight."""
        server = self.server
        dispatcher = server.intake
        for job_frames in _split(frames):
            self.jobs += 1
            job = Job(self, job_frames)
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
        log.debug("aborting %s: %s", _peer(self.addr), why)
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



class Connection(StreamConnection):
    """One native-protocol connection: its frame reader and the replies it still owes."""

    __slots__ = ("reader", "replies_pending")

    def __init__(self, server: Server, sock: Any, addr: Any) -> None:
        super().__init__(server, sock, addr)
        self.reader = p.FrameReader(p.SERVER_RECEIVES, max_frame_bytes=server.max_frame_bytes)
        self.replies_pending = 0  # frames that still owe the peer a response

    @staticmethod
    def refuse(sock: Any, limit: int) -> None:
        try:
            sock.settimeout(5.0)  # a TLS peer must not pin this green thread in its handshake
            sock.sendall(p.encode_error(0, "overloaded", "TooManyConnections",
                                        f"server is at max_connections={limit}"))
        except OSError:
            pass
        finally:
            sock.close()

    def job_done(self, job: Job, results: list[Result]) -> None:
        if results:
            self.replies_pending -= sum(1 for r in results if r.frame.corr)
            self.write(b"".join(map(_encode_result, results)))
        self._job_finished()

    # ------------------------------------------------------------------ reading

    def greet(self) -> bool:
        if self.server.secure:
            return False  # HELLO comes after the TLS and auth handshakes, in the reader
        self.write(self.server.hello)
        return True

    def serve(self, resumed: bool) -> None:
        server = self.server
        reader = self.reader
        try:
            early: bytes | None = b""  # bytes pipelined behind an authenticating HELLO
            if not resumed and (early := open_connection(self)) is None:
                return
            while not server.stopping:
                if early:
                    reader.receive_data(early)
                    early = b""
                else:
                    try:
                        data = self._recv()
                    except TimeoutError:
                        if self.jobs:
                            continue  # waiting on our own handlers is not idleness
                        server.counters["idle_closed"] += 1
                        server.limit_log("idle_timeout", "closing idle connection %s after %gs",
                                         _peer(self.addr), server.idle_timeout)
                        self._error(p.encode_error(0, "idle_timeout", "IdleTimeout",
                                                   f"no data for {server.idle_timeout:g}s"))
                        return
                    if not data:
                        return  # EOF, or parked
                    reader.receive_data(data)
                # One job's worth at a time: each slice is dispatched (inline, usually)
                # before the next is decoded, so its memory is reused while still in cache.
                while frames := reader.frames(coalesce=JOB_EVENTS, max_events=JOB_EVENTS):
                    if not self._take(frames):
                        return
                # Fairness: recv only yields on EAGAIN, so a connection that always has
                # data would otherwise never let others run.
                eventlet.sleep(0)
        except ProtocolError as exc:
            server.counters["protocol_errors"] += 1
            server.limit_log("protocol", "closing %s: %s", _peer(self.addr), exc)
            # The frames before the bad one are answered first: a client that sees the
            # connection-level error gives up on whatever is still unanswered.
            self._wait_jobs(1, timeout=server.drain_timeout)
            self._error(p.encode_error(0, exc.code, type(exc).__name__, str(exc)))

    def _take(self, frames: list[p.Frame]) -> bool:
        """Account for and dispatch decoded frames; False when the connection must close."""
        server = self.server
        server.dispatcher.stats.events_in += sum(
            len(f.body) for f in frames if f.kind in p.EVENT_KINDS)
        if any(f.kind == p.HELLO for f in frames):
            frames = [f for f in frames if f.kind != p.HELLO]
        self.replies_pending += sum(1 for f in frames if f.corr)
        if self.replies_pending > server.max_pending_replies:
            server.counters["overloaded_closed"] += 1
            server.limit_log("overloaded", "closing %s: more than %d responses pending",
                             _peer(self.addr), server.max_pending_replies)
            self._error(p.encode_error(
                0, "overloaded", "TooManyPending",
                f"more than max_pending_replies={server.max_pending_replies} "
                "responses outstanding; read them before sending more"))
            return False
        if frames:
            self._dispatch(frames)
        return True

    def _error(self, data: bytes) -> None:
        """Send a connection-level ERROR frame and mark the connection for closing."""
        self.closing = True
        try:
            self.write(data)
        except Exception:  # best effort: the peer may be gone already
            pass


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


def _encode_result(result: Result) -> bytes:
    frame, failure = result.frame, result.failure
    if failure is not None:
        return p.encode_error(frame.corr, failure.code, failure.type, failure.message)
    if frame.kind == p.REQUEST:
        try:
            return p.encode_reply(frame.corr, result.value)
        except (TypeError, ValueError, OverflowError) as exc:
            return p.encode_error(frame.corr, "handler_error", "TypeError",
                                  f"the processor's return value cannot be sent: {exc}")
    return p.encode_pong(frame.corr) if frame.kind == p.PING else p.encode_ack(frame.corr)


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


class Server:
    """A single-process evserver: one listener, one hub, one dispatcher.

    ``start()`` binds and returns; ``serve_forever()`` blocks until ``stop()`` (or SIGTERM/
    SIGINT when ``install_signals`` is used) has drained everything.
    """

    def __init__(
        self,
        app: App,
        *,
        host: str = "127.0.0.1",
        port: int = 7878,
        pool_size: int = 64,
        queue_size: int = 256,
        max_frame_bytes: int = p.DEFAULT_MAX_FRAME_BYTES,
        drain_timeout: float = 30.0,
        max_connections: int = 10000,
        idle_timeout: float = 300.0,
        park_after: float = 2.0,
        max_pending_replies: int = 1024,
        reuse_port: bool = False,
        backlog: int = 1024,
        handler_defaults: dict[str, Any] | None = None,
        dead_letters: DeadLetterStore | None = None,
        auth: Authenticator | None = None,
        ssl_context: Any = None,
        handshake_timeout: float = 10.0,
        debug: bool = False,
        forward: ForwardSettings | None = None,
        cluster: ClusterSettings | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.drain_timeout = drain_timeout
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.park_after = park_after
        self.max_pending_replies = max_pending_replies
        self.reuse_port = reuse_port
        self.backlog = backlog
        self.dead_letters = dead_letters
        # Jobs one connection may have queued or running: half the pool, so one busy
        # connection can keep many slow handlers running while others still find workers;
        # the bounded queue caps the total whatever the number of connections.
        self.jobs_per_connection = max(4, pool_size // 2)
        self.dispatcher = Dispatcher(app, pool_size=pool_size, queue_size=queue_size,
                                     handler_defaults=handler_defaults,
                                     dead_letters=dead_letters)
        self.dispatcher.debug = debug
        # Where connections hand their jobs: the dispatcher, or in cluster mode the node's
        # edge, which appends them to Redis (the owned partitions feed the dispatcher).
        self.intake: Dispatcher | Any = self.dispatcher
        self.cluster_settings = cluster
        self.cluster: Node | None = None
        # Security (evserver.handshake): with neither, a connection costs exactly as before.
        self.auth = auth
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.secure = auth is not None or ssl_context is not None
        self.auth_failures = FailureLog(logging.getLogger("evserver.security"))
        self.connections: set[StreamConnection] = set()
        self.counters: dict[str, int] = {
            "connections_total": 0, "protocol_errors": 0, "idle_closed": 0,
            "overloaded_closed": 0, "refused_connections": 0,
            "auth_failures": 0, "handshake_timeouts": 0, "tls_failures": 0,
        }
        self.stopping = False
        self._peer_log = LogBudget()
        self.started_at = 0.0
        self.hello_info = {"server": f"evserver/{__version__}", "max_frame_bytes": max_frame_bytes}
        self.hello = p.encode_hello(self.hello_info)
        self._listener: Any = None
        self._accepter: Any = None
        self.forward: ForwardListener | None = None  # the Fluentd Forward listener, if any
        if forward is not None:
            from .forward_server import ForwardListener  # it builds on this module

            self.forward = ForwardListener(self, forward)
        self._stopped = eventlet.event.Event()
        self._drained = eventlet.event.Event()
        self._stop_started = False

    @classmethod
    def from_config(cls, app: App, cfg: Any, **overrides: Any) -> Server:
        """Build a server from a loaded ``Config``'s tables."""
        from .cluster import ClusterSettings
        from .forward_server import ForwardSettings

        srv = cfg.server
        kwargs: dict[str, Any] = dict(
            host=srv.host, port=srv.port, pool_size=srv.pool_size, queue_size=srv.queue_size,
            max_frame_bytes=srv.max_frame_bytes, drain_timeout=srv.drain_timeout,
            max_connections=srv.max_connections, idle_timeout=srv.idle_timeout,
            park_after=srv.park_after,
            max_pending_replies=srv.max_pending_replies,
            handler_defaults={"timeout": cfg.handlers.timeout, "retries": cfg.handlers.retries,
                              "backoff": cfg.handlers.backoff},
            dead_letters=DeadLetterStore(cfg.dead_letters.path,
                                         fsync_interval=cfg.dead_letters.fsync_interval),
            **security_options(cfg),
            forward=ForwardSettings.from_config(cfg),
            cluster=ClusterSettings.from_config(cfg),
        )
        kwargs.update(overrides)
        return cls(app, **kwargs)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); useful with ``port=0``."""
        return self._listener.getsockname()[:2]

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = eventlet.listen(
            (self.host, self.port), family=family, backlog=self.backlog,
            reuse_port=self.reuse_port,
        )
        if self.ssl_context is not None:
            self._listener = self.ssl_context.wrap_socket(self._listener, server_side=True)
        self.started_at = time.time()
        self.dispatcher.start()
        if self.cluster_settings is not None:
            self._join_cluster(self.cluster_settings)
        self._accepter = eventlet.spawn(self.accept_loop, self._listener, Connection)
        if self.forward is not None:
            self.forward.start()
        if self.dead_letters is not None and self.dead_letters.fsync_interval > 0:
            eventlet.spawn_n(self._sync_dead_letters, self.dead_letters)
        if self.park_after > 0:
            eventlet.spawn_n(self._sweep)
        log.info("listening on %s:%d (pool %d)", *self.address, self.dispatcher.pool_size)

    def _join_cluster(self, settings: ClusterSettings) -> None:
        """Become a node (ClusterError if Redis is unusable); dead letters go to the
        cluster's stream, so every node and the CLI see one list."""
        from .cluster.node import Node

        node = Node(self, settings)
        try:
            node.start()
        except BaseException:
            self._listener.close()
            self.dispatcher.stop(timeout=1.0)
            raise
        self.cluster = node
        self.intake = node.edge
        self.dispatcher.dead_letters = cast(Any, node.dead_letters)  # the file store's API

    def accept_loop(self, listener: Any, conn_type: type[StreamConnection]) -> None:
        """Accept sockets on ``listener`` (of any protocol) until stopping."""
        while not self.stopping:
            try:
                sock, addr = listener.accept()
            except OSError as exc:
                if self.stopping:
                    return
                # EMFILE and friends: back off instead of spinning; keep serving.
                log.warning("accept failed: %s", exc)
                eventlet.sleep(0.1)
                continue
            self.counters["connections_total"] += 1
            if len(self.connections) >= self.max_connections:
                self.counters["refused_connections"] += 1
                self.limit_log("max_connections", "refusing %s: at max_connections=%d",
                               _peer(addr), self.max_connections)
                eventlet.spawn_n(conn_type.refuse, sock, self.max_connections)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.idle_timeout:
                sock.settimeout(self.idle_timeout)
            conn = conn_type(self, sock, addr)
            self.connections.add(conn)
            conn.start()

    def _sync_dead_letters(self, store: DeadLetterStore) -> None:
        """Batched fsync: appends reach the OS at once, the disk within ``fsync_interval``."""
        while not self.stopping:
            eventlet.sleep(store.fsync_interval)
            try:
                store.maybe_sync()
            except OSError as exc:
                log.error("cannot fsync dead letters: %s", exc)

    def _sweep(self) -> None:
        """Park connections that went silent (``StreamConnection.sweep``)."""
        while not self.stopping:
            eventlet.sleep(self.park_after)
            now = time.monotonic()
            for conn in list(self.connections):
                try:
                    conn.sweep(now)
                except Exception:  # never let one connection stop the parking of all
                    log.exception("internal error while parking %s", _peer(conn.addr))

    def limit_log(self, kind: str, msg: str, *args: Any) -> None:
        """A warning about a misbehaving peer, at most a few per second per kind: a flood of
        bad connections must not become a flood of log lines."""
        if self._peer_log.allow(kind):
            log.warning(msg + "%s", *args, self._peer_log.suppressed_note(kind))

    def closed(self, conn: StreamConnection) -> None:
        self.connections.discard(conn)
        if self.stopping and not self.connections and not self._drained.ready():
            self._drained.send()

    def serve_forever(self) -> None:
        if self._listener is None:
            self.start()
        self._stopped.wait()

    def install_signals(self) -> None:
        """SIGTERM/SIGINT: graceful stop. The handler only schedules; it may run in the hub."""
        from ._eventlet import wake_hub_on_signals

        def handler(signum: int, frame: Any) -> None:
            eventlet.spawn_n(self.stop)

        wake_hub_on_signals()  # else the scheduled stop waits for the hub's next timer

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def stop(self) -> None:
        """Graceful stop: nothing acknowledged is lost; bounded by ``drain_timeout``."""
        if self._stop_started:
            self._stopped.wait()
            return
        self._stop_started = True
        self.stopping = True
        deadline = time.monotonic() + self.drain_timeout
        log.info("stopping: draining %d connection(s)", len(self.connections))
        if self._accepter is not None:
            self._accepter.kill()
        if self._listener is not None:
            self._listener.close()
        if self.forward is not None:
            self.forward.close()
        for conn in list(self.connections):
            # EOF for the reader; in-flight jobs still run and their responses still flush.
            try:
                shutdown_read(conn.sock)
            except OSError:
                pass
        if self.connections:
            with eventlet.Timeout(self.drain_timeout, False):
                self._drained.wait()
        ok = not self.connections
        for conn in list(self.connections):
            conn._abort("drain timeout")
        if self.cluster is not None:  # hand partitions over: finish, ack, release
            self.cluster.stop(timeout=max(0.1, deadline - time.monotonic()))
        ok = self.dispatcher.stop(timeout=max(0.1, deadline - time.monotonic())) and ok
        if not ok:
            log.warning("drain timeout (%gs) reached; abandoned unfinished work",
                        self.drain_timeout)
        if self.dead_letters is not None:
            self.dead_letters.close()
        log.info("stopped")
        self._stopped.send(ok)


__all__ = ["Connection", "Server", "StreamConnection"]
