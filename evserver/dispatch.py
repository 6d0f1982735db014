"""Running handlers: a fixed set of worker green threads fed through one bounded queue.

Readers hand over everything decoded from one ``recv`` as a single job, never a green thread
per event (spawning one costs ~30x the decode of its event, measured). A full
queue blocks the reader that tries to add to it, so a saturated pool turns into TCP
backpressure instead of memory growth.

Per-handler options (``timeout``, ``retries``, ``backoff``, ``blocking``) are resolved once
into a ``Plan``; a handler with none of them is called directly, so the default per-event
path has no ``Timeout`` object and no extra frames.

``ordered_by``: events whose processor has a key get a ticket per key when the job is
submitted (that is the arrival order). A worker runs an event only when its ticket is the
key's next; otherwise it *parks* the event and goes on, and whoever finishes the previous
ticket runs it. Workers never wait on each other, so ordering can never deadlock the pool;
a job whose events are parked completes when the last of them has run.

The dispatcher knows nothing of the wire format: it reports one ``Result`` per frame that
owes a response and the job's ``Sink`` encodes it.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

from . import protocol as p
from ._eventlet import GreenletExit, eventlet
from .app import App, Handler
from .deadletters import DeadLetter, DeadLetterStore
from .errors import HandlerTimeout, RoutingError
from .event import Event
from .logs import LogBudget
from .metrics import Histogram

log = logging.getLogger("evserver.dispatch")

YIELD_EVERY = 64  # events between cooperative yields, so one big job cannot starve the hub
# One event in about this many is timed for the latency histograms: timing every event
# would cost ~25% of the dispatch path; sampling costs one compare per event (~3%).
SAMPLE_EVERY = 128
MAX_TYPES = 4096  # event types kept apart in the stats and the route cache
OTHER_TYPES = "(other types)"
_BACKOFF_MAX = 30.0
# What a handler may raise that fails its event: eventlet.Timeout (a BaseException) from the
# handler's own timeouts, sys.exit(), KeyboardInterrupt. GreenletExit is not among them: it
# is how a stuck handler is ended at the drain timeout.
_HANDLER_ERRORS = (Exception, eventlet.Timeout, SystemExit, KeyboardInterrupt)


def _tally(counts: defaultdict[str, int], etype: str, n: int) -> None:
    """Add to a type's count; clients choose types, so at most MAX_TYPES are kept apart and
    the rest are counted together under OTHER_TYPES."""
    if etype not in counts and len(counts) >= MAX_TYPES:
        etype = OTHER_TYPES
    counts[etype] += n


class Sink(Protocol):
    """Where a job's outcome goes: the connection (of whichever protocol) that read it."""

    def job_done(self, job: Job, results: list[Result]) -> None:
        """Called once per job, after every frame ran, with one result per frame that owes
        the peer a response (``corr != 0``) or is a PING."""


class Job:
    """Frames decoded from one read of one connection.

    ``failures[i]`` is the first failure of frame ``i`` and ``values[i]`` a request's reply;
    ``outstanding`` counts the holds on the job (its worker, and each parked event).
    """

    __slots__ = ("failures", "frames", "outstanding", "sink", "tickets", "values")

    def __init__(self, sink: Sink, frames: list[p.Frame]) -> None:
        self.sink = sink
        self.frames = frames
        self.tickets: dict[tuple[int, int], tuple[Any, int]] | None = None
        self.failures: list[Failure | None] = [None] * len(frames)
        self.values: list[Any] = [None] * len(frames)
        self.outstanding = 1


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
    def from_exception(cls, exc: BaseException, note: str = "") -> Failure:
        code = getattr(exc, "code", None)  # ours are str; HTTPError.code is an int
        return cls(code if isinstance(code, str) else "handler_error", type(exc).__name__,
                   f"{note}{exc}")


