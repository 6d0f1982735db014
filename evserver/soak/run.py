"""One soak run, start to finish: ``soak()`` returns the figures, ``table()`` prints them."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import report
from .chaos import Chaos, schedule
from .ledger import Ledger
from .load import (
    BatchLoad,
    Churn,
    FireLoad,
    FlakyLoad,
    ForwardLoad,
    Load,
    OrderedLoad,
    RequestLoad,
)
from .watch import Sampler, Server

# What a run must show (docs/reliability.md); ``checks`` says which held.
RSS_GROWTH_LIMIT_PCT = 10.0
FD_TOLERANCE = 2
SERVING_LIMIT_S = 1.0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def soak(duration: float, seed: int, workers: int, *, rate_scale: float = 1.0,
         keep: Path | None = None, progress: Callable[[str], None] = _stderr
         ) -> dict[str, Any]:
    """Run the server under load and chaos for ``duration`` seconds; return the figures."""
    workdir = Path(tempfile.mkdtemp(prefix="evserver-soak-")) if keep is None else keep
    workdir.mkdir(parents=True, exist_ok=True)
    warmup = min(60.0, duration / 4)
    quiet = min(10.0, duration / 10)
    server = Server(workdir, workers)
    server.start()
    try:
        doc = _drive(server, duration, seed, warmup, quiet, rate_scale, progress)
    finally:
        server.kill()
    doc.update({"seed": seed, "duration_s": duration, "workers": workers,
                "warmup_s": warmup, "rate_scale": rate_scale, "workdir": str(workdir)})
    doc["checks"] = checks(doc)
    doc["passed"] = all(doc["checks"].values())
    (workdir / "soak.json").write_text(json.dumps(doc, indent=2))
    if keep is None and doc["passed"]:
        shutil.rmtree(workdir, ignore_errors=True)
        doc["workdir"] = None
    return doc


def _drive(server: Server, duration: float, seed: int, warmup: float, quiet: float,
           rate_scale: float, progress: Callable[[str], None]) -> dict[str, Any]:
    sampler = Sampler(server)
    sampler.sample()  # fresh workers, before any load: the fd reference
    fd_reference = max(p.samples[0][2] for p in sampler.processes.values()
                       if p.role == "worker")
    ledger = Ledger()
    native, forward = server.address, server.forward_address
    flaky = FlakyLoad("flaky", ledger, native, seed)
    requests = [RequestLoad(f"r{i}", ledger, native, seed) for i in range(2)]
    churn = Churn("churn", ledger, native, seed)
    loads: list[Load] = [FireLoad("fire", ledger, native, seed),
                         BatchLoad("batch", ledger, native, seed),
                         OrderedLoad("ordered", ledger, native, seed),
                         ForwardLoad("forward", ledger, forward, seed),
                         flaky, churn, *requests]
    t0 = time.monotonic()
    for load in loads:
        load.start()
    sampler.start()
    chaos = Chaos(server, schedule(seed, duration, warmup, quiet, rate_scale), t0, seed)
    chaos.start()
    while (left := t0 + duration - time.monotonic()) > 0:
        time.sleep(min(10.0, left))
        sent = sum(len(s.states) for s in ledger.streams.values())
        progress(f"soak: {time.monotonic() - t0:5.0f}s  sent {sent}  faults "
                 f"{sum(chaos.log.done.values())}  workers {len(server.worker_pids())}")
    chaos.stop()
    settled = server.wait(lambda: server.settled(server.workers), 30.0)
    for load in loads:
        load.stop()
    for load in loads:
        load.join(60)
    drained = server.wait(lambda: _connections(server) == 0, 20.0, interval=0.2)
    sampler.stop()
    end_fds = sampler.sample()
    exit_code = server.stop()
    server.poll_log()
    doc = report.tally(ledger, server.workdir)
    doc.update(report.dead_letters(server.workdir / "dead-letters", flaky.stream.name,
                                   flaky.doomed, flaky.dead_lettered))
    doc.update(report.chaos_figures(chaos.log, churn.failures))
    doc.update(report.processes(sampler.processes, server.ready, warmup, fd_reference,
                                end_fds, sampler.queue_peak))
    doc["latency"] = report.latency([x for r in requests for x in r.latencies], t0)
    doc.update({
        "churn_connections": churn.completed,
        "client_errors": {load.name: dict(load.errors) for load in loads if load.errors},
        "wrong_replies": sum(r.wrong_replies for r in requests),
        "doomed_acked": flaky.doomed_acked,
        "settled_at_end": settled, "connections_drained": drained,
        "master_exit_code": exit_code,
        "reuseport_migration": not server.logged("SO_REUSEPORT migration unavailable"),
        "server_errors": [str(line.get("message"))[:300] for line in server.lines
                          if line.get("level") in ("error", "critical", "raw")
                          and "InjectedFailure" not in str(line.get("message"))][:20],  # soak.app's
    })
    return doc


def _connections(server: Server) -> int:
    try:
        return sum(int(w.get("connections", 0)) for w in server.stats().get("workers", []))
    except OSError:
        return -1


def checks(doc: dict[str, Any]) -> dict[str, bool]:
    """The acceptance checks of a run (docs/reliability.md)."""
    growth = doc.get("rss_growth_pct")
    fd_delta = doc.get("fd_delta")
    return {
        "acked_lost == 0": doc["acked_lost"] == 0,
        "order_violations == 0": doc["order_violations"] == 0,
        f"rss_growth_pct < {RSS_GROWTH_LIMIT_PCT:g}": growth is not None
        and growth < RSS_GROWTH_LIMIT_PCT,
        f"|fd_delta| <= {FD_TOLERANCE}": fd_delta is not None and abs(fd_delta) <= FD_TOLERANCE,
        "every killed worker replaced": doc["workers_replaced"] == doc["workers_killed"],
        f"every replacement serving within {SERVING_LIMIT_S:g}s":
            doc["replacements_serving_within_1s"] == doc["workers_killed"],
        "dead letters match the injected failures": doc["dead_letters_missing"] == 0
        and doc["dead_letters_unexpected"] == 0 and doc["doomed_acked"] == 0,
        "clean stop (exit 0)": doc["master_exit_code"] == 0,
        # Only where listeners migrate their queues (docs/reliability.md): else a reload can
        # reset a connection queued on a closing listener.
        "no connection failed during reloads": doc["reload_connect_errors"] == 0
        or not doc["reuseport_migration"],
    }


def table(doc: dict[str, Any]) -> str:
    """The figures as aligned text, for people."""
    keys = ("sent", "acked", "processed", "acked_lost", "duplicates", "order_violations",
            "fire_and_forget_lost", "dead_letters", "dead_letters_injected",
            "dead_letters_answered", "workers_killed", "workers_replaced",
            "replacement_ready_max_s", "replacement_serving_max_s", "reloads",
            "reload_connect_errors", "kill_connect_errors", "scale_connect_errors",
            "connect_errors", "churn_connections", "rss_growth_pct", "fd_delta")
    lines = [f"evserver soak: {doc['duration_s']:g}s, seed {doc['seed']}, "
             f"{doc['workers']} workers, faults {doc['chaos']['done']}"]
    lines += [f"  {key:<28} {doc.get(key)}" for key in keys]
    lines.append(f"  {'pid':>8} {'role':<7} {'lived_s':>8} {'rss_peak_mib':>12} "
                 f"{'rss_growth_pct':>14} {'fd_start':>8} {'fd_end':>6} {'queued_peak':>11}")
    for row in doc["processes"]:
        lines.append(f"  {row['pid']:>8} {row['role']:<7} {row['lived_s']:>8} "
                     f"{row['rss_peak_mib']:>12} {row['rss_growth_pct']!s:>14} "
                     f"{row['fd_start']:>8} {row['fd_end']!s:>6} "
                     f"{row['queued_jobs_peak']!s:>11}")
    lines.append("  request/reply latency per minute:")
    lines += [f"    minute {m['minute']:>2}: {m['requests']:>6} requests  p50 {m['p50_ms']} ms  "
              f"p99 {m['p99_ms']} ms" for m in doc["latency"]]
    lines.append("  checks:")
    lines += [f"    {'ok  ' if ok else 'FAIL'} {name}" for name, ok in doc["checks"].items()]
    if doc["client_errors"]:
        lines.append(f"  client errors (retried or given up): {doc['client_errors']}")
    if doc["chaos"]["problems"]:
        lines.append(f"  chaos problems: {doc['chaos']['problems']}")
    if doc["server_errors"]:
        lines.append(f"  server errors: {doc['server_errors']}")
    return "\n".join(lines)
