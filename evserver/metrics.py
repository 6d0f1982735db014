"""Stats snapshots and what the admin views build from them: /stats JSON and /metrics text.

One pipeline for both process models. A serving process takes a ``snapshot`` of its
``Server`` (plain, msgpack-able data; a worker sends it to the master over the control
channel); ``aggregate`` combines any number of snapshots, plus the ``retired`` sum of the
workers that have exited, into the /stats document; ``render_prometheus`` turns that
document into the Prometheus text format through prometheus_client. Totals add ``retired``
so counters never go backwards when a worker is replaced (its last snapshot becomes part of
the base; what it counted after that snapshot is lost only if it died without saying goodbye).

Nothing here imports eventlet: the master uses it too.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from .cluster import COUNTERS as CLUSTER_COUNTERS
from .cluster import GAUGES as CLUSTER_GAUGES

# Upper bounds (seconds) of the latency buckets: 5 us .. 30 s, about three per decade.
BUCKETS: tuple[float, ...] = (
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
QUANTILES = (0.5, 0.9, 0.99)
# Counters summed into totals (and kept for exited workers); the rest of a snapshot is gauges.
_COUNTERS = ("events_in", "events_processed", "handler_errors", "dead_letters", "unrouted")


class Histogram:
    """Fixed-bucket counts: O(log buckets) to record, bounded, and mergeable across workers."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1  # bucket i holds v <= BUCKETS[i]
        self.sum += seconds

    def as_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


def quantile(counts: list[int], q: float) -> float | None:
    """Estimate a quantile from bucket counts, interpolating inside the bucket like
    Prometheus' ``histogram_quantile``; None without samples."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(BUCKETS):  # beyond the last bound: all we know is "more than"
                return BUCKETS[-1]
            lo = BUCKETS[i - 1] if i else 0.0
            return lo + (BUCKETS[i] - lo) * (rank - seen) / n
        seen += n
    return BUCKETS[-1]


class Source(Protocol):
    """What a snapshot reads from a serving process (a ``Server``, seen from here)."""

    started_at: float
    connections: Any  # sized
    counters: dict[str, int]
    dispatcher: Any
    cluster: Any  # a cluster Node (its ``stats()``), or None


def snapshot(server: Source) -> dict[str, Any]:
    """One process's counters and gauges, as plain data (the control channel's ``stats``)."""
    d = server.dispatcher
    s = d.stats
    return {
        "pid": os.getpid(),
        "uptime": time.time() - server.started_at,
        "connections": len(server.connections),
        "counters": dict(server.counters),
        "dispatcher": {
            "events_in": s.events_in, "events_processed": s.events_processed,
            "handler_errors": s.handler_errors, "dead_letters": s.dead_letters,
            "unrouted": s.unrouted, "by_type": dict(s.by_type),
            "errors_by_type": dict(s.errors_by_type),
            "latency": {t: h.as_dict() for t, h in s.latency.items()},
            "busy": d.busy, "queued": d.queue.qsize(), "pool_size": d.pool_size,
        },
        "cluster": server.cluster.stats() if server.cluster is not None else {},
    }


def empty_base() -> dict[str, Any]:
    """The sum of exited workers' last snapshots: counters only."""
    return {"workers": 0, "counters": {}, "dispatcher": {
        **dict.fromkeys(_COUNTERS, 0), "by_type": {}, "errors_by_type": {}, "latency": {}}}


def retire(base: dict[str, Any], snap: dict[str, Any]) -> None:
    """Fold an exited worker's last snapshot into ``base`` so totals keep counting it."""
    base["workers"] += 1
    _add(base["counters"], snap.get("counters", {}))
    into, d = base["dispatcher"], snap.get("dispatcher", {})
    for key in _COUNTERS:
        into[key] += d.get(key, 0)
    _add(into["by_type"], d.get("by_type", {}))
    _add(into["errors_by_type"], d.get("errors_by_type", {}))
    _add_latency(into["latency"], d.get("latency", {}))
    cluster = snap.get("cluster") or {}
    _add(base.setdefault("cluster", {}), {k: cluster[k] for k in CLUSTER_COUNTERS if k in cluster})


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


def _add_latency(into: dict[str, dict[str, Any]], more: dict[str, dict[str, Any]]) -> None:
    for etype, h in more.items():
        mine = into.setdefault(etype, {"counts": [0] * (len(BUCKETS) + 1), "sum": 0.0})
        mine["counts"] = [a + b for a, b in zip(mine["counts"], h["counts"], strict=True)]
        mine["sum"] += h["sum"]


