"""Cluster bench: acked batches through 1 node, then 2 nodes, of one cluster on Redis Streams.

It starts its own redis-server (Debian's; no persistence unless ``--aof``) on a free loopback
port, then for each node count: empties Redis, starts the nodes (``evserver serve
scripts/bench_app.py:app`` with ``[cluster] enabled``), waits until every partition is
leased and each node holds some, and runs generator processes that send acked BATCH frames
round-robin over the nodes' connections (``--window`` batches in flight per connection).
An ACK means the owner ran the batch's events (``ack = "processed"``, or ``--ack stored``).
It reports acked events/s and the p50/p99 of batch round trips, and checks with Redis that
nothing is left pending.

    python scripts/bench_cluster.py                      # 1 node vs 2 nodes, a table
    evserver bench --cluster --duration 5 --json         # the same through the CLI
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
HELLO, EVENT, BATCH, REQUEST, ACK, REPLY, ERROR = range(7)
EVENT_BODY = ["bench", {"seq": 12345, "payload": "x" * 16}]
IO_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (on a shared machine, CPU per event says
    more than events/s, which depends on what else runs)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)  # a poll interval
    return value


@contextlib.contextmanager
def redis_server(aof: bool) -> Iterator[tuple[str, int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench_cluster: redis-server is not installed "
                         "(apt-get install -y redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else []
        proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save",
                                 "", "--dir", tmp, *args], stdout=subprocess.DEVNULL)
        try:
            import redis

            client = redis.Redis(port=port)
            wait(lambda: _ping(client), 10, "redis-server")
            yield f"redis://127.0.0.1:{port}/0", proc.pid
        finally:
            proc.terminate()
            proc.wait(10)


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@contextlib.contextmanager
def nodes(n: int, url: str, args: argparse.Namespace) -> Iterator[tuple[list[int], list[int]]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(SCRIPTS)]),
               PYTHONWARNINGS="ignore", EVSERVER_CLUSTER_ENABLED="1", EVSERVER_CLUSTER_URL=url,
               EVSERVER_CLUSTER_ACK=args.ack, EVSERVER_CLUSTER_LEASE="5")
    procs, ports = [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for _ in range(n):
                port = free_port()
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "evserver", "serve", "bench_app:app", "--port",
                     str(port), "--no-admin-enabled", "--pool-size", str(args.pool_size)],
                    cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                ports.append(port)
            for port in ports:
                wait(lambda port=port: _hello(port), 20, f"node on port {port}")
            import redis

            client = redis.Redis.from_url(url)
            pids = {str(p.pid) for p in procs}

            def balanced() -> bool:
                held = client.mget([f"evserver:lease:{{evserver.{p}}}" for p in range(16)])
                return {h.decode().split("-")[-2] for h in held if h} == pids and all(held)

            wait(balanced, 30, "partitions to spread over the nodes")
            yield ports, [p.pid for p in procs]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _hello(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return bool(sock.recv(64))
    except OSError:
        return False


def generator(ports: list[int], conns: int, batch: int, window: int, duration: float,
              start_at: float, out: Any) -> None:
    """Acked batches on ``conns`` connections until the deadline; round trips in seconds."""
    events = [EVENT_BODY] * batch
    socks = []
    for i in range(conns):
        sock = socket.create_connection(("127.0.0.1", ports[i % len(ports)]),
                                        timeout=IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append((sock, msgpack.Unpacker()))
    for sock, unpacker in socks:
        _frame(sock, unpacker)  # HELLO
    time.sleep(max(0.0, start_at - time.time()))  # every generator starts together
    deadline = time.monotonic() + duration
    acked, rtts, errors = 0, [], 0
    sent_at: dict[tuple[int, int], float] = {}
    corr = 0
    for ci, (sock, _u) in enumerate(socks):
        for _ in range(window):
            corr += 1
            sent_at[ci, corr] = time.monotonic()
            sock.sendall(msgpack.packb([BATCH, corr, events]))
    import selectors

    sel = selectors.DefaultSelector()
    for ci, (sock, _u) in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ, ci)
    while sent_at:
        for key, _ in sel.select(IO_TIMEOUT):
            ci = key.data
            sock, unpacker = socks[ci]
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("a node closed the connection")
            unpacker.feed(data)
            for frame in unpacker:
                now = time.monotonic()
                if (ci, frame[1]) not in sent_at:
                    raise RuntimeError(f"unexpected answer {frame!r} on connection {ci}")
                rtts.append(now - sent_at.pop((ci, frame[1])))
                if frame[0] == ACK:
                    acked += batch
                else:
                    errors += 1
                if now < deadline:
                    corr += 1
                    sent_at[ci, corr] = now
                    sock.sendall(msgpack.packb([BATCH, corr, events]))
    out.put({"acked": acked, "errors": errors, "rtts": rtts,
             "elapsed": time.monotonic() - (deadline - duration)})


def _frame(sock: socket.socket, unpacker: msgpack.Unpacker) -> Any:
    while True:
        for frame in unpacker:
            return frame
        unpacker.feed(sock.recv(1 << 16))


def run(n: int, url: str, redis_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    import redis

    redis.Redis.from_url(url).flushall()
    with nodes(n, url, args) as (ports, pids):
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        start_at = time.time() + 1.0
        per_gen = max(1, args.connections // args.generators)
        gens = [ctx.Process(target=generator, args=(ports, per_gen, args.batch, args.window,
                                                    args.duration, start_at, out))
                for _ in range(args.generators)]
        for g in gens:
            g.start()
        time.sleep(max(0.0, start_at - time.time()))
        before = [cpu_seconds(pid) for pid in (*pids, redis_pid)]
        results = [out.get(timeout=args.duration + 60) for _ in gens]
        used = [cpu_seconds(pid) - b for pid, b in zip((*pids, redis_pid), before, strict=True)]
        for g in gens:
            g.join(10)
        client = redis.Redis.from_url(url)
        pending = sum(int(g["pending"]) for p in range(16)
                      for g in client.xinfo_groups(f"evserver:stream:{{evserver.{p}}}"))
    rtts = sorted(r for res in results for r in res["rtts"])
    acked = sum(r["acked"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    return {"nodes": n, "acked_events": acked, "errors": sum(r["errors"] for r in results),
            "events_per_second": acked / elapsed,
            "p50_ms": statistics.median(rtts) * 1000 if rtts else None,
            "p99_ms": rtts[int(len(rtts) * 0.99)] * 1000 if rtts else None,
            "pending_after": pending,
            # CPU per acked event: the nodes together, and Redis.
            "node_us_per_event": sum(used[:-1]) / acked * 1e6 if acked else None,
            "redis_us_per_event": used[-1] / acked * 1e6 if acked else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", action="store_true", help="(accepted: `evserver bench "
                    "--cluster` runs this script)")
    ap.add_argument("--nodes", default="1,2", help="node counts to run, comma-separated")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    ap.add_argument("--batch", type=int, default=100, help="events per acked BATCH frame")
    ap.add_argument("--window", type=int, default=4, help="batches in flight per connection")
    ap.add_argument("--connections", type=int, default=8, help="client connections in all")
    ap.add_argument("--generators", type=int, default=2, help="generator processes")
    ap.add_argument("--pool-size", type=int, default=64, help="each node's pool")
    ap.add_argument("--ack", choices=["processed", "stored"], default="processed")
    ap.add_argument("--aof", action="store_true", help="Redis with appendonly (everysec)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    with redis_server(args.aof) as (url, redis_pid):
        report = [run(int(n), url, redis_pid, args) for n in args.nodes.split(",")]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"acked batches of {args.batch}, window {args.window}, {args.connections} conns, "
          f"ack={args.ack}, aof={'everysec' if args.aof else 'off'}, {args.duration:g}s")
    print(f"{'NODES':>5}  {'EVENTS/S':>10}  {'P50 MS':>7}  {'P99 MS':>7}  {'ERRORS':>6}  "
          f"{'PENDING':>7}  {'NODES US/EV':>11}  {'REDIS US/EV':>11}")
    for r in report:
        print(f"{r['nodes']:>5}  {r['events_per_second']:>10,.0f}  {r['p50_ms']:>7.2f}  "
              f"{r['p99_ms']:>7.2f}  {r['errors']:>6}  {r['pending_after']:>7}  "
              f"{r['node_us_per_event']:>11.2f}  {r['redis_us_per_event']:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
