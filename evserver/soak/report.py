"""The figures of a soak run: what the clients were told against what the workers recorded.

Definitions (docs/reliability.md):

- ``sent``: events the clients wrote; ``acked``: events the server confirmed (an ACK, a
  reply, a Forward ack); ``processed``: distinct events some worker recorded as done.
- ``acked_lost``: acknowledged but never recorded. ``duplicates``: records beyond the first
  of an event (re-sends after a broken connection; at least once allows them).
- ``order_violations``: per ordered key, events whose *first* run started after the first
  run of a later event of that key.
- ``rss_growth_pct``: per worker, its RSS at the end of its life against its RSS at the end
  of its warm-up (its first ``warmup`` seconds), each the median of 10 one-second samples so
  that a transient peak that is freed again does not count; the worst worker. The peak is
  reported on its own (``rss_peak_mib``).
- ``fd_delta``: the largest difference between a process's open fds at the end (clients
  gone) and a freshly started process of its role (a worker before any load; the master).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..deadletters import DeadLetterStore
from .chaos import ChaosLog, summary
from .ledger import ACKED, SENT, Ledger
from .records import read_records
from .watch import ProcessSamples

_SETTLE = 10  # samples (seconds) whose median is a worker's RSS at a point in time


def tally(ledger: Ledger, directory: Path) -> dict[str, Any]:
    """Delivery figures from the ledger and the workers' record files."""
    counts = {name: bytearray(len(s.states)) for name, s in ledger.streams.items()}
    first: dict[str, dict[int, int]] = defaultdict(dict)  # ordered stream -> n -> first ns
    unknown = 0
    for soak_id, ns, _pid in read_records(directory):
        parsed = Ledger.split(soak_id)
        if parsed is None or parsed[0] not in counts or parsed[1] >= len(counts[parsed[0]]):
            unknown += 1
            continue
        name, n = parsed
        c = counts[name]
        c[n] = min(255, c[n] + 1)
        if name[0] == "o" and (n not in first[name] or ns < first[name][n]):
            first[name][n] = ns
    sent = acked = processed = duplicates = acked_lost = fire_lost = 0
    for name, stream in ledger.streams.items():
        c = counts[name]
        sent += len(stream.states)
        acked += stream.count(ACKED)
        processed += len(c) - c.count(0)
        duplicates += sum(c) - (len(c) - c.count(0))
        for n, state in enumerate(stream.states):
            if not c[n]:
                if state == ACKED:
                    acked_lost += 1
                elif state == SENT and name[0] == "f":
                    fire_lost += 1
    violations = 0
    for runs in first.values():
        top = -1
        for n in sorted(runs, key=runs.__getitem__):
            if n < top:
                violations += 1
            top = max(top, n)
    return {"sent": sent, "acked": acked, "processed": processed, "acked_lost": acked_lost,
            "duplicates": duplicates, "order_violations": violations,
            "fire_and_forget_lost": fire_lost, "unknown_records": unknown}


def dead_letters(path: Path, stream: str, doomed: set[int], answered: set[int]
                 ) -> dict[str, Any]:
    """Distinct dead-lettered soak ids against the failures the soak injected."""
    ids = set()
    for record in DeadLetterStore(path).read("soak.flaky"):
        parsed = Ledger.split(str((record.data or {}).get("i", "")))
        if parsed is not None and parsed[0] == stream:
            ids.add(parsed[1])
    return {"dead_letters": len(ids), "dead_letters_injected": len(doomed),
            "dead_letters_answered": len(answered),
            "dead_letters_missing": len(answered - ids),  # told "dead-lettered", not stored
            "dead_letters_unexpected": len(ids - doomed)}  # stored, never meant to fail


