"""Running handlers: a fixed pool of worker green threads, one bounded queue, shared cursors.

A connection hands the dispatcher a ``Job``: the events decoded from one read (a BATCH,
pipelined frames, a Forward chunk), which of them are requests, and the ``Sink`` to call once
all of them ran. Outcomes are kept per event index; the dispatcher never sees a wire frame.

**One job, many green threads.** A job's events are handed out by one iterator, its
*cursor*, shared by every green thread working on the job (green threads switch only where
one blocks, so two never take the same event). The first runner takes them one after the
other, which costs a handler that never waits nothing at all. When a handler does wait (I/O,
``sleep``, a lock, ``blocking=True`` in the native thread pool), the hub calls the blocking
green thread's ``switch_out`` hook: there the runner *offers* the job to idle workers, which
join it and take from the same cursor. So waiting handlers spread over as many pool threads
as are free and useful, and a no-op job never pays for a hand-off (~30x the cost of the
event). The listeners of one event are shared the same way.

``pool_size`` bounds everything running: inline runs (a reader running its own job while
the pool is idle), jobs from the queue and the helpers that join them each hold one slot. A
full queue blocks the reader that adds to it, so a saturated pool turns into TCP
backpressure instead of memory growth.

``ordered_by`` (``evserver.ordering``): an event whose key has an earlier event still
running is parked and run later by whoever finishes that one, so runners never wait on each
other and different keys run in parallel. A job completes when the last of its events ran.

A handler's exception fails its own event, whatever its class (``eventlet.Timeout`` from its
own timeout, ``SystemExit``, ``asyncio.CancelledError``...): one escaping into the dispatcher
would answer the wrong job and stall ordered keys. All but ``GreenletExit``, which is how a
stuck handler is ended at the drain timeout, and is re-raised everywhere.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from . import tracing
from ._eventlet import GreenletExit, eventlet, getcurrent, on_yield
from .app import App, Handler
from .deadletters import DeadLetterStore
from .errors import HandlerTimeout
from .event import Event
from .ordering import Sequencer
from .outcomes import MAX_TYPES, Outcomes, Stats, tally
from .plan import Entry, Failure, Plan
from .work import Job, Listeners, Shared

log = logging.getLogger("evserver.dispatch")

YIELD_EVERY = 64  # events between cooperative yields in a job of more than twice as many
# One event in about this many is timed for the latency histograms: timing every event
# would cost ~25% of the dispatch path; sampling costs one compare per event (~3%).
SAMPLE_EVERY = 128
_BACKOFF_MAX = 30.0


def _bare(entry: Entry) -> tuple[Plan | None, Plan | None]:
    """The plans the hot loop calls bare for a type, in order, when all its handlers are
    direct and at most two (a processor and one listener, or a lone listener); else Nones."""
    processor, listeners = entry
    plans = ((processor,) if processor is not None else ()) + listeners
    if not plans or len(listeners) > 1 or not all(plan.direct for plan in plans):
        return None, None
    return plans[0], plans[1] if len(plans) > 1 else None


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
        # OpenTelemetry spans around handlers, when configured (see evserver/tracing.py).
        self.tracing = tracing.dispatch_tracing(cancelled=GreenletExit)
        self._plans = {id(h): self._new_plan(h) for h in app.handlers}
        self._entries: dict[str, Entry] = {}
        self._ordered = any(plan.key is not None for plan in self._plans.values())
        self._sequencer = Sequencer(self._run_parked)
        self._workers: list[Any] = []
        self.outcomes = Outcomes(self.stats, dead_letters)
        self.outcomes.tracing = self.tracing
        self._failed = self.outcomes.failed
        self._slots: Any = eventlet.semaphore.Semaphore(pool_size)
        self._offered = 0  # offers to join running work, queued and not yet taken
        # The readers running a job inline (by green thread), and what to call when theirs
        # waits: see ``run_inline``.
        self._handoffs: dict[Any, Callable[[], None]] = {}
        self._until_sample = SAMPLE_EVERY
        # The admin's ``tail`` sampler: sees each submitted job's events while set. It must be
        # cheap and never block; None (the default) costs one attribute check per job.
        self.tap: Callable[[list[Event]], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        blocking = any(plan.blocking for plan in self._plans.values())
        if blocking and "EVENTLET_THREADPOOL_SIZE" not in os.environ:
            # blocking=True handlers of one job run in parallel too, each in a native thread
            # of eventlet's pool (20 by default): give it as many threads as the pool.
            eventlet.tpool.set_num_threads(self.pool_size)
        self._workers = [eventlet.spawn(self._work) for _ in range(self.pool_size)]

    def submit(self, job: Job) -> None:
        """Queue a job; blocks the calling green thread while the queue is full."""
        self._admit(job)
        self.queue.put(job)

    def run_inline(self, job: Job, handoff: Callable[[], None] | None = None) -> bool:
        """Run a job in the calling green thread (a connection's reader) if a pool slot is
        free and nobody is queued; False otherwise (then ``submit`` it).

        This skips the hand-off to a worker, which costs more than a small job itself; the
        pool bound still holds because an inline run takes one of the ``pool_size`` slots.
        If a handler waits, idle workers join the job (see the module docstring), and
        ``handoff`` is called (once, in the hub's switch: it must not block) so the reader
        can let another green thread go on reading while this one waits.
        """
        if self.queue.qsize() or not self._slots.acquire(blocking=False):
            return False
        self._admit(job)
        if handoff is None:
            self._run(job)
            return True
        me = getcurrent()
        self._handoffs[me] = handoff
        try:
            self._run(job)
        finally:
            self._handoffs.pop(me, None)
        return True

    def _admit(self, job: Job) -> None:
        job.dispatcher = self
        if self._ordered:
            job.tickets = self._sequencer.issue(
                job.events, lambda etype: (self._entries.get(etype) or self._entry(etype))[0])
        if self.tap is not None:
            self.tap(job.events)
        if sample := self._sample_at(len(job.events)):
            job.sampled = job.events[sample - 1]
        if job.requests or job.tickets is not None:
            job.number()

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
            except Exception:  # a worker that died of a bug: the others still get stopped
                log.exception("a worker green thread had died")
        putter.kill()
        self._workers = []
        if ok and any(plan.blocking for plan in self._plans.values()):
            # The native pool delivers results through a green thread of the hub that first
            # used it: end it with this hub, or a later server's hub (tests run servers one
            # after the other in threads) would wait for results forever. Not after a drain
            # timeout: joining a native thread stuck in a handler would hang the exit.
            eventlet.tpool.killall()
        return ok

    # ------------------------------------------------------------------ sharing work

    def _work(self) -> None:
        get = self.queue.get
        while (item := get()) is not None:
            if item.started:  # an offer to join running work
                self._offered -= 1
                if not item.left():
                    del item
                    continue  # finished by the others meanwhile: no slot needed
            self._slots.acquire()  # inline runs hold slots too: pool_size bounds both
            if item.started and not item.left():
                self._slots.release()
            elif type(item) is Job:
                self._run(item)
            else:
                self._help(item)
            del item  # an idle worker must not keep its last job (events, replies) alive
            eventlet.sleep(0)  # a job ends with a yield: a busy pool must not starve readers

    def offer(self, work: Shared) -> None:
        """The hub's ``switch_out`` hook while a green thread works on ``work``: it is about
        to block in a handler, so invite idle workers to take the rest.

        It runs inside the hub's switch and must not block, so it only fills free queue
        room: eventlet's ``put_nowait`` on a full queue waits (for a getter) all the same.
        A reader running its own job inline then hands its reading on (``run_inline``).
        """
        queue = self.queue
        want = min(work.left(), self._slots.counter - self._offered,
                   queue.maxsize - queue.qsize())
        for _ in range(want):
            queue.put_nowait(work)
        if want > 0:
            self._offered += want
        if self._handoffs and (handoff := self._handoffs.pop(getcurrent(), None)) is not None:
            handoff()

    def _run(self, job: Job) -> None:
        """Take a job's events from its cursor until none is left, holding one pool slot
        (released here), then release the job: the last to do so answers it."""
        self.busy += 1
        job.started = True
        job.holds += 1
        previous = on_yield(job)
        try:
            self._drain(job)
        except GreenletExit:  # ended at the drain timeout: nobody may take its events now
            job.broken = Failure("internal_error", "GreenletExit", "stopped at the drain timeout")
            job.skip_rest()
            raise
        except BaseException as exc:  # a bug here must neither kill the worker nor ack
            log.exception("internal error while running a job")
            self._abandon(job, Failure("internal_error", type(exc).__name__, str(exc)))
        finally:
            on_yield(previous)
            self.busy -= 1
            self._slots.release()
            self._release(job)

    def _release(self, job: Job) -> None:
        job.holds -= 1
        if not job.holds:
            try:
                job.sink.job_done(job)
            except Exception:  # the sink's bug must not end the green thread that ran the job
                log.exception("internal error while answering a job")

    def _abandon(self, job: Job, failure: Failure) -> None:
        """A job stopped half-way: fail it, take the events nobody took yet, and skip their
        ordering tickets so the events queued behind them on their keys still run."""
        job.broken = failure
        if job.tickets is None:
            job.skip_rest()
            return
        for i, _ in job.cursor:
            if (ticket := job.tickets.get(i)) is not None:
                self._sequencer.skip(ticket)

    @staticmethod
    def _pause() -> None:
        """The cooperative yield inside a big job; not a handler's wait, so no offer."""
        previous = on_yield(None)
        eventlet.sleep(0)
        on_yield(previous)

    # ------------------------------------------------------------------ running events

    def _drain(self, job: Job) -> None:
        """The hot loop: run events from the job's cursor until it is empty.

        A run of events of one type (a batch, usually) shares one route lookup and one
        counter update, and an event whose type has just direct handlers (a processor, at
        most one listener, no options) costs a call per handler. The sampled event and
        everything else go through ``_event``, as do all events of a job with requests or
        ordered events (``_drain_indexed``).
        """
        if job.numbered:
            self._drain_indexed(job)
            return
        cursor, by_type, failures = job.cursor, self.stats.by_type, job.failures
        sampled = job.sampled
        etype: str | None = None  # the type of the current run of events
        entry: Entry = (None, ())
        first = second = None  # the plans called bare, in this order (see _bare)
        func = None  # the first one's function
        run = processed = 0
        # A job of up to two chunks (a batch of 100, say) runs without a pause: the reader
        # yields after every read anyway, and islice plus a hub switch cost ~10 % of such a
        # job. Longer ones pause every YIELD_EVERY events.
        chunks = len(job.events) > 2 * YIELD_EVERY
        while True:
            for event in itertools.islice(cursor, YIELD_EVERY) if chunks else cursor:
                if event.type != etype:
                    if etype is not None:
                        tally(by_type, etype, run)
                        processed += run
                    etype, run = event.type, 0
                    entry = self._entries.get(etype) or self._entry(etype)
                    first, second = _bare(entry)
                    func = first.func if first is not None else None
                run += 1
                if func is None or event is sampled:
                    self._event(job, -1, event, entry)
                    continue
                try:
                    func(event)
                except GreenletExit:
                    raise
                except BaseException as exc:
                    failures.setdefault(id(event), self._failed(
                        first, event, exc, 1, traceback.format_exc()))  # type: ignore[arg-type]
                if second is not None:
                    self._listen_bare(job, second, event)
            if not job.left():
                break
            self._pause()  # a big job must not starve the hub
        if etype is not None:
            tally(by_type, etype, run)
            processed += run
        self.stats.events_processed += processed

    def _listen_bare(self, job: Job, plan: Plan, event: Event) -> None:
        """The hot loop's call of a type's one direct listener, after its processor."""
        try:
            plan.func(event)
        except GreenletExit:
            raise
        except BaseException as exc:
            job.failures.setdefault(id(event), self._failed(
                plan, event, exc, 1, traceback.format_exc()))

    def _drain_indexed(self, job: Job) -> None:
        """``_drain`` for jobs whose events need their index: requests, ordered events."""
        by_type, entries = self.stats.by_type, self._entries
        processed = 0
        while True:
            for i, event in itertools.islice(job.cursor, YIELD_EVERY):
                tally(by_type, event.type, 1)
                processed += 1
                self._event(job, i, event, entries.get(event.type) or self._entry(event.type))
            if not job.left():
                break
            self._pause()
        self.stats.events_processed += processed

    def _event(self, job: Job, i: int, event: Event, entry: Entry) -> None:
        """One event off the hot path: wait for its ordering turn, then process it."""
        tickets = job.tickets
        ticket = tickets.get(i) if tickets else None
        if ticket is None:
            self._process(job, i, event, entry)
            return
        if self._sequencer.park(ticket, job, i, event):
            job.holds += 1  # not its turn: whoever runs the previous ticket runs it
            return
        try:
            self._process(job, i, event, entry)
        finally:
            self._sequencer.done(ticket)

    def _run_parked(self, job: Job, i: int, event: Event) -> None:
        """Run an ordered event whose turn has come, in whichever green thread got there.

        It belongs to another job than the one this green thread runs, so nothing may escape
        from here: it would answer the wrong job and stop the key's other parked events."""
        try:
            self._process(job, i, event, self._entries.get(event.type) or self._entry(event.type))
        except GreenletExit:
            raise
        except BaseException as exc:
            log.exception("internal error while running a parked event")
            job.failures.setdefault(id(event), Failure(
                "internal_error", type(exc).__name__, str(exc)))
        finally:
            self._release(job)

    def _process(self, job: Job, i: int, event: Event, entry: Entry) -> None:
        request = i in job.requests
        handle = self._timed if event is job.sampled else self._handle
        value, failure = handle(entry, event, request)
        if request:
            job.values[i] = value
        if failure is not None:
            job.failures.setdefault(id(event), failure)

    def _handle(self, entry: Entry, event: Event, request: bool) -> tuple[Any, Failure | None]:
        """Run an event's processor, then its listeners; return (reply value, failure).

        A request with no processor runs nothing: it is refused before any handler runs,
        so a client that retries it causes no side effects.
        """
        processor, listeners = entry
        value = failure = None
        if processor is not None:
            # A failed request is answered with the error, so its caller owns the retry:
            # only failures nobody hears of (events, listeners) are dead-lettered.
            value, failure = self._call(processor, event, dead_letter=not request)
        elif request or not listeners:
            return None, self.outcomes.unrouted(event.type, request)
        if listeners:
            if len(listeners) == 1:
                listener_failure = self._call(listeners[0], event)[1]
            else:
                listener_failure = self._listen(listeners, event)
            # A listener never changes a request's reply, but an acked event is only
            # acknowledged once its listeners succeeded (or were dead-lettered).
            if failure is None and not request:
                failure = listener_failure
        return value, failure

    def _listen(self, listeners: Sequence[Plan], event: Event) -> Failure | None:
        """Run an event's listeners, sharing them with idle workers once one waits; return
        the first failure. Returns when every one of them has finished."""
        group = Listeners(self, listeners, event)
        self._listeners(group)
        group.holds -= 1
        if group.holds:  # helpers are still running some: wait for them
            group.waiter = eventlet.event.Event()
            group.waiter.wait()
        return group.failure

    def _help(self, group: Listeners) -> None:
        """A worker joining an event's listeners, holding one pool slot (released here)."""
        self.busy += 1
        group.holds += 1
        try:
            self._listeners(group)
        finally:
            self.busy -= 1
            self._slots.release()
            group.holds -= 1
            if not group.holds and group.waiter is not None:
                group.waiter.send()

    def _listeners(self, group: Listeners) -> None:
        """Run listeners from the group's cursor, offering the rest to idle workers while
        one waits. Only GreenletExit escapes: an internal error fails the event (after the
        helpers finished) and must not end a worker."""
        previous = on_yield(group)
        try:
            for plan in group.it:
                failure = self._call(plan, group.event)[1]
                if failure is not None and group.failure is None:
                    group.failure = failure
        except GreenletExit:
            raise
        except BaseException as exc:
            log.exception("internal error while running listeners")
            group.failure = group.failure or Failure(
                "internal_error", type(exc).__name__, str(exc))
        finally:
            on_yield(previous)

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

    def _timed(self, entry: Entry, event: Event, request: bool) -> tuple[Any, Failure | None]:
        """``_handle``, recording its wall time (green waits included) in the type's histogram."""
        start = time.perf_counter()
        try:
            return self._handle(entry, event, request)
        finally:
            self.stats.observe(event.type, time.perf_counter() - start)

    def _entry(self, etype: str) -> Entry:
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
            except GreenletExit:
                raise
            except BaseException as exc:
                return None, self._failed(plan, event, exc, 1, traceback.format_exc(),
                                          dead_letter)
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(plan, event), None
            except GreenletExit:
                raise
            except BaseException as exc:
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
            plan = self._plans[id(handler)] = self._new_plan(handler)
        return plan

    def _new_plan(self, handler: Handler) -> Plan:
        plan = Plan(handler, self._defaults)
        if self.tracing is not None:
            self.tracing.wrap(plan)  # only now: untraced plans call the handler itself
        return plan
