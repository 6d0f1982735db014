"""Cluster mode: several evserver nodes sharing partitioned Redis Streams (docs/cluster.md).

A node takes the config's ``[cluster]`` table whole; its numbers are declared with every
other published number in ``evserver.metrics`` (``CLUSTER``). Nothing here imports Redis at
import time: a server without ``[cluster] enabled`` never loads the client. The pieces,
each in its own module:

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

