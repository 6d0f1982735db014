"""Membership and ownership: heartbeats, rendezvous hashing and partition leases.

Every node heartbeats into one sorted set, scored by Redis's own clock (so the hosts' clocks
never matter); a node not heard of for one lease is gone. Each partition should be owned by
the live node with the highest ``hash(node, partition)`` (rendezvous hashing): when a node
joins or leaves, only the partitions it wins or held move. Owning takes a lease, a key set
``NX PX lease`` and renewed by compare-and-extend, so two nodes never both hold one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# Extend the lease only if it is still ours: 1 if so, 0 if it expired or another node has it.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _score(node: str, partition: int) -> bytes:
    return hashlib.blake2b(f"{node}/{partition}".encode(), digest_size=8).digest()


def owner_of(partition: int, nodes: Iterable[str]) -> str | None:
    """The node that should own ``partition`` among the live ``nodes`` (None if none)."""
    return max(nodes, key=lambda node: _score(node, partition), default=None)


def assigned(node: str, nodes: Iterable[str], partitions: int) -> set[int]:
    """The partitions ``node`` should own, given every live node."""
    live = set(nodes) | {node}
    return {p for p in range(partitions) if owner_of(p, live) == node}
