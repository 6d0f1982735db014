"""Cluster mode: several `evserver serve` nodes on one real redis-server (docs/cluster.md).

Each test starts its own redis-server (``redis_factory``) and 2-3 nodes with short leases,
so failovers finish in seconds. The app (tests/apps/cluster_app.py) records every run in one
file shared by the nodes; what was acked, lost, duplicated and reordered is read from it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from conftest import APPS, REPO, free_port, wait_for

from evserver import Client, RemoteError
from evserver.cluster.keys import Keys
from evserver.cluster.partition import key_partition

APP = f"{APPS}/cluster_app.py:app"
PARTITIONS = 16
KEYS = Keys("evserver")


def start_nodes(server_factory, redis, n, record: Path, *, lease=2.0, fail_while="",
                **settings):
    """``n`` nodes of one cluster, each with its own admin port (``node.admin``)."""
    env = {"EVSERVER_CLUSTER_ENABLED": "true", "EVSERVER_CLUSTER_URL": redis.url,
           "EVSERVER_CLUSTER_LEASE": str(lease), "CLUSTER_RECORD": str(record),
           "CLUSTER_FAIL_WHILE": fail_while,
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


def cluster_cli(redis, cwd: Path, *args: str):
    """``evserver cluster ARGS`` against this Redis; its JSON output."""
    out = subprocess.run([sys.executable, "-m", "evserver", "cluster", *args],
                         env={"EVSERVER_CLUSTER_ENABLED": "1", "EVSERVER_CLUSTER_URL": redis.url,
                              "PYTHONPATH": str(REPO)}, capture_output=True, timeout=30, cwd=cwd)
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout)


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
        self.halt = False  # set to stop after the current chunk

    def run(self) -> None:
        with Client(*self.node.address, timeout=30) as client:
            for start in range(0, len(self.events), self.chunk):
                if self.halt:
                    return
                part = self.events[start:start + self.chunk]
                try:
                    client.send_many(part, ack=True, batch_size=50)
                except (RemoteError, OSError) as exc:
                    self.errors.append(exc)
                    continue
                self.acked += [(e["key"], e["n"]) for _t, e in part]
                self.progress += len(part)


def check_runs(record: Path, acked: list[tuple[str, int]], *, ordered: bool = True) -> int:
    """Nothing acked is missing, first runs per key are in order (unless not ``ordered``);
    returns the duplicates."""
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
        assert not ordered or ns == sorted(ns), f"key {key}: first runs out of order: {ns[:50]}"
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
    status = cluster_cli(redis, tmp_path, "status", "--json")
    assert {n["id"].split("-")[-2] for n in status["nodes"]} == {str(n.proc.pid) for n in nodes}
    rows = status["partition_owners"]
    assert len(rows) == PARTITIONS and all(r["owner"] and r["lag"] == 0 for r in rows)
    assert sum(r["pending"] for r in rows) == 0
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{nodes[0].admin}/metrics",
                                     timeout=10).read().decode()
    assert "evserver_cluster_appended_events_total 2000.0" in metrics


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


# --------------------------------------------------------------------------- failover


def stream(nodes, total: int, clients: int = 3) -> list[Streamer]:
    streamers = [Streamer(f"c{i}", nodes[i % len(nodes)], total // clients)
                 for i in range(clients)]
    for s in streamers:
        s.start()
    return streamers


def finish(streamers: list[Streamer], timeout: float = 120.0) -> list[tuple[str, int]]:
    deadline = time.monotonic() + timeout
    for s in streamers:
        s.join(max(0.0, deadline - time.monotonic()))
        assert not s.is_alive(), "a client did not finish in time"
    errors = [e for s in streamers for e in s.errors]
    assert not errors, f"{len(errors)} chunks failed: {errors[:3]}"
    return [e for s in streamers for e in s.acked]


def progress(streamers: list[Streamer]) -> int:
    """Events acknowledged so far, over all clients."""
    return sum(s.progress for s in streamers)


def acked_across(streamers: list[Streamer], change: Callable[[], object], after: str,
                 events: int = 2000) -> list[tuple[str, int]]:
    """Let ``events`` through, make the ``change`` to the cluster, wait until as many more
    got through ``after`` it, then stop the clients: what they had acknowledged."""
    wait_for(lambda: progress(streamers) >= events, 60, "some events")
    change()
    done = progress(streamers)
    wait_for(lambda: progress(streamers) >= done + events, 60, f"more events {after}")
    for s in streamers:
        s.halt = True
    return finish(streamers)


def test_sigkill_of_a_node_loses_nothing_acked_keeps_key_order_and_counts_duplicates(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    record = tmp_path / "runs"
    lease = 2.0
    a, b, c = start_nodes(server_factory, redis, 3, record, lease=lease)
    wait_balanced(redis, [a, b, c])
    started = time.monotonic()
    streamers = stream([a, b], 20_000)
    wait_for(lambda: progress(streamers) >= 5000, 60, "a quarter of the events")
    c.stop(signal.SIGKILL)
    acked = finish(streamers)
    elapsed = time.monotonic() - started
    assert len(acked) == 20_000 - 20_000 % 3
    duplicates = check_runs(record, acked)
    per_lease = len(acked) / elapsed * lease
    assert duplicates < per_lease, (duplicates, per_lease)
    # C's partitions move once its leases expire: the clients may finish first, when no
    # event they sent after the kill fell in a partition of C's.
    wait_for(lambda: set(owners(redis).values()) == {a.proc.pid, b.proc.pid}, 10 * lease,
             "C's partitions to move to A and B")
    counted = sum(stats(n)["totals"]["cluster"]["redelivered_events"] for n in (a, b))
    assert duplicates <= counted, (duplicates, counted)


def test_a_node_stopped_past_its_lease_loses_its_partitions_and_rejoins(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    record = tmp_path / "runs"
    lease = 1.0
    a, b = start_nodes(server_factory, redis, 2, record, lease=lease)
    wait_balanced(redis, [a, b])
    streamers = stream([a], 6000, clients=2)
    wait_for(lambda: progress(streamers) >= 1000, 60, "some events")
    b.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: set(owners(redis).values()) == {a.proc.pid}, 10 * lease,
                 "A to take every partition over")
    finally:
        b.proc.send_signal(signal.SIGCONT)
    acked = finish(streamers)
    # Nothing lost; order is not checked here: entries the stalled node had already handed
    # to its dispatcher run when it wakes (the overlap window in docs/cluster.md), and were
    # once seen to run a key's later event first in a loaded full-suite run.
    check_runs(record, acked, ordered=False)
    wait_balanced(redis, [a, b])  # B rejoined and got its share back


def test_a_node_joining_under_load_loses_nothing_and_duplicates_nothing(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    record = tmp_path / "runs"
    (a,) = start_nodes(server_factory, redis, 1, record)
    wait_balanced(redis, [a])
    streamers = stream([a], 300_000)
    nodes = [a]

    def join() -> None:
        nodes.extend(start_nodes(server_factory, redis, 1, record))
        wait_balanced(redis, nodes)

    acked = acked_across(streamers, join, "after B joined")
    assert check_runs(record, acked) == 0
    assert {pid for _k, _n, pid in runs(record)} == {node.proc.pid for node in nodes}


def test_an_event_that_kills_its_node_is_dead_lettered_after_max_deliveries(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    record = tmp_path / "runs"
    nodes = start_nodes(server_factory, redis, 3, record, lease=1.0, max_deliveries=2)
    wait_balanced(redis, nodes)
    with Client(*nodes[0].address) as client:
        client.send("job.die", {"key": "poison"})  # fire-and-forget: its node may die of it
    # Deliveries 1 and 2 each kill the node that runs them (a delivery whose node lost its
    # lease before running it also counts); delivery 3 goes to the dead-letter stream.
    wait_for(lambda: redis.client().xlen(KEYS.dead) >= 1, 30,
             "the poison event in the dead-letter stream")
    died = [n for n in nodes if n.proc.poll() is not None]
    live = [n for n in nodes if n.proc.poll() is None]
    assert died and live and all(n.proc.returncode == 1 for n in died)
    with Client(*live[0].address, timeout=30) as client:  # the partition moved on
        assert client.request("job.ok", {"key": "poison", "n": 1}) in {
            n.proc.pid for n in live}
    dead = list(redis.client().xrange(KEYS.dead))
    assert len(dead) == 1
    out = subprocess.run(
        [sys.executable, "-m", "evserver", "dead-letters", "list", "--json"],
        env={"EVSERVER_CLUSTER_ENABLED": "1", "EVSERVER_CLUSTER_URL": redis.url,
             "PYTHONPATH": str(REPO)}, capture_output=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    (letter,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert (letter["event_type"], letter["data"], letter["attempts"]) == (
        "job.die", {"key": "poison"}, 3)
    assert sum(stats(n)["totals"]["cluster"]["dead_lettered_events"] for n in live) == 1


def test_redis_restarting_with_aof_loses_nothing_acknowledged(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory("--appendonly", "yes", "--appendfsync", "everysec")
    record = tmp_path / "runs"
    a, b = start_nodes(server_factory, redis, 2, record, lease=2.0)
    wait_balanced(redis, [a, b])
    streamers = stream([a, b], 6000, clients=2)
    wait_for(lambda: progress(streamers) >= 1500, 60, "some events")
    redis.restart()
    deadline = time.monotonic() + 120
    for s in streamers:
        s.join(max(0.0, deadline - time.monotonic()))
        assert not s.is_alive()
    acked = [e for s in streamers for e in s.acked]
    failed = sum(len(s.errors) for s in streamers)
    assert len(acked) + failed * 100 == 6000
    check_runs(record, acked)  # every acknowledged event ran
    # The nodes reconnected: the cluster works again through both.
    wait_balanced(redis, [a, b])
    for node in (a, b):
        with Client(*node.address) as client:
            client.send_many([("count", {"key": "after", "n": n}) for n in range(100)],
                             ack=True)


def test_sigterm_hands_partitions_over_without_loss_or_duplicates(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    record = tmp_path / "runs"
    a, b = start_nodes(server_factory, redis, 2, record)
    wait_balanced(redis, [a, b])
    streamers = stream([a], 300_000, clients=2)

    def leave() -> None:
        assert b.stop(signal.SIGTERM) == 0  # drains, finishes and acks, releases its leases
        wait_for(lambda: set(owners(redis).values()) == {a.proc.pid}, 10, "A to own everything")

    acked = acked_across(streamers, leave, "after B left")
    assert check_runs(record, acked) == 0
    assert "left" in b.log()


def test_dead_letters_of_every_node_are_listed_and_replayed_from_the_cluster_stream(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    record = tmp_path / "runs"
    flag = tmp_path / "fail"
    flag.touch()
    nodes = start_nodes(server_factory, redis, 2, record, fail_while=str(flag))
    wait_balanced(redis, nodes)
    with Client(*nodes[0].address) as client:
        for n in range(6):  # unkeyed: their partitions, and so their nodes, vary
            try:
                client.send("flaky", {"key": "f", "n": n}, ack=True)
                raise AssertionError("a failing handler must not be acked")
            except RemoteError as exc:
                assert exc.code == "handler_error"
    listed = cluster_cli(redis, tmp_path, "status", "--json")
    assert listed["dead_letters"] == 6
    env = {"EVSERVER_CLUSTER_ENABLED": "1", "EVSERVER_CLUSTER_URL": redis.url,
           "PYTHONPATH": str(REPO)}
    flag.unlink()
    replay = subprocess.run(
        [sys.executable, "-m", "evserver", "dead-letters", "replay", "--port",
         str(nodes[1].port)], env=env, capture_output=True, timeout=60, cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr.decode()
    assert b"replayed 6, failed 0" in replay.stdout
    assert sorted(n for _k, n, _p in runs(record)) == list(range(6))
    assert redis.client().xlen(KEYS.dead) == 0


def test_a_hup_reload_of_worker_nodes_hands_partitions_over_without_loss_or_duplicates(
        server_factory, redis_factory, tmp_path):
    redis = redis_factory()
    record = tmp_path / "runs"
    (edge,) = start_nodes(server_factory, redis, 1, record)  # a single-process node
    env = {"EVSERVER_CLUSTER_ENABLED": "true", "EVSERVER_CLUSTER_URL": redis.url,
           "EVSERVER_CLUSTER_LEASE": "2", "CLUSTER_RECORD": str(record)}
    workers = server_factory(APP, "--workers", "2", "--admin-port", str(free_port()), env=env)
    client = redis.client()

    def nodes_live():
        return len(client.zrange(KEYS.nodes, 0, -1))

    wait_for(lambda: nodes_live() == 3 and all(owners(redis).values()), 15, "3 nodes")
    streamers = stream([edge], 300_000, clients=2)

    def reload() -> None:
        before = set(client.zrange(KEYS.nodes, 0, -1))
        workers.proc.send_signal(signal.SIGHUP)  # new worker nodes start, the old ones hand over
        wait_for(lambda: len(set(client.zrange(KEYS.nodes, 0, -1)) - before) == 2
                 and nodes_live() == 3, 30, "the new worker nodes to replace the old ones")

    acked = acked_across(streamers, reload, "after the reload")
    assert check_runs(record, acked) == 0
