"""The edge: where a connection's jobs enter the cluster, and where their answers come back.

The connection hands the edge a job exactly as it would hand it to the dispatcher
(``submit``/``run_inline``). The edge splits the job's events by partition, appends one
entry per partition in one pipelined round trip (in the reader's green thread, so a slow
Redis slows that reader: backpressure, as a full queue would), and completes the job once:

- at once, when nothing in it needs an answer from the owner (fire-and-forget events, and
  acked events with ``ack = "stored"``: their entry is in Redis when XADD returns);
- otherwise when every partition's owner has reported, through this node's inbox, the
  outcomes of the events that needed them (ACKs with ``ack = "processed"``, and requests,
  whose reply value only the owner has).

A failed append fails every frame of the job with ``cluster_unavailable``: the client sees
an ERROR, never an ACK for something Redis may not hold.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from .. import protocol as p
from ..dispatch import Failure, Job, Result
from ..event import Event
from . import codec
from .host import NodeView
from .partition import split

log = logging.getLogger("evserver.cluster")

KeyOf = Callable[[Event], Any]


class _Waiting:
    """A job whose owners have not all reported: the partitions still owed, and per frame
    the first failure and the reply value."""

    __slots__ = ("failures", "job", "owed", "values")

    def __init__(self, job: Job, owed: set[int]) -> None:
        self.job = job
        self.owed = owed
        self.failures: dict[int, Failure] = {}
        self.values: dict[int, Any] = {}


class Edge:
    """Appends jobs to the partition streams and completes them (the dispatcher's
    ``submit``/``run_inline`` contract)."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.partitions = node.settings.partitions
        self.stored = node.settings.ack == "stored"
        self._tokens = itertools.count(1)
        self._waiting: dict[int, _Waiting] = {}
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
        events: list[Event] = []
        slots: list[int] = []
        wants: list[int] = []
        for fi, frame in enumerate(job.frames):
            if frame.kind == p.PING:
                continue
            want = _want(frame, self.stored)
            for event in frame.body:
                events.append(event)
                slots.append(fi)
                wants.append(want)
        if not events:
            _complete(job, {}, {})
            return
        parts = split(events, self._key_of, self.partitions)
        token = next(self._tokens)
        owed = {part for part, idx in parts.items() if any(wants[i] for i in idx)}
        if owed:
            self._waiting[token] = _Waiting(job, owed)
        keys = node.keys
        pipe = node.redis.pipeline(transaction=False)
        for part, idx in parts.items():
            entry = codec.encode_entry(node.id, token, [(events[i], slots[i], wants[i])
                                                        for i in idx])
            pipe.xadd(keys.stream(part), {codec.FIELD: entry})
        try:
            pipe.execute()
        except node.redis_errors as exc:
            self._waiting.pop(token, None)
            node.count("append_errors")
            node.log_error("append", "cannot append to Redis: %s", exc)
            failure = Failure("cluster_unavailable", "ClusterError",
                              f"the cluster's Redis is unavailable: {exc}")
            _complete(job, {fi: failure for fi in set(slots)}, {})
            return
        node.count("appended_entries", len(parts))
        node.count("appended_events", len(events))
        if not owed:
            _complete(job, {}, {})

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
        """An owner's report for one of our entries; duplicates (after a redelivery) and
        reports for jobs failed meanwhile are ignored."""
        waiting = self._waiting.get(token)
        if waiting is None or partition not in waiting.owed:
            return
        waiting.owed.discard(partition)
        for slot, failed, value in outcomes:
            if failed is not None:
                waiting.failures.setdefault(slot, Failure(*failed))
            elif value is not None:
                waiting.values[slot] = value
        if not waiting.owed:
            del self._waiting[token]
            _complete(waiting.job, waiting.failures, waiting.values)

    def fail_all(self, why: str) -> None:
        """Answer every waiting job with an error (the node is stopping without its answers)."""
        failure = Failure("cluster_unavailable", "ClusterError", why)
        waiting, self._waiting = self._waiting, {}
        for w in waiting.values():
            failures = {fi: failure for fi, f in enumerate(w.job.frames) if f.kind != p.PING}
            failures.update(w.failures)
            _complete(w.job, failures, w.values)


def _want(frame: p.Frame, stored: bool) -> int:
    """What a frame's events need from their owner."""
    if frame.kind == p.REQUEST:
        return codec.REPLY
    if frame.corr and not stored:
        return codec.ACK
    return codec.NOTHING


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


def _complete(job: Job, failures: dict[int, Failure], values: dict[int, Any]) -> None:
    """Answer a job as the dispatcher would: one result per frame that owes a response."""
    results = [Result(frame, failures.get(fi), values.get(fi))
               for fi, frame in enumerate(job.frames) if frame.corr or frame.kind == p.PING]
    job.sink.job_done(job, results)
