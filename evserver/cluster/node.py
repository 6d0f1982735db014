"""One cluster node: the edge, the owned partitions, the acker and the ownership loop.

A ``Server`` with ``[cluster] enabled`` builds one ``Node`` and hands every job to its edge
instead of its dispatcher; the owned partitions feed the dispatcher instead. Every worker
process of ``--workers N`` is a node of its own.

Stopping (SIGTERM, a HUP reload's retiring workers) hands partitions over cleanly: the
connections drain first (their answers still come through the inbox), then each partition
stops reading, finishes and acknowledges its in-flight entries and releases its lease, and
the node leaves the heartbeat set, so the other nodes take over at their next tick instead
of after a lease.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

from .._eventlet import eventlet
from ..errors import ClusterError
from ..logs import LogBudget
from ..metrics import CLUSTER_COUNTERS
from . import codec, housekeeping
from .deadletters import StreamDeadLetters
from .edge import Edge
from .keys import Keys
from .leases import HEARTBEAT, RELEASE, RENEW, assigned
from .owner import FENCED, RUNNING, Acker, PartitionOwner, Reader

if TYPE_CHECKING:
    from .host import ServerView

log = logging.getLogger("evserver.cluster")

# A node stops acting on a partition this share of a lease before the lease expires in
# Redis, so the clocks of Redis and the node may drift apart by that much.
FENCE_MARGIN = 0.2
INBOX_TTL = 600.0  # seconds an inbox outlives its node (replies to it are then dropped)
HOUSEKEEPING_EVERY = 5.0  # seconds between trims of the owned partitions



def connect(url: str, max_connections: int) -> Any:
    """A redis-py client for a green process: short blocking reads (the owner loops block
    for 0.5 s at most) under a longer socket timeout, and no hidden retries: every loop
    here retries on its own terms."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=10, socket_timeout=5.0,
        socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))
    return redis.Redis(connection_pool=pool)