class Plan:
    """A handler's options, resolved against the ``[handlers]`` defaults once."""

    __slots__ = ("backoff", "blocking", "direct", "func", "handler", "key", "retries", "timeout")

    def __init__(self, handler: Handler, defaults: dict[str, Any]) -> None:
        opts = {**defaults, **{k: v for k, v in handler.options.items() if v is not None}}
        self.handler = handler
        self.func = handler.func
        self.timeout = float(opts.get("timeout") or 0)
        self.retries = int(opts.get("retries") or 0)
        self.backoff = float(opts.get("backoff") or 0)
        self.blocking = bool(opts.get("blocking"))
        key = handler.options.get("ordered_by")
        if isinstance(key, str):
            field = key
            key = lambda event: event.data[field]  # noqa: E731
        self.key: Callable[[Event], Any] | None = key
        self.direct = not (self.timeout or self.retries or self.blocking)


class _KeyState:
    """Per ``ordered_by`` key: the next ticket to hand out, the next to run, parked events."""

    __slots__ = ("issued", "next", "parked")

    def __init__(self) -> None:
        self.issued = 0
        self.next = 0
        self.parked: dict[int, tuple[Job, int, Event] | None] = {}  # None: skip it


class Stats:
    """Counters the server and admin views read."""

    def __init__(self) -> None:
        self.events_in = 0
        self.events_processed = 0
        self.handler_errors = 0
        self.dead_letters = 0
        self.unrouted = 0
        self.by_type: defaultdict[str, int] = defaultdict(int)
        self.errors_by_type: defaultdict[str, int] = defaultdict(int)
        # Sampled handler durations per type (see SAMPLE_EVERY); bounded by the route cache.
        self.latency: dict[str, Histogram] = {}


