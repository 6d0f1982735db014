"""The master's admin backend: what the threaded admin listener asks of the supervisor.

The admin HTTP server runs in threads (``admin.ThreadedAdmin``). Each request becomes a
call on the master's main loop (``Fleet.call_soon``), and only the loop touches the workers,
their channels and the supervisor's state: ``AdminDesk`` is that loop side (open tails,
stats requests waiting for the workers' replies), ``MasterAdmin`` the threads' side (it
waits for the loop's answer). The supervisor is seen here as a ``Fleet``, not imported.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from .admin import TAIL_FLUSH
from .errors import AdminError
from .logs import plural
from .metrics import aggregate

log = logging.getLogger("evserver.supervisor")

STATS_TIMEOUT = 2.0  # how long an admin stats request waits for the workers' replies
ADMIN_CALL_TIMEOUT = 5.0  # how long an admin request waits for the main loop
TAIL_LEASE = 5.0  # a worker stops sampling for a tail not renewed for this long


class Worker(Protocol):
    """What the admin reads of a worker process (``supervisor.WorkerProcess``)."""

    generation: int
    ready_at: float | None
    retire_deadline: float | None
    handlers: list[dict[str, Any]] | None
    stats_replies: dict[int, dict[str, Any]]
    channel: Any

    @property
    def pid(self) -> int: ...


class Fleet(Protocol):
    """What the admin needs of the supervisor."""

    workers: dict[int, Any]  # pid -> a Worker
    generation: int
    num_workers: int
    booted: bool
    stopping: str | None
    reload: Any
    started_at: float
    retired: dict[str, Any]

    def call_soon(self, fn: Callable[[], Any]) -> Future[Any]: ...
    def ask_stats(self) -> tuple[int, list[Any]]: ...
    def forget_stats(self, rid: int) -> None: ...
    def handle_hup(self) -> str | None: ...
    def stop(self, *, graceful: bool) -> None: ...


@dataclass(eq=False)
class _StatsWait:
    """An admin stats request in flight: resolved once every asked worker replied."""

    rid: int
    asked: list[Worker]
    deadline: float
    future: Future[dict[str, Any]]


@dataclass(eq=False)
class _Tail:
    """An open admin tail: workers sample into their rings and send batches here."""

    pattern: str
    rate: int
    batches: queue.Queue[list[dict[str, Any]]]
    polled: float  # last time its HTTP thread asked for events (set from that thread)
    renewed: float = 0.0


class AdminDesk:
    """The loop side of admin requests: open tails and stats requests in flight."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.tails: dict[int, _Tail] = {}
        self._tail_id = 0
        self._waits: list[_StatsWait] = []

    def tick(self, now: float) -> None:
        """Every turn of the loop: answer finished stats requests, renew tail leases."""
        self._progress_stats(now)
        self._renew_tails(now)

    def worker_ready(self, worker: Worker) -> None:
        """A new worker joins the open tails."""
        for tid, tail in self.tails.items():
            self._send_tail(worker, tid, tail)

    def tailed(self, msg: dict[str, Any]) -> None:
        """A worker's batch of sampled events for a tail."""
        tail = self.tails.get(int(msg["id"]))
        if tail is not None:
            try:
                tail.batches.put_nowait(msg.get("events") or [])
            except queue.Full:
                pass  # the HTTP reader is behind: drop, never block the loop

    def begin_stats(self, future: Future[dict[str, Any]], timeout: float) -> None:
        """Ask the workers for stats; ``future`` gets the /stats document (``_progress_stats``)."""
        rid, asked = self.fleet.ask_stats()
        self._waits.append(_StatsWait(rid, asked, time.monotonic() + timeout, future))
        self._progress_stats(time.monotonic())

    def _progress_stats(self, now: float) -> None:
        for wait in list(self._waits):
            live = [w for w in wait.asked if w.pid in self.fleet.workers]  # exited: in the base now
            if now < wait.deadline and any(wait.rid not in w.stats_replies for w in live):
                continue
            self._waits.remove(wait)
            self.fleet.forget_stats(wait.rid)
            snaps = [w.stats_replies.pop(wait.rid) for w in live if wait.rid in w.stats_replies]
            for w in wait.asked:
                w.stats_replies.pop(wait.rid, None)
            uptime = time.time() - self.fleet.started_at
            wait.future.set_result(aggregate(snaps, mode="master", uptime=uptime,
                                             base=self.fleet.retired))

    def readiness(self) -> tuple[bool, str]:
        current = [w for w in self.fleet.workers.values()
                   if w.generation == self.fleet.generation and w.retire_deadline is None]
        listening = sum(1 for w in current if w.ready_at is not None)
        detail = f"{listening}/{self.fleet.num_workers} workers listening"
        if self.fleet.stopping:
            return False, f"stopping; {detail}"
        return self.fleet.booted and listening >= self.fleet.num_workers, detail

    def handler_list(self) -> list[dict[str, Any]]:
        for worker in sorted(self.fleet.workers.values(), key=lambda w: -w.generation):
            if worker.handlers is not None and worker.retire_deadline is None:
                return worker.handlers
        raise AdminError(503, "no worker is ready yet")

    def reload(self) -> dict[str, Any]:
        why = self.fleet.handle_hup()
        if why is not None:
            raise AdminError(409, why)
        assert self.fleet.reload is not None
        return {"reloading": True, "generation": self.fleet.reload.generation}

    def stop(self, now: bool) -> dict[str, Any]:
        log.info("admin: %s stop requested", "immediate" if now else "graceful")
        self.fleet.stop(graceful=not now)
        return {"stopping": self.fleet.stopping, "pid": os.getpid()}

    def scale(self, n: int) -> dict[str, Any]:
        if self.fleet.stopping:
            raise AdminError(409, "stopping")
        previous, self.fleet.num_workers = self.fleet.num_workers, n
        log.info("admin: now %s (was %d)", plural(n, "worker"), previous)
        return {"workers": n, "previous": previous}

    def open_tail(self, pattern: str, rate: int) -> tuple[int, _Tail]:
        self._tail_id += 1
        tail = _Tail(pattern, rate, queue.Queue(maxsize=64), time.monotonic())
        self.tails[self._tail_id] = tail
        self._renew_tails(time.monotonic())
        return self._tail_id, tail

    def close_tail(self, tid: int) -> None:
        if self.tails.pop(tid, None) is None:
            return
        for worker in self.fleet.workers.values():
            try:
                worker.channel.send("untail", id=tid)
            except OSError:
                pass

    def _renew_tails(self, now: float) -> None:
        """Keep the workers' leases of open tails; close tails whose reader stopped polling."""
        for tid, tail in list(self.tails.items()):
            if now - tail.polled > TAIL_LEASE:
                self.close_tail(tid)
            elif now - tail.renewed >= TAIL_LEASE / 3:
                tail.renewed = now
                for worker in self.fleet.workers.values():
                    if worker.ready_at is not None and worker.retire_deadline is None:
                        self._send_tail(worker, tid, tail)

    @staticmethod
    def _send_tail(worker: Worker, tid: int, tail: _Tail) -> None:
        try:
            worker.channel.send("tail", id=tid, pattern=tail.pattern, rate=tail.rate,
                                lease=TAIL_LEASE)
        except OSError:
            pass