class Node:
    def __init__(self, server: ServerView, settings: Any) -> None:
        """``settings`` is the config's ``[cluster]`` table, taken whole."""
        import redis

        self.server = server
        self.settings = settings
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.keys = Keys(settings.name)
        self.redis = connect(settings.url, settings.partitions + 128)
        self.redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.lease_ms = int(settings.lease * 1000)
        self.period = min(1.0, settings.lease / 4)
        self.counters = dict.fromkeys(CLUSTER_COUNTERS, 0)
        self.live: list[str] = []
        self.owners: dict[int, PartitionOwner] = {}
        self.edge = Edge(self)
        self.acker = Acker(self)
        self.reader = Reader(self, self.owners)
        self.dead_letters = StreamDeadLetters(self.redis, self.keys.dead)
        self.inbox = self.keys.inbox(self.id)
        self.stopping = False
        self._heartbeat = self.redis.register_script(HEARTBEAT)
        self._renew = self.redis.register_script(RENEW)
        self._release = self.redis.register_script(RELEASE)
        self._log = LogBudget()
        self._glets: list[Any] = []
        self._inbox_from = "0-0"
        self._last_housekeeping = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Check the cluster's stored settings, join, take partitions; ClusterError if Redis
        cannot be reached or disagrees."""
        try:
            housekeeping.check_partitions(self.redis, self.keys, self.settings.partitions)
            housekeeping.create_groups(self.redis, self.keys, self.settings.partitions)
            self._open_inbox()
            self.acker.start()
            self.edge.start()
            self.reader.start()
            self._tick()
        except self.redis_errors as exc:
            raise ClusterError(f"cannot use the cluster's Redis at {self.settings.url}: "
                               f"{exc}") from None
        self._glets = [eventlet.spawn(self._tick_loop), eventlet.spawn(self._read_inbox)]
        log.info("cluster node %s joined %r: %d node(s), owns %d of %d partitions", self.id,
                 self.settings.name, len(self.live), len(self.owners), self.settings.partitions)

    def stop(self, timeout: float) -> None:
        """Hand every partition over, leave, and answer what still waits (bounded)."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        for owner in list(self.owners.values()):
            owner.hand_over()
        while self.owners and time.monotonic() < deadline:
            eventlet.sleep(0.01)  # owners end within one blocking read (0.5 s) plus drain
        self.reader.stop()
        self.acker.stop()
        self.edge.stop()
        for glet in self._glets:
            glet.kill()
        try:
            self._heartbeat(keys=[self.keys.nodes], args=[self.id, self.lease_ms, "leave"])
            self.redis.delete(self.inbox)
        except self.redis_errors as exc:
            self.log_error("leave", "cannot leave the cluster cleanly: %s", exc)
        self.edge.fail_all("the node stopped before the cluster answered")
        self.redis.connection_pool.disconnect()
        log.info("cluster node %s left", self.id)

    # ------------------------------------------------------------------ ownership

    def _tick_loop(self) -> None:
        while not self.stopping:
            eventlet.sleep(self.period)  # the heartbeat period, not a wait for an outcome
            if self.stopping:
                return
            try:
                self._tick()
            except self.redis_errors as exc:
                self.log_error("tick", "cannot renew leases: %s", exc)

    def _tick(self) -> None:
        """Heartbeat, renew what we hold, hand over what another node should own, take what
        we should own and nobody holds."""
        sent = time.monotonic()
        deadline = sent + self.settings.lease * (1 - FENCE_MARGIN)
        live = self._heartbeat(keys=[self.keys.nodes], args=[self.id, self.lease_ms, ""])
        self.live = [_text(n) for n in live]
        want = set() if self.stopping else assigned(self.id, self.live, self.settings.partitions)
        held = [o for o in self.owners.values() if o.state != FENCED]
        if held:
            pipe = self.redis.pipeline(transaction=False)
            for owner in held:
                self._renew(keys=[self.keys.lease(owner.partition)],
                            args=[self.id, self.lease_ms], client=pipe)
            for owner, ok in zip(held, pipe.execute(), strict=True):
                if ok:
                    owner.deadline = deadline
                else:
                    owner.fence("its lease was lost")
        for owner in held:
            if owner.partition not in want:
                owner.hand_over()
        free = sorted(p for p in want if p not in self.owners)
        if free:
            pipe = self.redis.pipeline(transaction=False)
            for p in free:
                pipe.set(self.keys.lease(p), self.id, nx=True, px=self.lease_ms)
            for p, ok in zip(free, pipe.execute(), strict=True):
                if ok and not self.stopping:
                    self.owners[p] = PartitionOwner(self, p, deadline)
                    self.count("partitions_acquired")
        if sent - self._last_housekeeping >= HOUSEKEEPING_EVERY:
            self._last_housekeeping = sent
            housekeeping.trim(self.redis, [o.stream for o in self.owners.values()
                                           if o.state == RUNNING])
            if not self.redis.expire(self.inbox, int(INBOX_TTL)):
                self._open_inbox()  # Redis lost it (restarted without persistence)
        # What the inbox reader has read is done with: keep the inbox short (once a tick,
        # not once a read: a round trip per read would cost as much as the read).
        self.redis.xtrim(self.inbox, minid=self._inbox_from)

    def owner_ended(self, owner: PartitionOwner) -> None:
        if self.owners.get(owner.partition) is owner:
            del self.owners[owner.partition]

    def release(self, partition: int) -> None:
        self._release(keys=[self.keys.lease(partition)], args=[self.id])
        self.count("partitions_released")

    # ------------------------------------------------------------------ the inbox

    def _open_inbox(self) -> None:
        self._inbox_from = _text(self.redis.xadd(self.inbox, {b"open": b"1"}))
        self.redis.expire(self.inbox, int(INBOX_TTL))

    def _read_inbox(self) -> None:
        failures = 0
        while True:
            try:
                answer = self.redis.xread({self.inbox: self._inbox_from}, count=1024, block=500)
                failures = 0
            except self.redis_errors as exc:
                failures += 1
                self.log_error("inbox", "cannot read the inbox: %s", exc)
                eventlet.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))  # a backoff
                continue
            for _key, entries in answer or ():
                for eid, fields in entries:
                    self._inbox_from = _text(eid)
                    raw = fields.get(codec.FIELD)
                    if raw is None:
                        continue
                    try:
                        self.edge.on_reply(*codec.decode_reply(raw))
                    except Exception:
                        log.exception("bad report in the inbox: %r", raw[:200])

    # ------------------------------------------------------------------ reporting

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def log_error(self, kind: str, msg: str, *args: Any) -> None:
        """A Redis problem, logged a few times a second per kind at most."""
        self.counters["redis_errors"] += 1
        if self._log.allow(kind):
            log.error(msg + "%s", *args, self._log.suppressed_note(kind))

    def stats(self) -> dict[str, int]:
        return {**self.counters, "partitions_owned": len(self.owners),
                "nodes_live": len(self.live), "waiting_jobs": self.edge.waiting}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
