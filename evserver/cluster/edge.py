"""The edge: where a connection's jobs enter the cluster, and where their answers come back.

The connection hands the edge a job exactly as it would hand it to the dispatcher
(``submit``/``run_inline``). The edge splits the job's events by partition into one entry
per partition, which the node's appender sends with everything else queued meanwhile (see
``Edge``), and completes the job once:

- with ``ack = "processed"``, when every partition's owner has reported, through this
  node's inbox, that its events ran (with their failures and reply values): the job
  completes as it would on one machine, after its events ran, fire-and-forget ones
  included (so a PING behind them proves they ran, and the cluster's backlog holds back
  the readers that feed it);
- with ``ack = "stored"``, once XADD returned (the entries are in Redis), unless the job
  holds requests: their reply values only the owners have, so it waits for those reports.

A failed append fails the whole job with ``cluster_unavailable``: the client sees an ERROR,
never an ACK for something Redis may not hold.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from .._eventlet import eventlet
from ..dispatch import Job
from ..event import Event
from ..plan import Failure
from . import codec
from .host import NodeView
from .loop import GreenLoop
from .partition import split

log = logging.getLogger("evserver.cluster")

KeyOf = Callable[[Event], Any]
MAX_QUEUED = 256  # jobs waiting for the appender before readers block


class _Append:
    """One job's entries, queued for the appender."""

    __slots__ = ("entries", "job", "token", "waits")

    def __init__(self, job: Job, token: int, waits: bool, entries: list[tuple[str, bytes]]):
        self.job = job
        self.token = token
        self.waits = waits
        self.entries = entries


