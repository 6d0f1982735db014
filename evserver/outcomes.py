"""What became of the events: counters per type, and the bookkeeping of failed ones.

Kept apart from the dispatcher's scheduling so that the hot loop only calls in here when
something went wrong: a handler raised (counted, logged with its traceback at a bounded rate,
dead-lettered) or an event had nowhere to go.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from .deadletters import DeadLetter, DeadLetterStore
from .errors import RoutingError
from .event import Event
from .logs import LogBudget
from .metrics import Histogram
from .plan import Failure, Plan
from .tracing import DispatchTracing

log = logging.getLogger("evserver.dispatch")

MAX_TYPES = 4096  # event types kept apart in the stats and the route cache
OTHER_TYPES = "(other types)"


def tally(counts: defaultdict[str, int], etype: str, n: int) -> None:
    """Add to a type's count; clients choose types, so at most MAX_TYPES are kept apart and
    the rest are counted together under OTHER_TYPES."""
    if etype not in counts and len(counts) >= MAX_TYPES:
        etype = OTHER_TYPES
    counts[etype] += n


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
        # Sampled handler durations per type; bounded like the route cache.
        self.latency: dict[str, Histogram] = {}

    def observe(self, etype: str, seconds: float) -> None:
        """Record one sampled handling time of an event of ``etype``."""
        hist = self.latency.get(etype)
        if hist is None:
            if len(self.latency) >= MAX_TYPES:  # clients choose types: stay bounded
                self.latency.clear()
            hist = self.latency[etype] = Histogram()
        hist.observe(seconds)


class Outcomes:
    """Turns what went wrong into a ``Failure`` for the peer, after counting, logging and
    (for failures nobody hears of) dead-lettering it."""

    def __init__(self, stats: Stats, dead_letters: DeadLetterStore | None) -> None:
        self.stats = stats
        self.dead_letters = dead_letters
        self.debug = False  # [security] debug: send tracebacks (paths and all) to clients
        self._error_log = LogBudget()
        self._unrouted_log = LogBudget(per_interval=1, interval=60.0)  # per event type
        self.tracing: DispatchTracing | None = None  # ends a failed run's span, when tracing

    def failed(
        self, plan: Plan, event: Event, exc: BaseException, attempts: int, tb: str,
        dead_letter: bool = True,
    ) -> Failure:
        """A handler raised on its last attempt: ``tb`` is its formatted traceback."""
        lettered = self.stats.dead_letters
        failure = self._record(plan, event, exc, attempts, tb, dead_letter)
        if self.tracing is not None:
            self.tracing.failed(plan, event, attempts, self.stats.dead_letters > lettered)
        if self.debug:
            failure.message = f"{failure.message}\n{tb}"
        return failure

    def _record(
        self, plan: Plan, event: Event, exc: BaseException, attempts: int, tb: str,
        dead_letter: bool,
    ) -> Failure:
        handler = plan.handler
        self.stats.handler_errors += 1
        tally(self.stats.errors_by_type, event.type, 1)
        if self._error_log.allow(handler.name):
            # The traceback goes to the server log only (clients get type and message).
            log.error(
                "%s %s failed on %s (id %s) after %d attempt(s): %s: %s%s\n%s", handler.kind,
                handler.name, event.type, event.id, attempts, type(exc).__name__, exc,
                self._error_log.suppressed_note(handler.name), tb.rstrip(),
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

    def unrouted(self, etype: str, request: bool) -> Failure:
        """An event no handler takes, or a request no processor takes."""
        self.stats.unrouted += 1
        what = "processor" if request else "processor or listener"
        if not request:
            self._unrouted_log.warning(log, etype, "no %s for event type %r (logged once a "
                                       "minute per type)", what, etype)
        return Failure(RoutingError.code, "RoutingError", f"no {what} for event type {etype!r}")
