"""Cluster mode: several evserver nodes sharing partitioned Redis Streams (docs/cluster.md).

Nothing here imports Redis at import time: a server without ``[cluster] enabled`` never
loads the client. The pieces, each in its own module:

- ``keys``: every Redis key of a cluster, named from ``[cluster] name``;
- ``partition``: which partition an event belongs to;
- ``codec``: the bytes of a stream entry and of a reply;
- ``leases``: heartbeats, who should own what (rendezvous hashing), lease scripts;
- ``edge``: the node side that appends a connection's jobs and answers them;
- ``owner``: the consumer loop of one owned partition, running entries on the dispatcher;
- ``deadletters``: the cluster's dead-letter stream;
- ``housekeeping``: trimming and the partition-count check;
- ``node``: one node, tying them together for a ``Server``;
- ``status``: what ``evserver cluster status`` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A node's numbers in /stats ("cluster") and /metrics (evserver_cluster_*): counters, which
# the totals keep across worker restarts, and gauges of the moment.
COUNTERS = ("appended_entries", "appended_events", "append_errors", "processed_entries",
            "processed_events", "redelivered_events", "dead_lettered_events", "fenced_entries",
            "partitions_acquired", "partitions_released", "partitions_lost", "redis_errors")
GAUGES = ("partitions_owned", "nodes_live", "waiting_jobs")


@dataclass(frozen=True)
class ClusterSettings:
    """The ``[cluster]`` table, as the node uses it."""

    url: str = "redis://127.0.0.1:6379/0"
    name: str = "evserver"
    partitions: int = 16
    lease: float = 10.0
    ack: str = "processed"
    max_deliveries: int = 5

    @classmethod
    def from_config(cls, cfg: Any) -> ClusterSettings | None:
        """The settings of a loaded ``Config``; None when cluster mode is off."""
        c = cfg.cluster
        if not c.enabled:
            return None
        return cls(url=c.url, name=c.name, partitions=c.partitions, lease=c.lease, ack=c.ack,
                   max_deliveries=c.max_deliveries)


__all__ = ["COUNTERS", "GAUGES", "ClusterSettings"]
