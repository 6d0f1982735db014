"""THE ONE LONG TEST (about 75 s): a 60-second soak with a fixed seed, and its figures checked.

``evserver soak --duration 60 --seed 20 --workers 2 --json`` starts ``evserver serve
--workers 2`` on the soak app, drives native and Forward load at it (fire-and-forget, acked
batches, request/reply, ordered keys, failing and dead-lettered events, connection churn)
and injects faults on the seed's schedule: SIGKILLed workers, HUP reloads, TTIN/TTOU,
slowloris and garbage connections, 1,000 idle connections, a client that stops reading.
Deselect it with ``-m "not soak"``; docs/reliability.md has the 10-minute figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.soak,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; SO_REUSEPORT"),
]

REPO = Path(__file__).resolve().parent.parent


def test_soak_60s_loses_no_acked_event_and_leaks_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVSERVER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-m", "evserver", "soak", "--duration", "60", "--seed", "20",
         "--workers", "2", "--json", "--keep", str(tmp_path / "soak")],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert run.stdout.strip(), run.stderr
    doc = json.loads(run.stdout)
    report = json.dumps({k: v for k, v in doc.items() if k != "processes"}, indent=1)
    # Delivery: everything acknowledged was processed; ordered keys ran in order.
    assert doc["sent"] > 50_000 and doc["acked"] > 20_000, report
    assert doc["processed"] >= doc["acked"], report
    assert doc["acked_lost"] == 0, report
    assert doc["order_violations"] == 0, report
    assert doc["unknown_records"] == 0 and doc["wrong_replies"] == 0, report
    # Dead letters: exactly the events sent to fail every attempt, all of them stored.
    assert doc["dead_letters_answered"] > 0, report
    assert doc["dead_letters_missing"] == 0 and doc["dead_letters_unexpected"] == 0, report
    assert doc["doomed_acked"] == 0, report
    # Faults happened, and every killed worker was replaced and answering within 1 s.
    done = doc["chaos"]["done"]
    assert {"kill", "hup", "scale", "slowloris", "garbage", "idle", "nonreader"} <= set(done)
    assert doc["workers_killed"] >= 1 and doc["reloads"] >= 1, report
    assert doc["workers_replaced"] == doc["workers_killed"], report
    assert doc["replacements_serving_within_1s"] == doc["workers_killed"], report
    assert doc["chaos"]["problems"] == [] and doc["chaos"]["garbage_unanswered"] == 0, report
    # Resources: no worker grew over 10 % after its warm-up; fds back to a fresh process's.
    # (Seed 20 reloads late enough for the first workers to outlive their warm-up.)
    grown = [r["rss_growth_pct"] for r in doc["processes"]
             if r["role"] == "worker" and r["rss_growth_pct"] is not None]
    assert grown and max(grown) < 10, doc["processes"]
    assert doc["rss_growth_pct"] < 10, report
    assert doc["fd_delta"] is not None and abs(doc["fd_delta"]) <= 2, doc["processes"]
    assert doc["settled_at_end"] and doc["connections_drained"], report
    # Reloads under connection churn reset nothing where listeners can migrate their queues.
    assert doc["reload_connect_errors"] == 0 or not doc["reuseport_migration"], report
    assert doc["master_exit_code"] == 0, report
    assert doc["passed"] and run.returncode == 0, report
