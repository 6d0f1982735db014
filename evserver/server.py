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

import fcntl
import logging
import signal
import socket
import ssl
import struct
import termios
import time
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from . import __version__
from . import protocol as p
from ._eventlet import eventlet, wrap_server_socket
from .app import App
from .auth import Authenticator, new_nonce
from .connection import JOB_EVENTS, StreamConnection, accept_loop, peer_name
from .deadletters import DeadLetterStore
from .dispatch import Dispatcher, Job
from .errors import AuthError, ProtocolError
from .forward_server import ForwardListener, ForwardSettings
from .logs import LogBudget
from .reuseport import allow_migration
from .security import security_options
from .tls import shutdown_read

if TYPE_CHECKING:
    from .cluster import ClusterSettings
    from .cluster.node import Node
    from .connection import Intake

log = logging.getLogger("evserver.server")
security_log = logging.getLogger("evserver.security")

#: The largest frame (and about the most buffered input) accepted before authentication.
PRE_AUTH_MAX_BYTES = 4096
_UNREAD_GRACE = 0.5  # seconds a stop lets readers take bytes peers sent before it
_QUIET = 0.1  # ... until each connection has been silent this long


class _Closed(Exception):
    """The peer went away during the handshake."""


class _NoKey(AuthError):
    """The client did not try to authenticate: most likely it was not given the key."""


#: What a client that sent no proof at all is told. It reveals nothing the server's HELLO
#: (which announces the scheme) does not, and saves its operator a trip to the server log.
NO_KEY_HINT = ("authentication failed: this server requires a shared key and the client "
               "sent none (set EVSERVER_SHARED_KEY or pass --shared-key; --key-id names one "
               "of several keys)")


class Connection(StreamConnection):
    """One native-protocol connection: its frame reader and the replies it still owes.

    When TLS or keys are configured, the reader opens the connection first (``_open``):
    until the peer has proven itself it is held to ``PRE_AUTH_MAX_BYTES`` of buffered input
    and one absolute ``handshake_timeout`` for everything (a slow-loris peer trickling
    bytes gains nothing), and none of its frames reach the dispatcher: a failed or skipped
    handshake is an ERROR ``auth_failed`` (corr 0) and a close. The proofs themselves are
    ``evserver.auth``'s.
    """

    __slots__ = ("reader", "replies_pending")
    server: Server

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

    def job_done(self, job: Job) -> None:
        answers = []
        start = 0
        for frame in job.context:
            stop = start + len(frame.body) if frame.kind in p.EVENT_KINDS else start
            if frame.corr or frame.kind == p.PING:
                answers.append(_answer(frame, job, start, stop))
            start = stop
        try:
            if answers:
                self.replies_pending -= sum(1 for f in job.context if f.corr)
                self.write(b"".join(answers))
        finally:
            self._job_finished()  # whatever happened, the reader must not wait for this job

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
            if not resumed and (early := self._open()) is None:
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
                                         peer_name(self.addr), server.idle_timeout)
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
            server.limit_log("protocol", "closing %s: %s", peer_name(self.addr), exc)
            # The frames before the bad one are answered first: a client that sees the
            # connection-level error gives up on whatever is still unanswered.
            self._wait_jobs(1, timeout=server.drain_timeout)
            self._error(p.encode_error(0, exc.code, type(exc).__name__, str(exc)))

    # ------------------------------------------------------------------ opening

    def _open(self) -> bytes | None:
        """Run the TLS and auth handshakes; return the bytes the client pipelined behind
        its HELLO (to be decoded as ordinary frames), or None when the connection must be
        closed. ``ProtocolError`` (a malformed first frame) propagates to ``serve``."""
        server = self.server
        timer = eventlet.Timeout(server.handshake_timeout)
        try:
            rest = self._handshake()
        except eventlet.Timeout as exc:
            if exc is not timer:
                raise
            server.counters["handshake_timeouts"] += 1
            security_log.info("closing %s: no handshake within %gs", peer_name(self.addr),
                              server.handshake_timeout)
            if server.ssl_context is not None and self.sock.version() is None:
                return None  # no TLS session to send an ERROR frame through
            self._error(p.encode_error(0, "handshake_timeout", "HandshakeTimeout",
                                       f"handshake not completed within "
                                       f"{server.handshake_timeout:g}s"))
            return None
        except AuthError as exc:
            timer.cancel()
            server.counters["auth_failures"] += 1
            server.auth_log.warning(security_log, "auth", "authentication failed for %s: %s",
                                    peer_name(self.addr), str(exc))
            # The client learns no more than "no" (and whether it sent a key at all): which
            # key or field was wrong is for the log.
            message = NO_KEY_HINT if isinstance(exc, _NoKey) else "authentication failed"
            self._error(p.encode_error(0, AuthError.code, "AuthError", message))
            return None
        except ssl.SSLError as exc:
            timer.cancel()
            server.counters["tls_failures"] += 1
            security_log.info("TLS handshake with %s failed: %s", peer_name(self.addr),
                              exc.reason or exc)
            return None
        except _Closed:
            return None
        finally:
            timer.cancel()
        return rest

    def _handshake(self) -> bytes:
        server = self.server
        sock = self.sock
        if server.ssl_context is not None:
            sock.do_handshake()  # eventlet's accept() defers it to this green thread
        authenticator = server.auth
        if authenticator is None:
            sock.sendall(server.hello)
            return b""
        nonce = new_nonce()
        sock.sendall(p.encode_hello({**server.hello_info, **authenticator.hello_info(nonce)}))
        reader = p.FrameReader(p.SERVER_RECEIVES, max_frame_bytes=PRE_AUTH_MAX_BYTES)
        while (frame := reader.next_frame()) is None:
            data = sock.recv(PRE_AUTH_MAX_BYTES)
            if not data:
                raise _Closed
            reader.receive_data(data)
        if frame.kind != p.HELLO:
            raise _NoKey(f"first frame is {p.KIND_NAMES.get(frame.kind, frame.kind)}, "
                         "not an authenticating HELLO")
        if not isinstance(frame.body.get("auth"), dict):
            raise _NoKey("the client HELLO carries no auth map")
        key_id, reply = authenticator.verify(nonce, frame.body)
        sock.sendall(p.encode_hello(reply))
        security_log.debug("%s authenticated with key id %r", peer_name(self.addr), key_id)
        return reader.take_buffered()

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
                             peer_name(self.addr), server.max_pending_replies)
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