class MasterAdmin:
    """The admin backend of the master: each call waits for the main loop to run it."""

    mode = "master"

    def __init__(self, fleet: Fleet, desk: AdminDesk) -> None:
        self.fleet = fleet
        self.desk = desk

    def _call(self, fn: Callable[[], Any]) -> Any:
        return self.fleet.call_soon(fn).result(ADMIN_CALL_TIMEOUT)

    def stats(self) -> dict[str, Any]:
        future: Future[dict[str, Any]] = Future()
        self.fleet.call_soon(lambda: self.desk.begin_stats(future, STATS_TIMEOUT))
        return future.result(ADMIN_CALL_TIMEOUT + STATS_TIMEOUT)

    def ready(self) -> tuple[bool, str]:
        return self._call(self.desk.readiness)

    def handlers(self) -> list[dict[str, Any]]:
        return self._call(self.desk.handler_list)

    def reload(self) -> dict[str, Any]:
        return self._call(self.desk.reload)

    def stop(self, now: bool) -> dict[str, Any]:
        return self._call(lambda: self.desk.stop(now))

    def scale(self, n: int) -> dict[str, Any]:
        return self._call(lambda: self.desk.scale(n))

    def tail(self, pattern: str, rate: int) -> _MasterTail:
        tid, tail = self._call(lambda: self.desk.open_tail(pattern, rate))
        return _MasterTail(self, tid, tail)


class _MasterTail:
    """The HTTP thread's end of a tail: batches the workers sent, via the main loop."""

    def __init__(self, admin: MasterAdmin, tid: int, tail: _Tail) -> None:
        self.admin = admin
        self.tid = tid
        self.tail = tail

    def next_batch(self) -> list[dict[str, Any]]:
        self.tail.polled = time.monotonic()
        try:
            events = self.tail.batches.get(timeout=TAIL_FLUSH)
        except queue.Empty:
            return []
        while True:
            try:
                events += self.tail.batches.get_nowait()
            except queue.Empty:
                return events

    def close(self) -> None:
        self.admin.fleet.call_soon(lambda: self.admin.desk.close_tail(self.tid))
