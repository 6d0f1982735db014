"""Units of work and their shared cursors: what the dispatcher runs, kept apart from how.

A ``Job`` is what a connection hands over: events, which of them are requests, and the
``Sink`` to answer once all of them ran. Its events (and an event's ``Listeners``) are handed
out by one iterator that every green thread working on it shares; green threads switch only
where one blocks, so two never take the same item. See ``evserver.dispatch`` for who runs them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from operator import length_hint
from typing import Any, Protocol

from .event import Event
from .ordering import Ticket
from .plan import Failure, Plan

_NO_REQUESTS: frozenset[int] = frozenset()


class Offers(Protocol):
    """The dispatcher, as the green threads working on shared work see it."""

    def offer(self, work: Shared) -> None:
        """Invite idle workers to take the rest of ``work`` (never blocks)."""


class Sink(Protocol):
    """Where a job's outcome goes: the connection (of whichever protocol) that read it."""

    def job_done(self, job: Job) -> None:
        """Called once per job, after every one of its events (processor and listeners) ran."""


class Shared:
    """Work whose items one iterator hands to every green thread that joins it.

    ``holds`` counts what keeps it open: each green thread working on it, and (for a job)
    each parked event. ``started`` tells a fresh job from an offer to join a running one.
    Calling it is the hub hook (``on_yield``) of the green threads working on it: it
    offers the rest to idle workers (``Dispatcher.offer``), with nothing allocated per run.
    """

    __slots__ = ("dispatcher", "holds", "started")

    dispatcher: Offers
    holds: int
    started: bool

    def __call__(self) -> None:
        self.dispatcher.offer(self)

    def left(self) -> int:
        """Items not yet taken (a hint: others may take them before the caller does)."""
        raise NotImplementedError


class Job(Shared):
    """Events decoded from one read of one connection, and where their outcome goes.

    ``requests`` holds the indexes of events whose processor's value is a reply; ``context``
    is the sink's own (its wire frames, say). After ``job_done``: ``failure(start, stop)`` and
    ``values`` (reply values by index) say how each event went.
    """

    __slots__ = ("_src", "broken", "context", "cursor", "events", "failures", "requests",
                 "sampled", "sink", "tickets", "values")

    def __init__(
        self, sink: Sink, events: list[Event], requests: frozenset[int] = _NO_REQUESTS,
        context: Any = None,
    ) -> None:
        self.holds = 0
        self.started = False
        self.sink = sink
        self.events = events
        self.requests = requests
        self.context = context
        # The first failure of each failed event, by id(event): the hot loop has no index.
        self.failures: dict[int, Failure] = {}
        self.values: dict[int, Any] = {}
        self.broken: Failure | None = None  # an internal error stopped the job half-way
        self.tickets: dict[int, Ticket] | None = None
        self.sampled: Event | None = None  # the event timed for the latency histogram
        self._src = iter(events)
        # What runners take events from: the events themselves, or (index, event) pairs
        # when some events need their index (requests, ordering tickets); see ``_admit``.
        self.cursor: Iterator[Any] = self._src

    def left(self) -> int:
        return length_hint(self._src)

    def number(self) -> None:
        """Hand out (index, event) pairs from now on: requests and ordered events need
        their index. Done once, before anyone runs the job."""
        self.cursor = enumerate(self._src)

    @property
    def numbered(self) -> bool:
        return self.cursor is not self._src

    def skip_rest(self) -> None:
        """Take every event nobody took yet, so that no runner starts one."""
        for _ in self._src:
            pass

    def failure(self, start: int, stop: int) -> Failure | None:
        """The first failure (by position) among ``events[start:stop]``, or None."""
        if failures := self.failures:
            for event in self.events[start:stop]:
                if (failure := failures.get(id(event))) is not None:
                    return failure
        return self.broken


class Listeners(Shared):
    """The listeners of one event: independent observers, so those that wait overlap."""

    __slots__ = ("event", "failure", "it", "waiter")

    def __init__(self, dispatcher: Offers, listeners: Sequence[Plan], event: Event) -> None:
        self.dispatcher = dispatcher
        self.holds = 1  # its owner's
        self.started = True
        self.event = event
        self.it = iter(listeners)
        self.failure: Failure | None = None
        self.waiter: Any = None  # an Event the owner waits on for helpers still running

    def left(self) -> int:
        return length_hint(self.it)
