"""``ordered_by``: the same key runs strictly in arrival order, different keys in parallel.

When a job is submitted (that is the arrival order), each event whose processor has a key
gets a *ticket*: the key's next number. A green thread runs an event only when its ticket is
the key's next; otherwise it parks the event and goes on, and whichever green thread finishes
the previous ticket runs it. Nobody ever waits for anybody, so ordering cannot deadlock the
pool, and a key's backlog runs in one green thread while the other keys' run in others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from .event import Event
from .plan import Plan

log = logging.getLogger("evserver.dispatch")

Ticket = tuple[Any, int]  # (key, number)


class _KeyState:
    """Per key: the next ticket to hand out, the next to run, and the parked events."""

    __slots__ = ("issued", "next", "parked")

    def __init__(self) -> None:
        self.issued = 0
        self.next = 0
        self.parked: dict[int, tuple[Any, int, Event] | None] = {}  # None: skip it


class Sequencer:
    """The tickets of every live key; keys with nothing outstanding are forgotten.

    ``run(job, i, event)`` processes a parked event and then releases the hold its parking
    took on ``job``.
    """

    def __init__(self, run: Callable[[Any, int, Event], None]) -> None:
        self._run_parked = run
        self._keys: dict[Any, _KeyState] = {}

    def issue(self, events: Sequence[Event],
              processor_of: Callable[[str], Plan | None]) -> dict[int, Ticket] | None:
        """Tickets for the ordered events among ``events``, by index (None if there are none).

        A key function that fails leaves its event unordered, with a warning.
        """
        tickets: dict[int, Ticket] = {}
        for i, event in enumerate(events):
            plan = processor_of(event.type)
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
            tickets[i] = (key, state.issued)
            state.issued += 1
        return tickets or None

    def park(self, ticket: Ticket, job: Any, i: int, event: Event) -> bool:
        """Park the event unless its turn has come; True if it was parked (the caller then
        holds ``job`` open for it), False if the caller must run it now and then ``done``."""
        key, number = ticket
        state = self._keys[key]
        if state.next == number:
            return False
        state.parked[number] = (job, i, event)
        return True

    def done(self, ticket: Ticket) -> None:
        """The ticket's event has run: run every parked event whose turn has come."""
        key, _ = ticket
        state = self._keys[key]
        state.next += 1
        self._resume(key, state)

    def skip(self, ticket: Ticket) -> None:
        """An event that will never run (its job was abandoned): let the key move past it."""
        key, number = ticket
        state = self._keys.get(key)
        if state is not None and number >= state.next and number not in state.parked:
            state.parked[number] = None
            self._resume(key, state)

    def _resume(self, key: Any, state: _KeyState) -> None:
        """Run the parked events that are due; ``run`` lets nothing but GreenletExit (a stop
        at the drain timeout) escape, so one event cannot strand the key's others."""
        while state.next in state.parked:
            parked = state.parked.pop(state.next)
            try:
                if parked is not None:  # None: a ticket of an abandoned job
                    self._run_parked(*parked)
            finally:
                state.next += 1
        if state.next == state.issued and self._keys.get(key) is state:
            del self._keys[key]  # nothing outstanding: keep memory bounded by live keys