def aggregate(snapshots: Iterable[dict[str, Any]], *, mode: str, uptime: float,
              base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The /stats document: per worker, per event type, and totals (``base`` included)."""
    snaps = sorted(snapshots, key=lambda s: s["pid"])
    base = base or empty_base()
    totals_d = {key: base["dispatcher"][key] for key in _COUNTERS}
    counters = dict(base["counters"])
    by_type = dict(base["dispatcher"]["by_type"])
    errors = dict(base["dispatcher"]["errors_by_type"])
    latency: dict[str, dict[str, Any]] = {}
    _add_latency(latency, base["dispatcher"]["latency"])
    cluster = dict(base.get("cluster", {}))
    workers = []
    for snap in snaps:
        _add(cluster, snap.get("cluster") or {})
        d = snap["dispatcher"]
        for key in _COUNTERS:
            totals_d[key] += d.get(key, 0)
        _add(counters, snap["counters"])
        _add(by_type, d["by_type"])
        _add(errors, d.get("errors_by_type", {}))
        _add_latency(latency, d.get("latency", {}))
        workers.append({
            "pid": snap["pid"], "uptime": round(snap["uptime"], 3),
            "connections": snap["connections"], "events_in": d["events_in"],
            "events_out": d["events_processed"], "errors": d["handler_errors"],
            "unrouted": d["unrouted"], "dead_letters": d.get("dead_letters", 0),
            "busy": d["busy"], "pool_size": d.get("pool_size"), "queued": d["queued"],
            "types": dict(sorted(d["by_type"].items())),
            "counters": snap["counters"],
        })
    types = {}
    for etype in sorted(set(by_type) | set(errors) | set(latency)):
        counts = latency.get(etype, {}).get("counts", [])
        samples = sum(counts)
        types[etype] = {
            "events": by_type.get(etype, 0),
            "errors": errors.get(etype, 0),
            "by_worker": {str(w["pid"]): w["types"][etype] for w in workers
                          if etype in w["types"]},
            "latency": {
                "samples": samples,
                "sum": latency[etype]["sum"] if samples else 0.0,
                "mean": latency[etype]["sum"] / samples if samples else None,
                **{f"p{round(q * 100)}": quantile(counts, q) for q in QUANTILES},
                "buckets": counts,
            },
        }
    return {
        "mode": mode,
        "pid": os.getpid(),
        "uptime": round(uptime, 3),
        "workers": workers,
        "totals": {
            "workers": len(workers), "connections": sum(w["connections"] for w in workers),
            "events_in": totals_d["events_in"], "events_out": totals_d["events_processed"],
            "errors": totals_d["handler_errors"], "unrouted": totals_d["unrouted"],
            "dead_letters": totals_d["dead_letters"],
            "busy": sum(w["busy"] for w in workers), "queued": sum(w["queued"] for w in workers),
            "counters": counters,
            "cluster": cluster,  # empty unless the workers are cluster nodes
        },
        "types": types,
        "retired_workers": base["workers"],
        "dead_letters": totals_d["dead_letters"],
        "latency_buckets": list(BUCKETS),
    }


# --------------------------------------------------------------------------- Prometheus


class _StatsCollector:
    """A prometheus_client custom collector over one /stats document (the proxy pattern:
    values are owned elsewhere, so they are exposed as they are rather than re-counted)."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        st = self.stats
        totals = st["totals"]
        yield GaugeMetricFamily("evserver_uptime_seconds", "Seconds since this process started.",
                                value=st["uptime"])
        yield GaugeMetricFamily("evserver_workers", "Serving processes reporting stats.",
                                value=totals["workers"])
        yield CounterMetricFamily("evserver_worker_exits", "Worker processes that exited.",
                                  value=st["retired_workers"])
        for name, key, doc in (
            ("events_received", "events_in", "Events read off connections (all workers)."),
            ("events_processed", "events_out", "Events run through their handlers."),
            ("unrouted_events", "unrouted", "Events no handler matched."),
            ("dead_letters", "dead_letters", "Events stored as dead letters."),
        ):
            yield CounterMetricFamily(f"evserver_{name}", doc, value=totals[key])
        for key, value in sorted(totals["counters"].items()):
            name = key.removesuffix("_total")
            yield CounterMetricFamily(f"evserver_{name}", f"Server counter {key}.", value=value)
        by_type = CounterMetricFamily("evserver_events", "Events processed, by event type.",
                                      labels=["type"])
        errors = CounterMetricFamily("evserver_handler_errors",
                                     "Handler failures (after retries), by event type.",
                                     labels=["type"])
        latency = HistogramMetricFamily(
            "evserver_handler_latency_seconds",
            "Handler wall time per event, sampled (about one event in 128), by event type.",
            labels=["type"])
        bounds = [*(repr(float(b)) for b in st["latency_buckets"]), "+Inf"]
        for etype, t in st["types"].items():
            by_type.add_metric([etype], t["events"])
            errors.add_metric([etype], t["errors"])
            counts = t["latency"]["buckets"]
            if counts:
                cumulative, seen = [], 0
                for bound, n in zip(bounds, counts, strict=True):
                    seen += n
                    cumulative.append((bound, seen))
                latency.add_metric([etype], cumulative, sum_value=t["latency"]["sum"])
        yield by_type
        yield errors
        yield latency
        for key, value in sorted(totals.get("cluster", {}).items()):
            kind = GaugeMetricFamily if key in CLUSTER_GAUGES else CounterMetricFamily
            yield kind(f"evserver_cluster_{key}", f"Cluster node {key.replace('_', ' ')}.",
                       value=value)
        per_worker = {
            "events_received": ("events_in", CounterMetricFamily, "Events read, per worker."),
            "events_processed": ("events_out", CounterMetricFamily,
                                 "Events processed, per worker."),
            "handler_errors": ("errors", CounterMetricFamily, "Handler failures, per worker."),
            "connections": ("connections", GaugeMetricFamily, "Open connections, per worker."),
            "busy": ("busy", GaugeMetricFamily, "Pool green threads running a job."),
            "queue_depth": ("queued", GaugeMetricFamily, "Jobs waiting for the pool."),
            "uptime_seconds": ("uptime", GaugeMetricFamily, "Seconds since the worker started."),
        }
        for name, (key, family, doc) in per_worker.items():
            metric = family(f"evserver_worker_{name}", doc, labels=["worker"])
            for w in st["workers"]:
                metric.add_metric([str(w["pid"])], w[key])
            yield metric
        typed = CounterMetricFamily("evserver_worker_events",
                                    "Events processed, per worker and event type.",
                                    labels=["worker", "type"])
        for w in st["workers"]:
            for etype, n in w["types"].items():
                typed.add_metric([str(w["pid"]), etype], n)
        yield typed


def render_prometheus(stats: dict[str, Any]) -> bytes:
    """The Prometheus text exposition of a /stats document, built by prometheus_client."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats))
    return generate_latest(registry)


PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
