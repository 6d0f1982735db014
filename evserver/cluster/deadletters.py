"""The cluster's dead-letter stream: what ``evserver dead-letters list/replay`` read in
cluster mode, and where every node's dispatcher stores handler failures.

One stream entry per dead letter (field ``d``: the ``DeadLetter`` fields, msgpack), so any
node and the CLI see the same list. Two kinds arrive here: handler failures after their
retries (``append``, called by the dispatcher like the file store's), and poison entries,
delivered more than ``max_deliveries`` times without completing: each of their events is
stored with handler ``(cluster)``, because which event killed the process is not known.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack

from ..app import matches
from ..deadletters import DeadLetter
from ..event import Event

log = logging.getLogger("evserver.cluster")

POISON_HANDLER = "(cluster)"


class StreamDeadLetters:
    """The file store's interface (``append``, ``read``, ``remove``) over a Redis stream."""

    fsync_interval = 0.0  # Redis persists; nothing to sync locally

    def __init__(self, redis: Any, key: str) -> None:
        self.redis = redis
        self.key = key
        self.dir = f"Redis stream {key}"  # where `dead-letters list` says it looked

    def append(self, record: DeadLetter) -> None:
        self.redis.xadd(self.key, {b"d": msgpack.packb(record.as_dict())})

    def poison(self, events: list[Event], partition: int, deliveries: int) -> None:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            self._add(pipe, DeadLetter(
                event.type, event.data, event.id, event.time, event.meta, POISON_HANDLER,
                "processor", "PoisonEvent",
                f"its entry in partition {partition} was delivered {deliveries} times without "
                "completing (did a handler kill its process?)", "", deliveries, now))
        pipe.execute()
        log.error("partition %d: dead-lettered %d event(s) delivered %d times", partition,
                  len(events), deliveries)

    def entry_undecodable(self, stream: str, eid: bytes, fields: dict[bytes, bytes],
                          exc: Exception) -> None:
        log.error("%s: entry %r cannot be decoded (%s); dead-lettered", stream, eid, exc)
        self._add(self.redis, DeadLetter(
            "(undecodable)", {k.decode(errors="replace"): v for k, v in fields.items()},
            eid.decode(), time.time(), {}, POISON_HANDLER, "processor", type(exc).__name__,
            str(exc), "", 1, time.time()))

    def _add(self, client: Any, record: DeadLetter) -> None:
        client.xadd(self.key, {b"d": msgpack.packb(record.as_dict())})

    def read(self, pattern: str | None = None) -> Iterator[DeadLetter]:
        """Every dead letter, oldest first (optionally only types matching ``pattern``)."""
        for _eid, record in self._records():
            if pattern is None or matches(pattern, record.event_type):
                yield record

    def _records(self) -> Iterator[tuple[bytes, DeadLetter]]:
        start = "-"
        while True:
            rows = self.redis.xrange(self.key, min=start, max="+", count=500)
            for eid, fields in rows:
                yield eid, DeadLetter(**msgpack.unpackb(fields[b"d"], strict_map_key=False))
            if len(rows) < 500:
                return
            start = "(" + rows[-1][0].decode()

    def remove(self, ids: Iterable[str]) -> int:
        """Delete the dead letters of these event ids; how many were deleted."""
        wanted = set(ids)
        doomed = [eid for eid, record in self._records() if record.event_id in wanted]
        if doomed:
            self.redis.xdel(self.key, *doomed)
        return len(doomed)

    def count(self) -> int:
        return int(self.redis.xlen(self.key))

    def maybe_sync(self) -> None:
        """Nothing to do: the file store's periodic fsync hook."""

    def close(self) -> None:
        """Nothing to do: the Redis client belongs to the node."""


def open_stream(url: str, name: str) -> StreamDeadLetters:
    """The dead-letter stream of cluster ``name``, for the CLI (a plain blocking client)."""
    import redis

    from .keys import Keys

    return StreamDeadLetters(redis.Redis.from_url(url, socket_timeout=10), Keys(name).dead)
