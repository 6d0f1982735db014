"""Faults on a seeded schedule: worker kills, reloads, scaling, and hostile connections.

``schedule`` draws every fault's time from ``random.Random(seed)`` before the run starts, so
the same seed and duration give the same plan (the moments they land in the server's life
still vary with the machine). Process faults run one at a time on one thread and each waits
until the server has settled again (every worker ready), which is also what it measures:
how long a killed worker's replacement takes to serve. Connection faults run on their own
threads, overlapping anything.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .. import protocol as p
from .watch import Server

# Faults per minute at the default rates (``--rate-scale`` multiplies them). Process faults
# are rarer than connection faults so that some workers live for minutes: RSS growth after
# a worker's first minute needs workers that outlive it.
RATES = {"kill": 1.0, "hup": 0.2, "scale": 0.2,
         "slowloris": 2.0, "garbage": 4.0, "idle": 1.0, "nonreader": 1.0}
PROCESS_FAULTS = ("kill", "hup", "scale")
CRASH_WINDOW = 2.5  # the master treats a death within 2 s of ready as a crash loop
SETTLE_TIMEOUT = 30.0
IDLE_CONNECTIONS = 1000


def schedule(seed: int, duration: float, warmup: float, quiet: float,
             rate_scale: float = 1.0) -> list[tuple[float, str]]:
    """The run's faults as (seconds from the start, kind), in time order.

    Each connection fault happens once during the warm-up (so the first minute already
    sees every kind of hostile peer), then all faults arrive as Poisson processes between
    the warm-up and ``quiet`` seconds before the end, every kind at least once.
    """
    rng = random.Random(seed)
    plan = [(warmup * (i + 1) / 6, kind)
            for i, kind in enumerate(k for k in RATES if k not in PROCESS_FAULTS)]
    start, end = warmup, max(warmup, duration - quiet)
    for kind, rate in RATES.items():
        times: list[float] = []
        t = start
        while rate * rate_scale > 0:
            t += rng.expovariate(rate * rate_scale / 60.0)
            if t >= end:
                break
            times.append(t)
        if not times and end > start:
            times.append(rng.uniform(start, end))
        plan.extend((t, kind) for t in times)
    return sorted(plan)


@dataclass
class Kill:
    pid: int
    at: float
    replacement: int | None = None
    ready_after: float | None = None  # seconds from the kill to the replacement's "ready"
    serving_after: float | None = None  # ... to its first answer to a request


@dataclass
class Window:
    """A span during which the server was not settled (a reload, a kill, a scale)."""

    kind: str
    start: float
    end: float


@dataclass
class ChaosLog:
    done: Counter[str] = field(default_factory=Counter)
    kills: list[Kill] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    garbage_unanswered: int = 0
    idle_refused: int = 0
    nonreader_bytes: int = 0
    nonreader_held: int = 0  # non-reading clients the server stopped reading


class Chaos(threading.Thread):
    """Runs a ``schedule`` against ``server`` (started at ``t0``), then stops."""

    def __init__(self, server: Server, plan: list[tuple[float, str]], t0: float,
                 seed: int) -> None:
        super().__init__(daemon=True, name="soak-chaos")
        self.server = server
        self.plan = plan
        self.t0 = t0
        self.rng = random.Random(f"{seed}-victims")
        self.log = ChaosLog()
        self.halt = threading.Event()
        self.target = server.workers
        self._threads: list[threading.Thread] = []

    def run(self) -> None:
        for at, kind in self.plan:
            if self.halt.wait(max(0.0, self.t0 + at - time.monotonic())):
                break
            if kind in PROCESS_FAULTS:
                getattr(self, kind)()
            else:
                t = threading.Thread(target=self._guard, args=(kind,), daemon=True,
                                     name=f"soak-{kind}")
                t.start()
                self._threads.append(t)
            self.log.done[kind] += 1
        for t in self._threads:
            t.join(60)

    def _guard(self, kind: str) -> None:
        try:
            getattr(self, kind)()
        except OSError as exc:
            self.log.problems.append(f"{kind}: {exc}")

    def stop(self) -> None:
        self.halt.set()
        self.join(90)

    # ------------------------------------------------------------------ process faults

    def _settle(self, kind: str, start: float) -> None:
        if not self.server.wait(lambda: self.server.settled(self.target), SETTLE_TIMEOUT):
            self.log.problems.append(f"{kind}: not settled within {SETTLE_TIMEOUT:g}s")
        self.log.windows.append(Window(kind, start, time.monotonic()))

    def kill(self) -> None:
        """SIGKILL a random worker that has been ready longer than the crash window."""
        def victims() -> list[int]:
            self.server.poll_log()
            now = time.monotonic()
            return sorted(pid for pid in self.server.worker_pids()
                          if now - self.server.ready.get(pid, now) > CRASH_WINDOW)

        if not self.server.wait(victims, 10.0):
            self.log.problems.append("kill: no worker ready long enough")
            return
        before = self.server.worker_pids()
        victim = self.rng.choice(victims())
        os.kill(victim, signal.SIGKILL)
        kill = Kill(victim, time.monotonic())
        self.log.kills.append(kill)

        def replacement() -> int | None:
            self.server.poll_log()
            new = [pid for pid in self.server.worker_pids() - before if pid in self.server.ready]
            return new[0] if new else None

        if self.server.wait(replacement, 10.0, interval=0.005):
            pid = replacement()
            assert pid is not None
            kill.replacement = pid
            kill.ready_after = self.server.ready[pid] - kill.at
            kill.serving_after = self._first_answer_from(pid, kill.at)
        self._settle("kill", kill.at)

    def _first_answer_from(self, pid: int, since: float, timeout: float = 5.0) -> float | None:
        """Seconds from ``since`` until a new connection is answered by worker ``pid``."""
        from ..client import Client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with Client(*self.server.address, timeout=2, retries=0) as client:
                    if client.request("soak.pid") == pid:
                        return time.monotonic() - since
            except (OSError, TimeoutError):
                time.sleep(0.005)
        return None

    def hup(self) -> None:
        start = time.monotonic()
        old = self.server.worker_pids()
        self.server.signal(signal.SIGHUP)
        self.server.wait(lambda: not self.server.worker_pids() & old, SETTLE_TIMEOUT)
        self._settle("hup", start)

    def scale(self) -> None:
        """TTIN, hold a few seconds, TTOU: one worker more, then back."""
        start = time.monotonic()
        self.target += 1
        self.server.signal(signal.SIGTTIN)
        self._settle("ttin", start)
        self.halt.wait(3.0)
        start = time.monotonic()
        self.target -= 1
        self.server.signal(signal.SIGTTOU)
        self._settle("ttou", start)

    # ------------------------------------------------------------------ connection faults

    def slowloris(self, connections: int = 20, seconds: float = 10.0) -> None:
        """Connections that trickle one byte of a frame header every half second."""
        frame = p.encode_event(0, p.event_wire("soak.fire", {"i": "slow"}, "slow", 0.0, None))
        socks = [socket.create_connection(self.server.address, timeout=5)
                 for _ in range(connections)]
        try:
            for i in range(int(seconds * 2)):
                if self.halt.wait(0.5):
                    break
                for s in socks:
                    try:
                        s.send(frame[i % len(frame):i % len(frame) + 1])
                    except OSError:
                        pass
        finally:
            for s in socks:
                s.close()

    def garbage(self, connections: int = 10) -> None:
        """Connections that send random bytes: each must get an error frame or a close."""
        for _ in range(connections):
            with socket.create_connection(self.server.address, timeout=5) as s:
                s.sendall(b"\xff" + self.rng.randbytes(63))
                try:
                    while s.recv(65536):
                        pass
                except TimeoutError:
                    self.log.garbage_unanswered += 1
                except OSError:
                    pass  # a reset is an answer too

    def idle(self) -> None:
        """1,000 connections that send nothing, held for 5 s, then closed."""
        socks: list[socket.socket] = []
        try:
            for _ in range(IDLE_CONNECTIONS):
                try:
                    socks.append(socket.create_connection(self.server.address, timeout=5))
                except OSError:
                    self.log.idle_refused += 1
            self.halt.wait(5.0)
        finally:
            for s in socks:
                s.close()

    def nonreader(self, seconds: float = 10.0) -> None:
        """A client that sends requests with 16 KiB replies and never reads them.

        It writes 50 requests every 10 ms (fewer than ``max_pending_replies`` in flight per
        read), so the server's reply backpressure stops reading it (its socket fills:
        ``nonreader_held``) rather than the pending-replies limit closing it.
        """
        corr = 0
        pending = b""
        with socket.create_connection(self.server.address, timeout=5) as s:
            s.setblocking(False)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not self.halt.is_set():
                if not pending:
                    frames = []
                    for _ in range(50):
                        corr += 1
                        frames.append(p.encode_event(
                            corr, p.event_wire("soak.blob", None, f"blob-{corr}"), request=True))
                    pending = b"".join(frames)
                try:
                    sent = s.send(pending)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return  # the server closed us
                self.log.nonreader_bytes += sent
                pending = pending[sent:]
                if pending:  # the server stopped reading us: backpressure holds
                    self.log.nonreader_held += 1
                    self.halt.wait(max(0.0, deadline - time.monotonic()))
                    return
                time.sleep(0.01)


def summary(log: ChaosLog) -> dict[str, Any]:
    return {"done": dict(log.done), "problems": log.problems,
            "garbage_unanswered": log.garbage_unanswered, "idle_refused": log.idle_refused,
            "nonreader_bytes": log.nonreader_bytes, "nonreader_held": log.nonreader_held}
