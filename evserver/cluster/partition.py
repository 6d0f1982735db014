"""Which partition an event belongs to.

Events whose processor has an ``ordered_by`` key go to ``crc32(key) % partitions``: one key,
one partition, one owner, so its events run in the order they were appended. Events without
a key need no order; a job's unkeyed events all go to the partition of the first one's id, so
they make one stream entry (a big entry costs Redis about what a small one does) and jobs
still spread evenly over the partitions.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from ..event import Event

KeyOf = Callable[[Event], Any]  # the ordered_by key of an event's processor, or None


def key_partition(key: Any, partitions: int) -> int:
    """The partition of an ordered_by key: stable across processes, hosts and restarts."""
    raw = key if isinstance(key, bytes) else repr(key).encode()
    return zlib.crc32(raw) % partitions


def split(events: list[Event], key_of: KeyOf | None, partitions: int) -> dict[int, list[int]]:
    """Map each partition to the indexes of ``events`` that go there, in their order;
    ``key_of`` None: no event has a key."""
    if key_of is None:
        return {key_partition(events[0].id, partitions): list(range(len(events)))}
    parts: dict[int, list[int]] = {}
    loose: int | None = None  # the partition of this job's unkeyed events
    for i, event in enumerate(events):
        key = key_of(event)
        if key is None:
            if loose is None:
                loose = key_partition(event.id, partitions)
            p = loose
        else:
            p = key_partition(key, partitions)
        parts.setdefault(p, []).append(i)
    return parts
