"""The owner side: a ``PartitionOwner`` per owned partition, one ``Reader`` and one
``Acker`` per node.

An owner first takes over its partition's pending entries (those a previous owner read but
never acknowledged), oldest first; then the node's Reader reads its new ones, together with
every other partition's, in one XREADGROUP. Each entry becomes one job
for the node's ordinary ``Dispatcher``, so ordering, retries, timeouts, listeners and dead
letters behave exactly as on one machine; entries are submitted in stream order, which is
the order the dispatcher's ``ordered_by`` tickets keep.

An entry is XACKed only after its job completed (processor and every listener), and only
while this node still holds the partition: **fencing**. Every lease renewal sets a local
deadline (renewal sent + lease - margin); past it the loop stops reading and nothing more of
the partition is acknowledged, so its next owner runs those entries again (at least once).

An entry delivered more than ``max_deliveries`` times (its handler keeps killing the
process, say) is moved to the dead-letter stream without being run, so it cannot block its
partition forever.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

from .._eventlet import eventlet
from ..dispatch import Job
from . import codec
from .host import NodeView
from .keys import GROUP
from .loop import GreenLoop

log = logging.getLogger("evserver.cluster")

READ_COUNT = 64  # entries per XREADGROUP
READ_BLOCK_MS = 500  # keep blocking reads short: redis-py's socket timeout must exceed them
MAX_IN_FLIGHT = 128  # entries of one partition submitted and not yet completed
RUNNING, HANDOVER, FENCED = "running", "handover", "fenced"


class PartitionOwner:
    """The consumer loop of one partition this node holds the lease of."""

    def __init__(self, node: NodeView, partition: int, deadline: float) -> None:
        self.node = node
        self.partition = partition
        self.stream = node.keys.stream(partition)
        self.deadline = deadline  # time.monotonic() past which we may no longer act
        self.state = RUNNING
        self.in_flight = 0
        self.reading = False  # recovered: the node's Reader reads its new entries
        self._room: Any = None  # an Event while the loop waits for in-flight entries
        self._changed: Any = eventlet.event.Event()  # fenced or handed over
        self.glet = eventlet.spawn(self._run)

    @property
    def readable(self) -> bool:
        """Should the node's Reader ask for this partition's new entries now?"""
        return (self.reading and self.state == RUNNING and self.in_flight < MAX_IN_FLIGHT
                and self.valid())

    def valid(self) -> bool:
        """May this node still run and acknowledge the partition's entries?"""
        if self.state == FENCED:
            return False
        if time.monotonic() >= self.deadline:
            self.fence("its lease deadline passed without a renewal")
            return False
        return True

    def fence(self, why: str) -> None:
        if self.state != FENCED:
            self.state = FENCED
            self.node.count("partitions_lost")
            log.warning("partition %d: stopped working it: %s", self.partition, why)
            self._wake()

    def hand_over(self) -> None:
        """Stop reading; finish and acknowledge what is in flight, then release the lease."""
        if self.state == RUNNING:
            self.state = HANDOVER
            self._wake()

    def _wake(self) -> None:
        if not self._changed.ready():
            self._changed.send()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        """Recover the pending entries, then leave new ones to the node's Reader until the
        partition is handed over or lost; then finish."""
        node = self.node
        try:
            failures = 0
            while self.state == RUNNING and self.valid() and not self.reading:
                try:
                    self._recover()
                    self.reading = self.state == RUNNING
                except node.redis_errors as exc:
                    failures += 1
                    node.log_error("read", "partition %d: %s", self.partition, exc)
                    eventlet.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))  # a backoff
            while self.state == RUNNING and self.valid():
                # Woken by a hand-over or a fence; the timeout re-checks the lease deadline.
                with eventlet.Timeout(READ_BLOCK_MS / 1000, False):
                    self._changed.wait()
            self.reading = False
            node.reader.wait_done(self.stream)  # entries it is reading for us are taken
            self._finish()
        finally:
            node.owner_ended(self)

    def _recover(self) -> None:
        """Claim and run the partition's pending entries, oldest first."""
        node = self.node
        start = "-"
        while self.state == RUNNING and self.valid():
            rows = node.redis.xpending_range(self.stream, GROUP, min=start, max="+",
                                             count=READ_COUNT)
            if not rows:
                return
            ids = [row["message_id"] for row in rows]
            counts = {row["message_id"]: row["times_delivered"] for row in rows}
            claimed = node.redis.xclaim(self.stream, GROUP, node.id, 0, ids)
            present = set()
            for eid, fields in claimed:
                if fields:
                    present.add(eid)
                    self._wait_room()
                    self._take(eid, fields, counts[eid] + 1)
            gone = [eid for eid in ids if eid not in present]
            if gone:  # trimmed away while pending: nothing left to run
                node.redis.xack(self.stream, GROUP, *gone)
            start = "(" + _text(ids[-1])

    def _wait_room(self) -> None:
        """While recovering: wait until fewer than MAX_IN_FLIGHT entries are in flight."""
        while self.in_flight >= MAX_IN_FLIGHT and self.state != FENCED:
            self._room = eventlet.event.Event()
            self._room.wait()

    def _finish(self) -> None:
        """After the loop: let in-flight entries complete; release the lease unless fenced."""
        node = self.node
        deadline = time.monotonic() + node.server.drain_timeout
        while self.in_flight and time.monotonic() < deadline and self.state != FENCED:
            self._room = eventlet.event.Event()
            with eventlet.Timeout(max(0.0, deadline - time.monotonic()), False):
                self._room.wait()
        if self.state == FENCED or self.in_flight:
            return
        node.acker.barrier()  # our acks are in Redis before another node may claim
        try:
            node.release(self.partition)
        except node.redis_errors as exc:  # the lease then simply expires
            node.log_error("release", "partition %d: cannot release: %s", self.partition, exc)

    # ------------------------------------------------------------------ entries

    def _take(self, eid: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        node = self.node
        if not self.valid():
            return  # left pending for the next owner
        try:
            entry = codec.decode_entry(fields[codec.FIELD], f"{self.partition}:{_text(eid)}")
        except Exception as exc:  # not ours, or corrupted: nothing could ever run it
            node.dead_letters.entry_undecodable(self.stream, eid, fields, exc)
            node.acker.ack(self.stream, eid, None, None)
            return
        if deliveries > node.settings.max_deliveries:
            node.dead_letters.poison(entry.events, self.partition, deliveries)
            node.count("dead_lettered_events", len(entry.events))
            failure = ("dead_lettered", "PoisonEvent",
                       f"delivered {deliveries} times without completing; dead-lettered")
            outcomes: list[codec.Outcome] = [
                (index, failure, None)
                for index, want in zip(entry.indexes, entry.wants, strict=True) if want]
            node.acker.ack(self.stream, eid, entry.origin,
                           (entry.token, self.partition, outcomes) if outcomes else None)
            return
        if deliveries > 1:
            node.count("redelivered_events", len(entry.events))
        self.in_flight += 1
        requests = frozenset(i for i, want in enumerate(entry.wants) if want == codec.REPLY) \
            if codec.REPLY in entry.wants else _NO_REQUESTS
        node.server.dispatcher.submit(Job(self, entry.events, requests, (eid, entry)))

    def job_done(self, job: Job) -> None:
        """An entry's job completed (the dispatcher's ``Sink``): acknowledge the entry and
        report its failures and reply values to the edge that appended it."""
        node = self.node
        eid, entry = job.context
        self.in_flight -= 1
        if self._room is not None and (self.in_flight < MAX_IN_FLIGHT or not self.in_flight):
            room, self._room = self._room, None
            room.send()
        node.count("processed_entries")
        node.count("processed_events", len(entry.events))
        if not self.valid():
            node.count("fenced_entries")
            return
        node.acker.ack(self.stream, eid, entry.origin,
                       (entry.token, self.partition, _outcomes(job, entry))
                       if entry.wanted else None)


_NO_REQUESTS: frozenset[int] = frozenset()


def _outcomes(job: Job, entry: codec.Entry) -> list[codec.Outcome]:
    """What the edge needs of an entry's events: the failed ones and the requests' values
    (by the edge's index); an event missing from the list succeeded."""
    if not job.failures and job.broken is None and codec.REPLY not in entry.wants:
        return []  # the usual case: all ran, nothing to say but that
    outcomes: list[codec.Outcome] = []
    for i, (event, index, want) in enumerate(zip(entry.events, entry.indexes, entry.wants,
                                                 strict=True)):
        if not want:
            continue
        failure = job.failures.get(id(event)) or job.broken
        if failure is not None:
            outcomes.append((index, (failure.code, failure.type, failure.message), None))
        elif want == codec.REPLY:
            outcomes.append((index, None, job.values.get(i)))
    return outcomes


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Reader(GreenLoop):
    """Reads new entries of every partition the node owns with one XREADGROUP over all
    their streams, so a busy node pays one round trip for entries of many partitions
    (a loop per partition paid one per entry). A partition with MAX_IN_FLIGHT entries in
    flight is left out of the next read: its backpressure."""

    def __init__(self, node: NodeView, owners: dict[int, PartitionOwner]) -> None:
        self.node = node
        self.owners = owners
        self.current: frozenset[str] = frozenset()  # the streams of the read in progress
        self._round: Any = eventlet.event.Event()  # sent when that read's entries are taken

    def wait_done(self, stream: str) -> None:
        """Until no read in progress includes ``stream`` (bounded: reads block 0.5 s)."""
        for _ in range(10):
            if stream not in self.current:
                return
            with eventlet.Timeout(READ_BLOCK_MS / 1000 * 4, False):
                self._round.wait()

    def _run(self) -> None:
        node = self.node
        failures = 0
        while True:
            readable = {o.stream: o for o in list(self.owners.values()) if o.readable}
            if not readable:
                eventlet.sleep(0.05)  # a poll interval: no partition to read yet
                continue
            self.current = frozenset(readable)
            try:
                answer = node.redis.xreadgroup(GROUP, node.id, dict.fromkeys(readable, ">"),
                                               count=READ_COUNT, block=READ_BLOCK_MS)
                failures = 0
                for stream, entries in answer or ():
                    owner = readable[_text(stream)]
                    for eid, fields in entries:
                        owner._take(eid, fields, 1)
            except node.redis_errors as exc:
                failures += 1
                node.log_error("read", "cannot read partitions: %s", exc)
                eventlet.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))  # a backoff
            finally:
                self.current = frozenset()
                done, self._round = self._round, eventlet.event.Event()
                done.send()


