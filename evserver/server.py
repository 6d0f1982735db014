"""A single-process evserver: one hub, one dispatcher, its listeners, and the shutdown order.

``Server`` binds the native listener (and, with ``[forward] enabled``, the Forward one,
``forward_server``), each accepting through the one connection driver
(``accept.accept_loop``) with its sans-I/O protocol (``native``, ``forward_session``).
It takes the config's tables whole and owns what every connection shares: the counters,
the limits, the dispatcher (or the cluster node's intake), the TLS context and the keys.

Shutdown order (nameko's): stop accepting -> stop reading -> let in-flight jobs finish and
their responses flush -> close -> stop the workers; bounded by ``drain_timeout``.
"""

from __future__ import annotations

import fcntl
import logging
import signal
import socket
import struct
import termios
import time
from typing import TYPE_CHECKING, Any, cast

from . import __version__
from ._eventlet import eventlet, use_precise_hub, wrap_server_socket
from .accept import accept_loop
from .app import App
from .auth import Authenticator
from .config import Config, default_config, handler_defaults
from .connection import JOB_EVENTS, Connection, read_buffer
from .deadletters import DeadLetterStore
from .dispatch import Dispatcher
from .forward_server import ForwardListener
from .logs import LogBudget
from .metrics import new_counters
from .native import NativeProtocol
from .reuseport import allow_migration
from .security import configured_keys
from .tls import context_from_config, shutdown_read

if TYPE_CHECKING:
    from .cluster.node import Node
    from .connection import Intake

log = logging.getLogger("evserver.server")

BACKLOG = 1024  # connections the kernel queues for accept, per listener
_UNREAD_GRACE = 0.5  # seconds a stop lets readers take bytes peers sent before it
_QUIET = 0.1  # ... until each connection has been silent this long


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

    def __init__(self, app: App, cfg: Config | None = None, *,
                 dead_letters: DeadLetterStore | None = None, reuse_port: bool = False) -> None:
        """Serve ``app`` with the settings of ``cfg`` (every default when None), taken whole
        from its tables. ``dead_letters`` is where failed events go (``from_config`` opens
        the configured store; None keeps none); ``reuse_port`` lets worker processes share
        the port."""
        cfg = cfg or default_config()
        self.app = app
        self.cfg = cfg
        srv = cfg.server
        self.host, self.port = srv.host, srv.port
        self.max_frame_bytes: int = srv.max_frame_bytes
        self.drain_timeout: float = srv.drain_timeout
        self.max_connections: int = srv.max_connections
        self.idle_timeout: float = srv.idle_timeout
        self.park_after: float = srv.park_after
        self.max_pending_replies: int = srv.max_pending_replies
        self.handshake_timeout: float = cfg.security.handshake_timeout
        self.reuse_port = reuse_port
        self.backlog = BACKLOG
        self.dead_letters = dead_letters
        # Jobs one connection may have queued or running: half the pool, so one busy
        # connection can keep many slow handlers running while others still find workers;
        # the bounded queue caps the total whatever the number of connections.
        self.jobs_per_connection = max(4, srv.pool_size // 2)
        self.dispatcher = Dispatcher(app, pool_size=srv.pool_size, queue_size=srv.queue_size,
                                     handler_defaults=handler_defaults(cfg),
                                     dead_letters=dead_letters)
        self.dispatcher.outcomes.debug = cfg.security.debug
        # Where connections hand their jobs: the dispatcher, or in cluster mode the node's
        # edge, which appends them to Redis (the owned partitions feed the dispatcher).
        self.intake: Intake = self.dispatcher
        self.cluster: Node | None = None
        # Security: with neither, a connection costs exactly as before.
        keys = configured_keys(cfg)
        self.auth = Authenticator(keys) if keys else None
        self.ssl_context = context_from_config(cfg.tls)
        self.auth_log = LogBudget(per_interval=10, interval=60.0)  # failed handshakes
        self.read_buffer = read_buffer()
        self.connections: set[Connection] = set()
        self.counters = new_counters("server")
        self.stopping = False
        self._peer_log = LogBudget()
        self.started_at = 0.0
        self.hello_info = {"server": f"evserver/{__version__}",
                           "max_frame_bytes": self.max_frame_bytes}
        self._listener: Any = None
        self._accepter: Any = None
        self.forward: ForwardListener | None = None  # the Fluentd Forward listener, if any
        if cfg.forward.enabled:
            self.forward = ForwardListener(self, cfg.forward)
        self._stopped = eventlet.event.Event()
        self._drained = eventlet.event.Event()
        self._stop_started = False

    @classmethod
    def from_config(cls, app: App, cfg: Config, *, reuse_port: bool = False) -> Server:
        """A server for ``cfg`` with its dead-letter store: what ``evserver serve`` runs."""
        dl = cfg.dead_letters
        return cls(app, cfg, reuse_port=reuse_port,
                   dead_letters=DeadLetterStore(dl.path, fsync_interval=dl.fsync_interval))

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); useful with ``port=0``."""
        return self._listener.getsockname()[:2]

    def start(self) -> None:
        use_precise_hub()  # in the thread that will serve, if its hub has not started yet
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
        if self.cfg.cluster.enabled:
            self._join_cluster()
        self._accepter = eventlet.spawn(accept_loop, self, self._listener, self._native,
                                        NativeProtocol.refusal)
        if self.forward is not None:
            self.forward.start()
        if self.dead_letters is not None and self.dead_letters.fsync_interval > 0:
            eventlet.spawn_n(self._sync_dead_letters, self.dead_letters)
        if self.park_after > 0:
            eventlet.spawn_n(self._sweep)
        log.info("listening on %s:%d (pool %d)", *self.address, self.dispatcher.pool_size)

    def _native(self, peer: str) -> NativeProtocol:
        """The protocol object of one native connection."""
        return NativeProtocol(hello_info=self.hello_info, max_frame_bytes=self.max_frame_bytes,
                              max_pending_replies=self.max_pending_replies, auth=self.auth,
                              counters=self.counters, job_events=JOB_EVENTS, peer=peer)

    def _join_cluster(self) -> None:
        """Become a node (ClusterError if Redis is unusable); dead letters go to the
        cluster's stream, so every node and the CLI see one list."""
        from .cluster.node import Node

        node = Node(self, self.cfg.cluster)
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
        """Park connections that went silent (``Connection.sweep``)."""
        while not self.stopping:
            eventlet.sleep(self.park_after)
            now = time.monotonic()
            for conn in list(self.connections):
                try:
                    conn.sweep(now)
                except Exception:  # never let one connection stop the parking of all
                    log.exception("internal error while parking %s", conn.protocol.peer)

    def limit_log(self, kind: str, msg: str, *args: Any) -> None:
        """A warning about a misbehaving peer, at most a few per second per kind: a flood of
        bad connections must not become a flood of log lines."""
        if self._peer_log.allow(kind):
            log.warning(msg + "%s", *args, self._peer_log.suppressed_note(kind))

    def closed(self, conn: Connection) -> None:
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


__all__ = ["Server"]
