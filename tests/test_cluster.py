"""Cluster mode: several `evserver serve` nodes on one real redis-server (docs/cluster.md).

Each test starts its own redis-server (``redis_factory``) and 2-3 nodes with short leases,
so failovers finish in seconds. The app (tests/apps/cluster_app.py) records every run in one
file shared by the nodes; what was acked, lost, duplicated and reordered is read from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

from conftest import APPS, REPO, free_port, wait_for

from evserver import Client, RemoteError
from evserver.cluster.keys import Keys
from evserver.cluster.partition import key_partition

APP = f"{APPS}/cluster_app.py:app"
PARTITIONS = 16
KEYS = Keys("evserver")


def start_nodes(server_factory, redis, n, record: Path, *, lease=2.0, **settings):
    """``n`` nodes of one cluster, each with its own admin port (``node.admin``)."""
    env = {"EVSERVER_CLUSTER_ENABLED": "true", "EVSERVER_CLUSTER_URL": redis.url,
           "EVSERVER_CLUSTER_LEASE": str(lease), "CLUSTER_RECORD": str(record),
           **{f"EVSERVER_CLUSTER_{k.upper()}": str(v) for k, v in settings.items()}}
    nodes = []
    for _ in range(n):
        admin = free_port()
        node = server_factory(APP, "--admin-port", str(admin), env=env)
        node.admin = admin
        nodes.append(node)
    return nodes


def owners(redis) -> dict[int, int | None]:
    """Each partition's lease holder, as the pid in its node id."""
    client = redis.client()
    held = client.mget([KEYS.lease(p) for p in range(PARTITIONS)])
    return {p: int(v.decode().split("-")[-2]) if v else None for p, v in enumerate(held)}


def wait_balanced(redis, nodes, timeout=15.0) -> dict[int, int | None]:
    """Wait until every partition is held and each of ``nodes`` holds some."""
    pids = {node.proc.pid for node in nodes}

    def balanced():
        held = owners(redis)
        return held if set(held.values()) == pids else None

    return wait_for(balanced, timeout, f"partitions spread over {sorted(pids)}")


def runs(record: Path) -> list[tuple[str, str, int]]:
    """(key, n, pid) per recorded run, in the order they ran."""
    lines = record.read_text().splitlines() if record.exists() else []
    return [(key, int(n), int(pid)) for _id, key, n, pid in (ln.split("\t") for ln in lines)]


def stats(node) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin}/stats", timeout=10) as resp:
        return json.load(resp)


class Streamer(threading.Thread):
    """One client sending ``seq`` events of its own keys in acked chunks; remembers which
    chunks were acknowledged."""

    def __init__(self, name: str, node, total: int, keys: int = 10, chunk: int = 100) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.events = [("seq", {"key": f"{name}-{i % keys}", "n": i // keys})
                       for i in range(total)]
        self.chunk = chunk
        self.acked: list[tuple[str, int]] = []
        self.errors: list[BaseException] = []
        self.progress = 0

    def run(self) -> None:
        with Client(*self.node.address, timeout=30) as client:
            for start in range(0, len(self.events), self.chunk):
                part = self.events[start:start + self.chunk]
                try:
                    client.send_many(part, ack=True, batch_size=50)
                except (RemoteError, OSError) as exc:
                    self.errors.append(exc)
                    continue
                self.acked += [(e["key"], e["n"]) for _t, e in part]
                self.progress += len(part)


def check_runs(record: Path, acked: list[tuple[str, int]]) -> int:
    """Nothing acked is missing, first runs per key are in order; returns the duplicates."""
    ran = runs(record)
    seen = Counter((key, n) for key, n, _pid in ran)
    missing = [e for e in acked if e not in seen]
    assert not missing, f"{len(missing)} acked events never ran, e.g. {missing[:5]}"
    firsts: defaultdict[str, list[int]] = defaultdict(list)
    done = set()
    for key, n, _pid in ran:
        if (key, n) not in done:
            done.add((key, n))
            firsts[key].append(n)
    for key, ns in firsts.items():
        assert ns == sorted(ns), f"key {key}: first runs out of order: {ns[:50]}"
    return sum(seen.values()) - len(seen)


# --------------------------------------------------------------------------- basics


def test_events_sent_to_any_node_are_processed_and_every_node_gets_a_share(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    record = tmp_path / "runs"
    nodes = start_nodes(server_factory, redis, 2, record)
    wait_balanced(redis, nodes)
    sent = []
    for i, node in enumerate(nodes):
        with Client(*node.address) as client:
            events = [("count", {"key": f"{i}", "n": n}) for n in range(2000)]
            client.send_many(events, ack=True, batch_size=20)
            sent += [(e["key"], e["n"]) for _t, e in events]
    ran = runs(record)
    assert sorted((k, n) for k, n, _ in ran) == sorted(sent)  # each exactly once
    by_pid = Counter(pid for _k, _n, pid in ran)
    assert set(by_pid) == {node.proc.pid for node in nodes}
    assert min(by_pid.values()) > len(sent) / 10, by_pid


def test_a_request_to_one_node_is_answered_there_when_another_node_runs_it(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    a, b = start_nodes(server_factory, redis, 2, tmp_path / "runs")
    held = wait_balanced(redis, [a, b])
    # A key of a partition B holds: its processor runs on B, the request went to A.
    key = next(f"k{i}" for i in range(1000)
               if held[key_partition(("seq", f"k{i}"), PARTITIONS)] == b.proc.pid)
    with Client(*a.address) as client:
        for n in range(20):
            assert client.request("seq", {"key": key, "n": n}) == b.proc.pid
        try:
            client.request("nothing.here", {})
            raise AssertionError("an unrouted request must fail")
        except RemoteError as exc:
            assert exc.code == "no_handler"


def test_ack_stored_acknowledges_once_appended_and_still_runs_everything(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    record = tmp_path / "runs"
    a, b = start_nodes(server_factory, redis, 2, record, ack="stored")
    wait_balanced(redis, [a, b])
    with Client(*a.address) as client:
        client.send_many([("count", {"key": "s", "n": n}) for n in range(3000)], ack=True)
    wait_for(lambda: len(runs(record)) >= 3000, 15, "every stored event to run")
    assert sorted(n for _k, n, _p in runs(record)) == list(range(3000))


def test_a_node_configured_with_another_partition_count_refuses_to_start(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    start_nodes(server_factory, redis, 1, tmp_path / "runs")
    env = {"EVSERVER_CLUSTER_ENABLED": "1", "EVSERVER_CLUSTER_URL": redis.url,
           "EVSERVER_CLUSTER_PARTITIONS": "8", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "evserver", "serve", APP, "--port", "0",
                           "--no-admin-enabled"], env=env, capture_output=True, timeout=30,
                          cwd=tmp_path)
    assert proc.returncode == 1
    assert "has 16 partitions in Redis but this node is configured with 8" in proc.stderr.decode()


def test_without_a_cluster_table_redis_is_never_imported():
    code = ("import sys; from evserver.config import load_config; from evserver.server "
            "import Server; from evserver.app import App; "
            "Server.from_config(App(), load_config(env={})); "
            "assert 'redis' not in sys.modules, 'redis imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30,
                         cwd=REPO)
    assert out.stdout.strip() == b"ok", out.stderr.decode()
