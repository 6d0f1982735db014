"""Stats snapshots and what the admin views build from them: /stats JSON and /metrics text.

One pipeline for both process models. A serving process takes a ``snapshot`` of its
``Server`` (plain, msgpack-able data; a worker sends it to the master over the control
channel); ``aggregate`` combines any number of snapshots, plus the ``retired`` sum of the
workers that have exited, into the /stats document; ``render_prometheus`` turns that
document into the Prometheus text format through prometheus_client. Totals add ``retired``
so counters never go backwards when a worker is replaced (its last snapshot becomes part of
the base; what it counted after that snapshot is lost only if it died without saying goodbye).
What is published (names, kinds, help text, labels, where /stats holds each number) is
declared once, in metrics.toml next to this file.

Nothing here imports eventlet: the master uses it too.
"""

from __future__ import annotations

import bisect
import os
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Metric:
    """One published number, as metrics.toml declares it: its Prometheus name (without
    ``evserver_`` and a counter's ``_total``), kind, help text and labels, and ``key``: where
    /stats has it (a key of the totals, of a worker's entry, of the server counters or of the
    cluster numbers)."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    key: str
    labels: tuple[str, ...] = ()


_KINDS = ("counter", "gauge", "histogram")
_FIELDS = {"kind", "key", "labels", "help"}


def declare(groups: dict[str, Any]) -> dict[str, tuple[Metric, ...]]:
    """The declarations of a parsed metrics.toml, by group, in its order (the order of
    /metrics). The numbers are data, a table an operator reads as it is; this is the one
    place that turns them into code. ``ValueError`` names an entry that is not a number."""
    declared = {}
    for group, table in groups.items():
        prefix, labels = table.get("prefix", ""), table.get("labels", [])
        metrics = []
        for name, d in table.items():
            if not isinstance(d, dict):
                continue  # a default of the group
            m = Metric(prefix + name, d.get("kind", table.get("kind", "")), d.get("help", ""),
                       d.get("key", name), tuple(d.get("labels", labels)))
            if m.kind not in _KINDS or not m.help or d.keys() - _FIELDS:
                raise ValueError(f"metrics.toml: [{group}] {name}: needs a kind of {_KINDS} "
                                 f"and a help text, and only the fields {sorted(_FIELDS)}")
            metrics.append(m)
        declared[group] = tuple(metrics)
    return declared


_DECLARED = declare(tomllib.loads(Path(__file__).with_name("metrics.toml").read_text("utf-8")))
#: The counters a serving process keeps in ``Server.counters`` (the "counters" of /stats),
#: by group: a group's counters exist only where its listener runs.
SERVER_COUNTERS = {group: _DECLARED[group] for group in ("server", "forward")}
_SERVER_COUNTER = {m.key: m for group in SERVER_COUNTERS.values() for m in group}
#: A cluster node's numbers (``Node.stats()``, the "cluster" of /stats).
CLUSTER = _DECLARED["cluster"]
CLUSTER_COUNTERS = tuple(m.key for m in CLUSTER if m.kind == "counter")
#: Numbers of the whole service (the master's, or the single process').
SERVICE = _DECLARED["service"]
#: Numbers by event type.
BY_TYPE = _DECLARED["by_type"]
#: Numbers by worker process.
BY_WORKER = _DECLARED["by_worker"]


def new_counters(*groups: str) -> dict[str, int]:
    """Zeroed counters of ``groups`` (keys of ``SERVER_COUNTERS``): a counter not declared
    there cannot be counted (``+=`` on a missing key raises)."""
    return {m.key: 0 for group in groups for m in SERVER_COUNTERS[group]}


# --------------------------------------------------------------------------- Prometheus


class _StatsCollector:
    """A prometheus_client custom collector over one /stats document (the proxy pattern:
    values are owned elsewhere, so they are exposed as they are rather than re-counted)."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        st = self.stats
        totals = st["totals"]
        service = {"uptime": st["uptime"], "worker_exits": st["retired_workers"], **totals}
        for m in SERVICE:
            yield _family(m, value=service[m.key])
        for key, value in sorted(totals["counters"].items()):
            m = _SERVER_COUNTER.get(key) or Metric(
                key.removesuffix("_total"), "counter", f"Server counter {key} (undeclared).", key)
            yield _family(m, value=value)
        yield from self._by_type(st)
        cluster = totals.get("cluster", {})
        for m in CLUSTER:
            if m.key in cluster:
                yield _family(m, value=cluster[m.key])
        for m in BY_WORKER:
            family = _family(m)
            for w in st["workers"]:
                if m.key == "types":
                    for etype, n in w["types"].items():
                        family.add_metric([str(w["pid"]), etype], n)
                else:
                    family.add_metric([str(w["pid"])], w[m.key])
            yield family

    @staticmethod
    def _by_type(st: dict[str, Any]) -> Iterator[Any]:
        events, errors, latency = (_family(m) for m in BY_TYPE)
        bounds = [*(repr(float(b)) for b in st["latency_buckets"]), "+Inf"]
        for etype, t in st["types"].items():
            events.add_metric([etype], t["events"])
            errors.add_metric([etype], t["errors"])
            counts = t["latency"]["buckets"]
            if counts:
                cumulative, seen = [], 0
                for bound, n in zip(bounds, counts, strict=True):
                    seen += n
                    cumulative.append((bound, seen))
                latency.add_metric([etype], cumulative, sum_value=t["latency"]["sum"])
        yield from (events, errors, latency)


def _family(m: Metric, **value: Any) -> Any:
    """The prometheus_client family of a declaration (with ``value=`` for an unlabelled one)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    kind = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
            "histogram": HistogramMetricFamily}[m.kind]
    labels = {"labels": list(m.labels)} if m.labels else {}
    return kind(f"evserver_{m.name}", m.help, **labels, **value)


def render_prometheus(stats: dict[str, Any]) -> bytes:
    """The Prometheus text exposition of a /stats document, built by prometheus_client."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats))
    return generate_latest(registry)


PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