class Edge(GreenLoop):
    """Appends jobs to the partition streams and completes them (the dispatcher's
    ``submit``/``run_inline`` contract).

    Readers do not wait for Redis: they queue their job's entries (blocking only while
    ``MAX_QUEUED`` jobs wait, which is the backpressure) and go on reading. One appender
    green thread sends everything queued meanwhile in one pipeline (group commit), so a
    busy node pays one round trip for many jobs. The queue is FIFO, so the entries of one
    connection reach each stream in the order it sent them.
    """

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.partitions = node.settings.partitions
        self.stored = node.settings.ack == "stored"
        self._tokens = itertools.count(1)
        self._waiting: dict[int, tuple[Job, set[int]]] = {}  # token -> job, partitions owed
        self._keys: dict[str, KeyOf | None] = {}
        # Without any ordered_by processor no event has a key: skip looking for them.
        self._ordered = any(h.options.get("ordered_by") is not None
                            for h in node.server.app.handlers)
        self._queue: Any = eventlet.queue.LightQueue(MAX_QUEUED)

    # ------------------------------------------------------------------ the dispatcher's contract

    def submit(self, job: Job) -> None:
        self._append(job)

    def run_inline(self, job: Job, handoff: Callable[[], None] | None = None) -> bool:
        self._append(job)
        return True

    @property
    def waiting(self) -> int:
        """Jobs appended whose answers have not all come back."""
        return len(self._waiting)

    # ------------------------------------------------------------------ appending

    def _append(self, job: Job) -> None:
        node = self.node
        events = job.events
        if not events:
            job.sink.job_done(job)
            return
        requests = job.requests
        wants = [codec.NOTHING if self.stored else codec.ACK] * len(events)
        for i in requests:
            wants[i] = codec.REPLY
        parts = split(events, self._key_of if self._ordered else None, self.partitions)
        token = next(self._tokens)
        owed = set(parts) if not self.stored else {
            part for part, idx in parts.items() if any(wants[i] for i in idx)}
        # Registered before appending: while XADD is in flight, this node may own the
        # partition, run the entry and report (``on_reply``) before the append returns.
        waits = bool(owed)
        if waits:
            self._waiting[token] = (job, owed)
        keys = node.keys
        if len(parts) == 1:  # one partition (no keys, or one): the job as it is
            part, idx = parts.popitem()
            entries = [(keys.stream(part), codec.encode_entry(node.id, token, events, idx,
                                                                wants))]
        else:
            entries = [(keys.stream(part), codec.encode_entry(
                node.id, token, [events[i] for i in idx], idx, [wants[i] for i in idx]))
                for part, idx in parts.items()]
        self._queue.put(_Append(job, token, waits, entries))

    def _run(self) -> None:
        """The appender; the node stops it after the connections drained (nothing is
        queued any more)."""
        queue = self._queue
        while True:
            batch = [queue.get()]
            while not queue.empty() and len(batch) < MAX_QUEUED:
                batch.append(queue.get_nowait())
            self._flush(batch)

    def _flush(self, batch: list[_Append]) -> None:
        node = self.node
        pipe = node.redis.pipeline(transaction=False)
        for item in batch:
            for stream, entry in item.entries:
                pipe.xadd(stream, {codec.FIELD: entry})
        try:
            results = pipe.execute(raise_on_error=False)
        except node.redis_errors as exc:
            results = [exc] * len(pipe)
        at = 0
        for item in batch:
            n = len(item.entries)
            failed = next((r for r in results[at:at + n] if isinstance(r, Exception)), None)
            at += n
            if failed is not None:
                self._failed(item, failed)
                continue
            node.count("appended_entries", n)
            node.count("appended_events", len(item.job.events))
            if not item.waits:
                item.job.sink.job_done(item.job)

    def _failed(self, item: _Append, exc: BaseException) -> None:
        """Fail a job Redis did not take (all of it: the client resends)."""
        node = self.node
        if item.waits and self._waiting.pop(item.token, None) is None:
            return  # an owner ran and reported it all the same: it is complete
        node.count("append_errors")
        node.log_error("append", "cannot append to Redis: %s", exc)
        item.job.broken = Failure("cluster_unavailable", "ClusterError",
                                  f"the cluster's Redis is unavailable: {exc}")
        item.job.sink.job_done(item.job)

    def _key_of(self, event: Event) -> Any:
        """The ordered_by key of the event's processor, or None (no order needed)."""
        etype = event.type
        if etype not in self._keys:
            if len(self._keys) >= 4096:  # clients choose types: stay bounded
                self._keys.clear()
            self._keys[etype] = _key_function(self.node.server.app, etype)
        fn = self._keys[etype]
        if fn is None:
            return None
        try:
            return fn(event)
        except Exception:  # the owner's dispatcher logs it and runs the event unordered
            return None

    # ------------------------------------------------------------------ answers

    def on_reply(self, token: int, partition: int, outcomes: list[codec.Outcome]) -> None:
        """An owner's report for one of our entries: the failures and reply values of its
        events. Duplicates (after a redelivery) and reports for jobs failed meanwhile are
        ignored."""
        waiting = self._waiting.get(token)
        if waiting is None or partition not in waiting[1]:
            return
        job, owed = waiting
        owed.discard(partition)
        for index, failed, value in outcomes:
            if failed is not None:
                job.failures.setdefault(id(job.events[index]), Failure(*failed))
            elif value is not None:
                job.values[index] = value
        if not owed:
            del self._waiting[token]
            job.sink.job_done(job)

    def fail_all(self, why: str) -> None:
        """Answer every waiting job with an error (the node is stopping without its answers)."""
        waiting, self._waiting = self._waiting, {}
        for job, _owed in waiting.values():
            job.broken = Failure("cluster_unavailable", "ClusterError", why)
            job.sink.job_done(job)


def _key_function(app: Any, etype: str) -> KeyOf | None:
    processor = app.route(etype).processor
    key = processor.options.get("ordered_by") if processor is not None else None
    if key is None:
        return None
    pattern = processor.pattern
    if isinstance(key, str):
        field = key
        return lambda event: (pattern, event.data[field])
    fn = key
    return lambda event: (pattern, fn(event))