class Acker(GreenLoop):
    """Acknowledges completed entries and sends their reports, batched: one pipeline for
    everything completed since the last one. A report for this node's own edge skips Redis."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.queue: Any = eventlet.queue.LightQueue()

    def ack(self, stream: str, eid: bytes, origin: str | None,
            report: codec.Report | None) -> None:
        """Queue an entry's XACK and, if its edge waits for one, its report."""
        data = None
        if report is not None and origin == self.node.id:
            self.node.edge.on_reply(*report)
        elif report is not None and origin is not None:
            data = (self.node.keys.inbox(origin), codec.encode_reply(*report))
        self.queue.put((stream, eid, data))

    def barrier(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before now is in Redis."""
        done = eventlet.event.Event()
        self.queue.put(done)
        with eventlet.Timeout(timeout, False):
            done.wait()
            return True
        return False

    def stop(self) -> None:
        self.barrier()
        super().stop()

    def _run(self) -> None:
        node = self.node
        while True:
            batch = [self.queue.get()]
            while not self.queue.empty() and len(batch) < 4096:
                batch.append(self.queue.get_nowait())
            failures = 0
            while True:
                try:
                    self._flush(batch)
                    break
                except node.redis_errors as exc:
                    failures += 1
                    node.log_error("ack", "cannot acknowledge entries: %s", exc)
                    eventlet.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))  # a backoff

    def _flush(self, batch: list[Any]) -> None:
        node = self.node
        acks: defaultdict[str, list[bytes]] = defaultdict(list)
        barriers = []
        pipe = node.redis.pipeline(transaction=False)
        for item in batch:
            if isinstance(item, tuple):
                stream, eid, data = item
                acks[stream].append(eid)
                if data is not None:  # nomkstream: the inbox of a node gone for good expired
                    pipe.xadd(data[0], {codec.FIELD: data[1]}, maxlen=100_000,
                              approximate=True, nomkstream=True)
            else:
                barriers.append(item)
        for stream, ids in acks.items():
            pipe.xack(stream, GROUP, *ids)
        if len(pipe):
            pipe.execute()
        for done in barriers:
            done.send()