def _answer(frame: p.Frame, job: Job, start: int, stop: int) -> bytes:
    """The response a frame owes, from the outcome of its events ``start:stop`` in the job."""
    if frame.kind == p.PING:
        return p.encode_pong(frame.corr)
    failure = job.failure(start, stop)
    if failure is not None:
        return p.encode_error(frame.corr, failure.code, failure.type, failure.message)
    if frame.kind == p.REQUEST:
        try:
            return p.encode_reply(frame.corr, job.values.get(start))
        except Exception as exc:  # msgpack raises TypeError, ValueError, BufferError...
            return p.encode_error(frame.corr, "handler_error", "TypeError",
                                  f"the processor's return value cannot be sent: {exc}")
    return p.encode_ack(frame.corr)


def _unread(sock: Any) -> int:
    """Bytes received on ``sock`` and not read yet (0 once it is closed)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                                  b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


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
        self.dispatcher.outcomes.debug = debug
        # Where connections hand their jobs: the dispatcher, or in cluster mode the node's
        # edge, which appends them to Redis (the owned partitions feed the dispatcher).
        self.intake: Intake = self.dispatcher
        self.cluster_settings = cluster
        self.cluster: Node | None = None
        # Security (evserver.handshake): with neither, a connection costs exactly as before.
        self.auth = auth
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.secure = auth is not None or ssl_context is not None
        self.auth_log = LogBudget(per_interval=10, interval=60.0)  # failed handshakes
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
            self.forward = ForwardListener(self, forward)
        self._stopped = eventlet.event.Event()
        self._drained = eventlet.event.Event()
        self._stop_started = False

    @classmethod
    def from_config(cls, app: App, cfg: Any, **overrides: Any) -> Server:
        """Build a server from a loaded ``Config``'s tables."""
        from .cluster import ClusterSettings

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
        if self.reuse_port:  # a reload or a killed worker must not reset queued connections
            allow_migration(self._listener)
        if self.ssl_context is not None:
            self._listener = wrap_server_socket(self.ssl_context, self._listener)
        self.started_at = time.time()
        self.dispatcher.start()
        if self.cluster_settings is not None:
            self._join_cluster(self.cluster_settings)
        self._accepter = eventlet.spawn(accept_loop, self, self._listener,
                                        partial(Connection, self), Connection.refuse)
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
        # The file store's API; handler failures are recorded by the dispatcher's outcomes.
        self.dispatcher.dead_letters = self.dispatcher.outcomes.dead_letters = cast(
            Any, node.dead_letters)

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
                    log.exception("internal error while parking %s", peer_name(conn.addr))

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

    def _read_what_arrived(self) -> None:
        """Before reads stop: let readers take what peers sent, or are sending, right now.

        A connection accepted just before a reload has its first request in the kernel or
        on its way; shutting reads then would close it with unread data, which Linux
        answers with a reset. So reads go on until every connection has no unread bytes and
        has been quiet for ``_QUIET`` seconds, for at most ``_UNREAD_GRACE`` seconds (a peer
        that keeps sending, or that is held back by its unread replies, uses it all)."""
        end = time.monotonic() + _UNREAD_GRACE
        while (now := time.monotonic()) < end and any(
                now - c.last_active < _QUIET or _unread(c.sock) for c in list(self.connections)):
            eventlet.sleep(0.01)

    def stop(self) -> None:
        """Graceful stop: nothing acknowledged is lost; bounded by ``drain_timeout``."""
        if self._stop_started:
            self._stopped.wait()
            return
        self._stop_started = True
        deadline = time.monotonic() + self.drain_timeout
        log.info("stopping: draining %d connection(s)", len(self.connections))
        if self._accepter is not None:
            self._accepter.kill()
        if self._listener is not None:
            self._listener.close()
        if self.forward is not None:
            self.forward.close()
        self._read_what_arrived()  # readers still read: ``stopping`` ends their loops
        self.stopping = True
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