class Dispatcher:
    """Owns the worker green threads, the queue in front of them and the ordering state."""

    def __init__(
        self,
        app: App,
        *,
        pool_size: int = 64,
        queue_size: int = 256,
        handler_defaults: dict[str, Any] | None = None,
        dead_letters: DeadLetterStore | None = None,
    ) -> None:
        self.app = app
        self.pool_size = pool_size
        self.queue: Any = eventlet.queue.LightQueue(queue_size)
        self.stats = Stats()
        self.busy = 0
        self.dead_letters = dead_letters
        self._defaults = handler_defaults or {}
        self._plans = {id(h): Plan(h, self._defaults) for h in app.handlers}
        self._entries: dict[str, tuple[Plan | None, tuple[Plan, ...]]] = {}
        self._ordered = any(plan.key is not None for plan in self._plans.values())
        self._keys: dict[Any, _KeyState] = {}
        self._workers: list[Any] = []
        self._unrouted_log = LogBudget(per_interval=1, interval=60.0)  # per event type
        self._error_log = LogBudget()
        self._slots: Any = eventlet.semaphore.Semaphore(pool_size)
        self._until_sample = SAMPLE_EVERY
        # The admin's ``tail`` sampler: sees each submitted job's frames while set. It must be
        # cheap and never block; None (the default) costs one attribute check per job.
        self.tap: Callable[[list[p.Frame]], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._workers = [eventlet.spawn(self._work) for _ in range(self.pool_size)]

    def submit(self, job: Job) -> None:
        """Queue a job; blocks the calling green thread while the queue is full."""
        self._admit(job)
        self.queue.put(job)

    def run_inline(self, job: Job) -> bool:
        """Run a job in the calling green thread (a connection's reader) if a pool slot is
        free and nobody is queued; False otherwise (then ``submit`` it).

        This skips the hand-off to a worker, which costs more than a small job itself; the
        pool bound still holds because an inline run takes one of the ``pool_size`` slots.
        """
        if self.queue.qsize() or not self._slots.acquire(blocking=False):
            return False
        self._admit(job)
        self._run(job)
        return True

    def _admit(self, job: Job) -> None:
        if self._ordered:
            self._issue_tickets(job)
        if self.tap is not None:
            self.tap(job.frames)

    def stop(self, timeout: float | None = None) -> bool:
        """Let the workers finish every queued job, then end them. True if all ended in time.

        Callers must stop every producer (readers) first: a job queued after the stop
        sentinels would never run.
        """
        # The sentinels queue behind the remaining jobs; a full queue must not hold up the
        # stop past its deadline, so they are put by a helper that is killed with the workers.
        putter = eventlet.spawn(lambda: [self.queue.put(None) for _ in self._workers])
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
        putter.kill()
        self._workers = []
        return ok

    # ------------------------------------------------------------------ work

    def _work(self) -> None:
        get = self.queue.get
        while (job := get()) is not None:
            self._slots.acquire()  # inline runs hold slots too: pool_size bounds both
            self._run(job)
            eventlet.sleep(0)  # a job ends with a yield: a busy pool must not starve readers

    def _run(self, job: Job) -> None:
        """Run a job holding one pool slot (released here), then answer it."""
        self.busy += 1
        try:
            self.run_job(job)
        except BaseException as exc:  # a bug here must neither kill the worker nor ack
            if isinstance(exc, GreenletExit):
                raise
            log.exception("internal error while running a job")
            self._abandon(job, Failure("internal_error", type(exc).__name__, str(exc)))
        finally:
            self.busy -= 1
            self._slots.release()
            self._release(job)

    def _abandon(self, job: Job, failure: Failure) -> None:
        """A job stopped half-way: fail every frame not yet answered, and skip its unused
        ordering tickets so the events queued behind them on their keys still run."""
        for i, frame in enumerate(job.frames):
            if frame.kind != p.PING and job.failures[i] is None:
                job.failures[i] = failure
        for key, number in (job.tickets or {}).values():
            state = self._keys.get(key)
            if state is not None and number >= state.next and number not in state.parked:
                state.parked[number] = None
                self._resume(key, state)

    def run_job(self, job: Job) -> None:
        """Process every frame of a job in order (parked ordered events excepted)."""
        processed = 0
        tickets = job.tickets
        for fi, frame in enumerate(job.frames):
            if frame.kind == p.PING:
                continue
            if tickets is None and frame.kind != p.REQUEST:
                failure = self._run_events(frame.body)
                if failure is not None:
                    job.failures[fi] = failure
                processed += len(frame.body)
                continue
            for ei, event in enumerate(frame.body):
                ticket = tickets.get((fi, ei)) if tickets else None
                if ticket is None or self._turn(job, fi, event, ticket):
                    self._process(job, fi, event)
                processed += 1
        self.stats.events_processed += processed

    def _run_events(self, events: list[Event]) -> Failure | None:
        """The hot loop for fire-and-forget and acked events; returns the first failure.

        A run of events of one type (a batch, usually) shares one route lookup and one
        counter update, and an event whose type has just a direct processor costs one call.
        """
        sample = self._sample_at(len(events))
        sampled = events[sample - 1] if sample else None
        first: Failure | None = None
        failure: Failure | None
        etype: str | None = None  # the type of the current run of events
        entry: tuple[Plan | None, tuple[Plan, ...]] = (None, ())
        direct: Plan | None = None  # the type's processor when it is all there is to call
        func: Callable[[Event], Any] | None = None  # its function
        run = 0
        for start in range(0, len(events), YIELD_EVERY):
            if start:
                eventlet.sleep(0)  # a big frame must not starve the hub
            for event in events[start : start + YIELD_EVERY]:
                if event.type != etype:
                    if etype is not None:
                        _tally(self.stats.by_type, etype, run)
                    etype, run = event.type, 0
                    entry = self._entries.get(etype) or self._entry(etype)
                    processor, listeners = entry
                    plain = processor is not None and processor.direct and not listeners
                    direct = processor if plain else None
                    func = direct.func if direct is not None else None
                run += 1
                if func is not None and event is not sampled:
                    try:
                        func(event)
                        continue
                    except _HANDLER_ERRORS as exc:
                        assert direct is not None
                        failure = self._failed(direct, event, exc, 1, traceback.format_exc())
                else:
                    failure = (self._timed if event is sampled else self._handle)(
                        entry, event, False)[1]
                if failure is not None and first is None:
                    first = failure
        if etype is not None:
            _tally(self.stats.by_type, etype, run)
        return first

    def _release(self, job: Job) -> None:
        job.outstanding -= 1
        if job.outstanding:
            return
        results = [
            Result(frame, job.failures[i], job.values[i])
            for i, frame in enumerate(job.frames) if frame.corr or frame.kind == p.PING
        ]
        job.sink.job_done(job, results)

    def _process(self, job: Job, fi: int, event: Event) -> None:
        etype = event.type
        request = job.frames[fi].kind == p.REQUEST
        _tally(self.stats.by_type, etype, 1)
        handle = self._timed if self._sample_at(1) else self._handle
        value, failure = handle(self._entries.get(etype) or self._entry(etype), event, request)
        job.values[fi] = value
        if failure is not None and job.failures[fi] is None:
            job.failures[fi] = failure

    def _handle(
        self, entry: tuple[Plan | None, tuple[Plan, ...]], event: Event, request: bool
    ) -> tuple[Any, Failure | None]:
        """Run an event's processor, then its listeners; return (reply value, failure)."""
        processor, listeners = entry
        value = failure = None
        if processor is not None:
            # A failed request is answered with the error, so its caller owns the retry:
            # only failures nobody hears of (events, listeners) are dead-lettered.
            value, failure = self._call(processor, event, dead_letter=not request)
        elif request or not listeners:
            failure = self._unrouted(event.type, request)
        for listener in listeners:
            listener_failure = self._call(listener, event)[1]
            # A listener never changes a request's reply, but an acked event is only
            # acknowledged once its listeners succeeded (or were dead-lettered).
            if failure is None and not request:
                failure = listener_failure
        return value, failure

    def _sample_at(self, count: int) -> int:
        """Which of the next ``count`` events to time (1-based), or 0 for none of them."""
        left = self._until_sample - count
        if left > 0:
            self._until_sample = left
            return 0
        at = self._until_sample
        # A random gap (mean SAMPLE_EVERY) so periodic traffic cannot alias with the sampling.
        self._until_sample = 1 + int(random.random() * (2 * SAMPLE_EVERY - 1))
        return at

    def _timed(
        self, entry: tuple[Plan | None, tuple[Plan, ...]], event: Event, request: bool
    ) -> tuple[Any, Failure | None]:
        """``_handle``, recording its wall time (green waits included) in the type's histogram."""
        start = time.perf_counter()
        try:
            return self._handle(entry, event, request)
        finally:
            hist = self.stats.latency.get(event.type)
            if hist is None:
                if len(self.stats.latency) >= MAX_TYPES:  # clients choose types: stay bounded
                    self.stats.latency.clear()
                hist = self.stats.latency[event.type] = Histogram()
            hist.observe(time.perf_counter() - start)

    def _entry(self, etype: str) -> tuple[Plan | None, tuple[Plan, ...]]:
        """Resolve a type to the plans of its handlers once; bounded like the app's cache."""
        route = self.app.route(etype)
        entry = (
            self._plan(route.processor) if route.processor is not None else None,
            tuple(self._plan(h) for h in route.listeners),
        )
        if len(self._entries) >= MAX_TYPES:
            self._entries.clear()
        self._entries[etype] = entry
        return entry

    # ------------------------------------------------------------------ calling handlers

    def _call(
        self, plan: Plan, event: Event, dead_letter: bool = True
    ) -> tuple[Any, Failure | None]:
        if plan.direct:
            try:
                return plan.func(event), None
            except _HANDLER_ERRORS as exc:
                return None, self._failed(plan, event, exc, 1, traceback.format_exc(),
                                          dead_letter)
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(plan, event), None
            except _HANDLER_ERRORS as exc:
                if attempt > plan.retries:
                    return None, self._failed(plan, event, exc, attempt,
                                              traceback.format_exc(), dead_letter)
                delay = min(_BACKOFF_MAX, plan.backoff * 2 ** (attempt - 1))
                eventlet.sleep(random.uniform(delay / 2, delay))  # jitter de-synchronises retries

    @staticmethod
    def _attempt(plan: Plan, event: Event) -> Any:
        if plan.blocking:
            call: Callable[[], Any] = lambda: eventlet.tpool.execute(plan.func, event)  # noqa: E731
        else:
            call = lambda: plan.func(event)  # noqa: E731
        if not plan.timeout:
            return call()
        exc = HandlerTimeout(f"{plan.handler.name} did not finish within {plan.timeout:g}s")
        with eventlet.Timeout(plan.timeout, exc):
            return call()

    def _plan(self, handler: Handler) -> Plan:
        plan = self._plans.get(id(handler))
        if plan is None:  # registered after the dispatcher was built (tests do this)
            plan = self._plans[id(handler)] = Plan(handler, self._defaults)
        return plan

    debug = False  # [security] debug: send tracebacks (paths and all) to clients

    def _failed(
        self, plan: Plan, event: Event, exc: BaseException, attempts: int, tb: str,
        dead_letter: bool = True,
    ) -> Failure:
        failure = self._record_failure(plan, event, exc, attempts, tb, dead_letter)
        if self.debug:
            failure.message = f"{failure.message}\n{tb}"
        return failure

    def _record_failure(
        self, plan: Plan, event: Event, exc: BaseException, attempts: int, tb: str,
        dead_letter: bool,
    ) -> Failure:
        handler = plan.handler
        self.stats.handler_errors += 1
        _tally(self.stats.errors_by_type, event.type, 1)
        if self._error_log.allow(handler.name):
            log.error(
                "%s %s failed on %s (id %s) after %d attempt(s): %s: %s%s", handler.kind,
                handler.name, event.type, event.id, attempts, type(exc).__name__, exc,
                self._error_log.suppressed_note(handler.name),
            )
        if self.dead_letters is None or not dead_letter:
            return Failure.from_exception(exc)
        try:
            self.dead_letters.append(DeadLetter(
                event.type, event.data, event.id, event.time, event.meta, handler.name,
                handler.kind, type(exc).__name__, str(exc), tb, attempts, time.time(),
            ))
        except Exception:
            log.exception("could not store dead letter for %s", event.id)
            return Failure.from_exception(exc)
        self.stats.dead_letters += 1
        return Failure.from_exception(exc, note=f"dead-lettered after {attempts} attempt(s): ")

    # ------------------------------------------------------------------ ordering

    def _issue_tickets(self, job: Job) -> None:
        tickets: dict[tuple[int, int], tuple[Any, int]] = {}
        for fi, frame in enumerate(job.frames):
            if frame.kind == p.PING:
                continue
            for ei, event in enumerate(frame.body):
                plan = (self._entries.get(event.type) or self._entry(event.type))[0]
                if plan is None or plan.key is None:
                    continue
                try:
                    key = (plan.handler.pattern, plan.key(event))
                    hash(key)
                except Exception as exc:
                    log.warning("ordered_by key of %s failed (%s: %s); processing unordered",
                                event.id, type(exc).__name__, exc)
                    continue
                state = self._keys.get(key)
                if state is None:
                    state = self._keys[key] = _KeyState()
                tickets[fi, ei] = (key, state.issued)
                state.issued += 1
        job.tickets = tickets or None

    def _turn(self, job: Job, fi: int, event: Event, ticket: tuple[Any, int]) -> bool:
        """True if the event may run now; otherwise park it with its job held open."""
        key, number = ticket
        state = self._keys[key]
        if state.next != number:
            state.parked[number] = (job, fi, event)
            job.outstanding += 1
            return False
        try:
            self._process(job, fi, event)
        finally:
            self._advance(key, state)
        return False

    def _advance(self, key: Any, state: _KeyState) -> None:
        """Mark the running ticket done and run the parked ones that are now due."""
        state.next += 1
        self._resume(key, state)

    def _resume(self, key: Any, state: _KeyState) -> None:
        """Run (or skip, for abandoned tickets) every parked event whose turn has come."""
        while state.next in state.parked:
            entry = state.parked.pop(state.next)
            if entry is None:  # a ticket of an abandoned job
                state.next += 1
                continue
            job, fi, event = entry
            try:
                self._process(job, fi, event)
            finally:
                state.next += 1
                self._release(job)
        if state.next == state.issued and self._keys.get(key) is state:
            del self._keys[key]  # nothing outstanding: keep memory bounded by live keys

    # ------------------------------------------------------------------ unrouted

    def _unrouted(self, etype: str, request: bool) -> Failure:
        self.stats.unrouted += 1
        what = "processor" if request else "processor or listener"
        if not request:
            self._unrouted_log.warning(log, etype, "no %s for event type %r (logged once a "
                                       "minute per type)", what, etype)
        return Failure(RoutingError.code, "RoutingError", f"no {what} for event type {etype!r}")
