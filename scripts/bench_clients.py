"""The Python clients' throughput: ``AsyncClient`` (asyncio and uvloop) against ``Client``.

One run starts one ``evserver serve scripts/bench_app.py:app`` (a no-op processor) and drives
the same workloads through each client in turn, in this process, so the figures compare the
clients' own costs under the same server and machine state. The server is pinned to CPU 0 and
this process to CPU 1 (``--no-pin`` to skip). Events/s are the client's view: from the first
call to the last answer (fire-and-forget ends with ``flush()``, a PING round trip).

    python scripts/bench_clients.py                     # every workload, median of 3
    python scripts/bench_clients.py --events 50000 --repeat 1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evserver import Client, session  # noqa: E402
from evserver.aio import AsyncClient  # noqa: E402

DATA = {"seq": 12345, "payload": "x" * 16}  # the ~40-byte event of scripts/bench.py
CONCURRENCY = 100  # tasks sharing one AsyncClient in the concurrent workloads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(pin: bool) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "evserver", "serve", "scripts/bench_app.py:app",
         "--port", str(port), "--no-admin-enabled", "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL)
    try:
        if pin:
            os.sched_setaffinity(proc.pid, {0})
            os.sched_setaffinity(0, {1})
        Client("127.0.0.1", port, retries=50, backoff=0.05, backoff_max=0.2).ping()
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


# --- workloads: (name, events, blocking version, async version) -----------------------------


def blocking(port: int, workload: str, n: int) -> float:
    with Client("127.0.0.1", port) as c:
        c.ping()  # connected before the clock starts
        start = time.perf_counter()
        if workload == "send":
            for _ in range(n):
                c.send("bench", DATA)
            c.flush()
        elif workload == "send_ack":
            for _ in range(n):
                c.send("bench", DATA, ack=True)
        elif workload == "request":
            for _ in range(n):
                c.request("bench", DATA)
        elif workload == "send_many_ack":
            c.send_many((("bench", DATA) for _ in range(n)), ack=True)
        else:
            return float("nan")  # no concurrent form: a Client is one caller at a time
        return n / (time.perf_counter() - start)


async def asynchronous(port: int, workload: str, n: int) -> float:
    async with AsyncClient("127.0.0.1", port) as c:
        await c.ping()
        start = time.perf_counter()
        if workload == "send":
            for _ in range(n):
                await c.send("bench", DATA)
            await c.flush()
        elif workload == "send_ack":
            for _ in range(n):
                await c.send("bench", DATA, ack=True)
        elif workload == "request":
            for _ in range(n):
                await c.request("bench", DATA)
        elif workload == "send_many_ack":
            await c.send_many((("bench", DATA) for _ in range(n)), ack=True)
        else:
            call: Callable[[], Coroutine[Any, Any, Any]] = (
                (lambda: c.request("bench", DATA)) if workload == "request_x100"
                else (lambda: c.send("bench", DATA, ack=True)))

            async def task(k: int) -> None:
                for _ in range(k):
                    await call()

            await asyncio.gather(*(task(n // CONCURRENCY) for _ in range(CONCURRENCY)))
            n = n // CONCURRENCY * CONCURRENCY
        return n / (time.perf_counter() - start)


WORKLOADS = {  # workload -> share of --events it sends (round trips are slower)
    "send": 1.0, "send_ack": 0.1, "request": 0.1, "send_many_ack": 2.0,
    "request_x100": 0.5, "send_ack_x100": 0.5,
}


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def measure(port: int, client: str, workload: str, n: int) -> float:
    if client == "Client":
        return blocking(port, workload, n)
    with asyncio.Runner(loop_factory=loop_factory(client.split("/")[1])) as runner:
        return runner.run(asynchronous(port, workload, n))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="events of the send workload")
    ap.add_argument("--repeat", type=int, default=3, help="report the median of N runs")
    ap.add_argument("--workload", action="append", choices=WORKLOADS,
                    help="run only these (repeatable)")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    clients = ["Client", "AsyncClient/asyncio"]
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        clients.append("AsyncClient/uvloop")
    results: dict[str, dict[str, float]] = {}
    with server(not args.no_pin) as port:
        for workload in args.workload or WORKLOADS:
            n = max(CONCURRENCY, int(args.events * WORKLOADS[workload]))
            runs: dict[str, list[float]] = {client: [] for client in clients}
            for _ in range(args.repeat):  # interleaved, so a slow spell hits every client
                for client in clients:
                    runs[client].append(measure(port, client, workload, n))
            results[workload] = {client: statistics.median(r) for client, r in runs.items()}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    hook = "on" if session.meta_hook is not None else "off (OpenTelemetry not installed)"
    print(f"clients' trace-context hook: {hook}")
    print(f"{'workload':<16}" + "".join(f"{c:>22}" for c in clients) + "   async/Client")
    for workload, row in results.items():
        cells = "".join(f"{row[c]:>18,.0f} ev/s" if row[c] == row[c] else f"{'-':>22}"
                        for c in clients)
        base = row["Client"]
        ratios = " ".join(f"{row[c] / base:.2f}x" for c in clients[1:]) if base == base else ""
        print(f"{workload:<16}{cells}   {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
