"""Running handlers: a fixed set of worker green threads fed through one bounded queue.

Readers hand over everything decoded from one ``recv`` as a single job, never a green thread
per event (spawning costs ~30x the decode; see shared/reference/eventlet-notes.md §4). A full
queue blocks the reader that tries to add to it, so a saturated pool turns into TCP
backpressure instead of memory growth.

The dispatcher knows nothing of the wire format beyond the frame kinds: it produces response
bytes through ``protocol.encode_*`` and hands them to the job's ``Sink``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

from . import protocol as p
from ._eventlet import eventlet
from .app import App, Handler
from .errors import RoutingError
from .event import Event

log = logging.getLogger("evserver.dispatch")

YIELD_EVERY = 64  # events between cooperative yields, so one big job cannot starve the hub
_NO_HANDLER_LOG_INTERVAL = 60.0


class Sink(Protocol):
    """Where a job's outcome goes: the connection (of whichever protocol) that read it."""

    def job_done(self, job: Job, results: list[Result]) -> None:
        """Called once per job, after every frame ran, with one result per frame that owes
        the peer a response (``corr != 0``) or is a PING."""


class Job:
    """Frames decoded from one read of one connection, processed in order by one worker."""

    __slots__ = ("frames", "sink")

    def __init__(self, sink: Sink, frames: list[p.Frame]) -> None:
        self.sink = sink
        self.frames = frames


class Result:
    """The outcome of one frame: ``failure`` is None on success; ``value`` is a reply value."""

    __slots__ = ("failure", "frame", "value")

    def __init__(self, frame: p.Frame, failure: Failure | None, value: Any = None) -> None:
        self.frame = frame
        self.failure = failure
        self.value = value


class Failure:
    """Why an event was not processed: the exception's class name, message and error code."""

    __slots__ = ("code", "message", "type")

    def __init__(self, code: str, type: str, message: str) -> None:
        self.code = code
        self.type = type
        self.message = message

    @classmethod
    def from_exception(cls, exc: BaseException) -> Failure:
        return cls(getattr(exc, "code", "handler_error"), type(exc).__name__, str(exc))


class Stats:
    """Counters the server and admin views read; updated per job, not per event, where possible."""

    def __init__(self) -> None:
        self.events_in = 0
        self.events_processed = 0
        self.handler_errors = 0
        self.unrouted = 0
        self.by_type: defaultdict[str, int] = defaultdict(int)


class Dispatcher:
    """Owns the worker green threads and the queue in front of them."""

    def __init__(self, app: App, *, pool_size: int = 64, queue_size: int = 256) -> None:
        self.app = app
        self.pool_size = pool_size
        self.queue: Any = eventlet.queue.LightQueue(queue_size)
        self.stats = Stats()
        self.busy = 0
        self._workers: list[Any] = []
        self._unrouted_logged: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._workers = [eventlet.spawn(self._work) for _ in range(self.pool_size)]

    def submit(self, job: Job) -> None:
        """Queue a job; blocks the calling green thread while the queue is full."""
        self.queue.put(job)

    def stop(self, timeout: float | None = None) -> bool:
        """Let the workers finish every queued job, then end them. True if all ended in time.

        Callers must stop every producer (readers) first: a job queued after the stop
        sentinels would never run.
        """
        for _ in self._workers:
            self.queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True
        for gt in self._workers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                with eventlet.Timeout(left):
                    gt.wait()
            except eventlet.Timeout:
                ok = False
                gt.kill()
        self._workers = []
        return ok

    # ------------------------------------------------------------------ work

    def _work(self) -> None:
        get = self.queue.get
        while (job := get()) is not None:
            self.busy += 1
            results: list[Result] = []
            try:
                results = self.run_job(job)
            except Exception:  # a bug here must not kill the worker
                log.exception("internal error while running a job")
            finally:
                self.busy -= 1
                job.sink.job_done(job, results)

    def run_job(self, job: Job) -> list[Result]:
        """Process every frame of a job in order; return the results that owe a response."""
        results: list[Result] = []
        processed = 0
        for frame in job.frames:
            kind = frame.kind
            if kind == p.PING:
                results.append(Result(frame, None))
                continue
            if kind == p.REQUEST:
                results.append(self._request(frame))
                processed += 1
                continue
            failure = None
            for event in frame.body:
                f = self.process(event)
                if f is not None and failure is None:
                    failure = f
                processed += 1
                if processed % YIELD_EVERY == 0:
                    eventlet.sleep(0)
            if frame.corr:
                results.append(Result(frame, failure))
        self.stats.events_processed += processed
        return results

    def _request(self, frame: p.Frame) -> Result:
        event = frame.body[0]
        route = self.app.route(event.type)
        self.stats.by_type[event.type] += 1
        if route.processor is None:
            self._run_listeners(route.listeners, event)
            self.stats.unrouted += 1
            return Result(frame, Failure(
                RoutingError.code, "RoutingError", f"no processor for event type {event.type!r}"
            ))
        value, failure = self._call(route.processor, event)
        self._run_listeners(route.listeners, event)
        return Result(frame, failure, value)

    def process(self, event: Event) -> Failure | None:
        """Run the processor and listeners for one event; return the first failure, if any."""
        route = self.app.route(event.type)
        self.stats.by_type[event.type] += 1
        if route.empty:
            self._unrouted(event.type)
            return Failure(
                RoutingError.code, "RoutingError", f"no handler for event type {event.type!r}"
            )
        failure = None
        if route.processor is not None:
            failure = self._call(route.processor, event)[1]
        listener_failure = self._run_listeners(route.listeners, event)
        return failure or listener_failure

    def _run_listeners(self, listeners: tuple[Handler, ...], event: Event) -> Failure | None:
        first = None
        for listener in listeners:
            failure = self._call(listener, event)[1]
            if failure is not None and first is None:
                first = failure
        return first

    def _call(self, handler: Handler, event: Event) -> tuple[Any, Failure | None]:
        try:
            return handler.func(event), None
        except Exception as exc:
            self.stats.handler_errors += 1
            log.error(
                "%s %s failed on %s (id %s): %s: %s", handler.kind, handler.name,
                event.type, event.id, type(exc).__name__, exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return None, Failure.from_exception(exc)

    def _unrouted(self, etype: str, now: Callable[[], float] = time.monotonic) -> None:
        self.stats.unrouted += 1
        t = now()
        last = self._unrouted_logged.get(etype)
        if last is None or t - last >= _NO_HANDLER_LOG_INTERVAL:
            if len(self._unrouted_logged) > 1024:
                self._unrouted_logged.clear()
            self._unrouted_logged[etype] = t
            log.warning("no processor or listener for event type %r (logged once a minute)", etype)
