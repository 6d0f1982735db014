"""The edge: where a connection's jobs enter the cluster, and where their answers come back.

The connection hands the edge a job exactly as it would hand it to the dispatcher
(``submit``/``run_inline``). The edge splits the job's events by partition, appends one
entry per partition in one pipelined round trip (in the reader's green thread, so a slow
Redis slows that reader: backpressure, as a full queue would), and completes the job once:

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

from ..dispatch import Job
from ..event import Event
from ..plan import Failure
from . import codec
from .host import NodeView
from .partition import split

log = logging.getLogger("evserver.cluster")

KeyOf = Callable[[Event], Any]


class Edge:
    """Appends jobs to the partition streams and completes them (the dispatcher's
    ``submit``/``run_inline`` contract)."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.partitions = node.settings.partitions
        self.stored = node.settings.ack == "stored"
        self._tokens = itertools.count(1)
        self._waiting: dict[int, tuple[Job, set[int]]] = {}  # token -> job, partitions owed
        self._keys: dict[str, KeyOf | None] = {}

    # ------------------------------------------------------------------ the dispatcher's contract

    def submit(self, job: Job) -> None:
        self._append(job)

    def run_inline(self, job: Job) -> bool:
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
        wants = [codec.REPLY if i in requests else codec.NOTHING if self.stored else codec.ACK
                 for i in range(len(events))]
        parts = split(events, self._key_of, self.partitions)
        token = next(self._tokens)
        owed = {part for part, idx in parts.items() if any(wants[i] for i in idx)}
        # Registered before appending: while XADD is in flight, this node may own the
        # partition, run the entry and report (``on_reply``) before ``execute`` returns.
        waits = bool(owed)
        if waits:
            self._waiting[token] = (job, owed)
        keys = node.keys
        pipe = node.redis.pipeline(transaction=False)
        for part, idx in parts.items():
            entry = codec.encode_entry(node.id, token, [(events[i], i, wants[i]) for i in idx])
            pipe.xadd(keys.stream(part), {codec.FIELD: entry})
        try:
            pipe.execute()
        except node.redis_errors as exc:
            if waits and self._waiting.pop(token, None) is None:
                return  # an owner ran and reported it all the same: it is complete
            node.count("append_errors")
            node.log_error("append", "cannot append to Redis: %s", exc)
            job.broken = Failure("cluster_unavailable", "ClusterError",
                                 f"the cluster's Redis is unavailable: {exc}")
            job.sink.job_done(job)
            return
        node.count("appended_entries", len(parts))
        node.count("appended_events", len(events))
        if not waits:
            job.sink.job_done(job)

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