def processes(samples: dict[int, ProcessSamples], ready: dict[int, float], warmup: float,
              fd_reference: int | None, end_fds: dict[int, int],
              queue_peak: dict[int, int]) -> dict[str, Any]:
    """Per process: peak RSS, growth after its warm-up, fds at start and end."""
    rows = []
    growths: list[float] = []
    deltas: list[int] = []
    for proc in samples.values():
        if not proc.samples:
            continue
        born = ready.get(proc.pid, proc.samples[0][0]) if proc.role == "worker" else \
            proc.samples[0][0]
        after = [s[1] for s in proc.samples if s[0] >= born + warmup]
        growth = None
        if len(after) >= 2 * _SETTLE:
            # Medians of the first and the last _SETTLE samples: a transient peak (a backlog
            # of queued jobs, a burst of connections) is freed again and is not growth.
            base = statistics.median(after[:_SETTLE])
            end = statistics.median(after[-_SETTLE:])
            growth = round(100.0 * (end - base) / base, 1)
            growths.append(growth)
        fd_start = next((s[2] for s in proc.samples if s[0] >= born), proc.samples[0][2])
        fd_end = end_fds.get(proc.pid)
        if fd_end is not None:
            ref = fd_reference if proc.role == "worker" and fd_reference is not None \
                else fd_start
            deltas.append(fd_end - ref)
        rows.append({"pid": proc.pid, "role": proc.role,
                     "lived_s": round(proc.samples[-1][0] - proc.samples[0][0], 1),
                     "rss_peak_mib": round(max(s[1] for s in proc.samples) / 1024, 1),
                     "rss_growth_pct": growth, "fd_start": fd_start, "fd_end": fd_end,
                     "queued_jobs_peak": queue_peak.get(proc.pid),
                     "rss_mib_every_10s": [round(s[1] / 1024, 1) for s in proc.samples[::10]]})
    return {"rss_growth_pct": max(growths) if growths else None,
            "fd_delta": max(deltas, key=abs) if deltas else None,
            "processes": rows}


def latency(samples: list[tuple[float, float]], t0: float) -> list[dict[str, Any]]:
    """Request/reply round trips: p50 and p99 per minute of the run, in milliseconds."""
    minutes: dict[int, list[float]] = defaultdict(list)
    for start, seconds in samples:
        minutes[int((start - t0) // 60)].append(seconds * 1000)
    out = []
    for minute in sorted(minutes):
        values = sorted(minutes[minute])
        q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 \
            else values * 99
        out.append({"minute": minute + 1, "requests": len(values),
                    "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2)})
    return out


def chaos_figures(log: ChaosLog, failures: list[tuple[float, str]]) -> dict[str, Any]:
    """Kills and their replacements; churn failures inside reload and kill windows."""
    def within(kinds: tuple[str, ...]) -> int:
        spans = [(w.start, w.end + 1.0) for w in log.windows if w.kind in kinds]
        return sum(1 for t, _ in failures if any(a <= t <= b for a, b in spans))

    kills = log.kills
    serving = [k.serving_after for k in kills if k.serving_after is not None]
    return {
        "workers_killed": len(kills),
        "workers_replaced": sum(1 for k in kills if k.replacement is not None),
        "replacement_ready_max_s": max((round(k.ready_after, 3) for k in kills
                                        if k.ready_after is not None), default=None),
        "replacement_serving_max_s": round(max(serving), 3) if serving else None,
        "replacements_serving_within_1s": sum(1 for s in serving if s <= 1.0),
        "reloads": sum(1 for w in log.windows if w.kind == "hup"),
        "reload_connect_errors": within(("hup",)),
        "kill_connect_errors": within(("kill",)),
        "scale_connect_errors": within(("ttin", "ttou")),
        "connect_errors": len(failures),
        "kills": [{"pid": k.pid, "replacement": k.replacement,
                   "ready_after_s": None if k.ready_after is None else round(k.ready_after, 3),
                   "serving_after_s": None if k.serving_after is None
                   else round(k.serving_after, 3)} for k in kills],
        "chaos": summary(log),
    }
