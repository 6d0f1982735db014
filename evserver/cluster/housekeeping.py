"""Keeping the cluster's Redis tidy and consistent.

- The partition count is stored in Redis the first time a node starts; a node configured
  with another count refuses to start, because changing it would move keys to other
  partitions (and their order to other owners) while old entries still wait.
- Streams are trimmed below their oldest entry still needed: the oldest pending one, or
  the last one delivered when nothing is pending. XACK alone never frees memory.
"""

from __future__ import annotations

from typing import Any

from ..errors import ClusterError
from .keys import GROUP, Keys


def check_partitions(redis: Any, keys: Keys, partitions: int) -> None:
    redis.hsetnx(keys.meta, "partitions", partitions)
    stored = int(redis.hget(keys.meta, "partitions"))
    if stored != partitions:
        raise ClusterError(
            f"cluster {keys.name!r} has {stored} partitions in Redis but this node is "
            f"configured with {partitions}; use the same [cluster] partitions everywhere")


def create_groups(redis: Any, keys: Keys, partitions: int) -> None:
    """Each partition stream with its consumer group, reading from the very start."""
    pipe = redis.pipeline(transaction=False)
    for p in range(partitions):
        pipe.xgroup_create(keys.stream(p), GROUP, id="0", mkstream=True)
    for result in pipe.execute(raise_on_error=False):
        if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
            raise result


def trim(redis: Any, streams: list[str]) -> None:
    """Drop the entries of ``streams`` that no consumer needs any more."""
    if not streams:
        return
    pipe = redis.pipeline(transaction=False)
    for stream in streams:
        pipe.xpending(stream, GROUP)
        pipe.xinfo_groups(stream)
    answers = pipe.execute()
    pipe = redis.pipeline(transaction=False)
    for i, stream in enumerate(streams):
        pending, groups = answers[2 * i], answers[2 * i + 1]
        group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
        if group is None:
            continue
        floor = pending["min"] if pending["pending"] else group["last-delivered-id"]
        if floor and floor not in (b"0-0", "0-0"):
            pipe.xtrim(stream, minid=floor, approximate=False)
    if len(pipe):
        pipe.execute()
