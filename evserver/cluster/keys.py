"""Every Redis key of one cluster, derived from ``[cluster] name``.

A partition's stream and lease share the hash tag ``{<name>.<p>}``, so in Redis Cluster each
partition (its entries, its consumer group and its lease) lives in one slot.
"""

from __future__ import annotations

GROUP = "owners"  # the one consumer group of every partition stream


class Keys:
    __slots__ = ("dead", "meta", "name", "nodes")

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes = f"{name}:nodes"  # sorted set: node id -> last heartbeat (Redis ms)
        self.meta = f"{name}:meta"  # hash: partitions
        self.dead = f"{name}:dead"  # the dead-letter stream

    def stream(self, partition: int) -> str:
        return f"{self.name}:stream:{{{self.name}.{partition}}}"

    def lease(self, partition: int) -> str:
        return f"{self.name}:lease:{{{self.name}.{partition}}}"

    def inbox(self, node: str) -> str:
        return f"{self.name}:inbox:{{{node}}}"
