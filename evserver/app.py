"""``App``: where users register processors and listeners, and how event types route to them.

Decorators register and return the function unchanged (nameko's rule), so a processor stays
a plain function a unit test can call. Routing is resolved once per event type and cached;
no pattern is matched per event.

Patterns are dot-separated. ``*`` matches exactly one segment; ``**`` (last position only)
matches one or more trailing segments. When several processor patterns match a type, the
most specific wins: compare the patterns segment by segment from the left, where a literal
segment beats ``*`` and ``*`` beats ``**``; at the first difference the more specific
segment wins. An exact type therefore beats every pattern, ``order.*`` beats ``*.created``
and ``order.*`` beats ``order.**``. The rule is a total order, so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .errors import RegistrationError
from .event import Event

HandlerFunc = Callable[[Event], Any]
F = TypeVar("F", bound=HandlerFunc)

_LITERAL, _STAR, _DOUBLE = 0, 1, 2
_ROUTE_CACHE_MAX = 4096  # distinct types cached; clients choose types, so the cache is bounded


@dataclass(frozen=True)
class Handler:
    """A registered processor or listener with its options."""

    func: HandlerFunc
    pattern: str
    kind: Literal["processor", "listener"]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        module = getattr(self.func, "__module__", None) or "?"
        return f"{module}.{getattr(self.func, '__qualname__', repr(self.func))}"


@dataclass(frozen=True)
class Route:
    """What runs for one event type: at most one processor, any number of listeners."""

    type: str
    processor: Handler | None
    listeners: tuple[Handler, ...]

    @property
    def empty(self) -> bool:
        return self.processor is None and not self.listeners


def compile_pattern(pattern: str) -> tuple[tuple[int, str], ...]:
    """Validate a pattern and return its segments as ``(rank, text)`` pairs."""
    if not isinstance(pattern, str) or not pattern:
        raise RegistrationError(f"pattern must be a non-empty string, got {pattern!r}")
    parts = pattern.split(".")
    out = []
    for i, part in enumerate(parts):
        if part == "**":
            if i != len(parts) - 1:
                raise RegistrationError(f"{pattern!r}: '**' is only allowed as the last segment")
            out.append((_DOUBLE, part))
        elif part == "*":
            out.append((_STAR, part))
        elif not part or "*" in part:
            raise RegistrationError(
                f"{pattern!r}: segments must be non-empty words, '*' or a final '**'"
            )
        else:
            out.append((_LITERAL, part))
    return tuple(out)


def _options(
    pattern: str, timeout: float | None, retries: int | None, backoff: float | None,
    blocking: bool,
) -> dict[str, Any]:
    """Validate handler options eagerly, so a typo fails at import, not at the first event."""
    checks = (("timeout", timeout, (int, float), 0), ("retries", retries, (int,), 0),
              ("backoff", backoff, (int, float), 0))
    for name, value, types, low in checks:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, types) or value < low
        ):
            raise RegistrationError(f"{pattern!r}: {name} must be a number >= {low}, "
                                    f"got {value!r}")
    return {"timeout": timeout, "retries": retries, "backoff": backoff,
            "blocking": bool(blocking)}


def _matches(segments: tuple[tuple[int, str], ...], parts: list[str]) -> bool:
    for i, (rank, text) in enumerate(segments):
        if rank == _DOUBLE:
            return len(parts) > i
        if i >= len(parts) or (rank == _LITERAL and parts[i] != text):
            return False
    return len(parts) == len(segments)


def matches(pattern: str, type: str) -> bool:
    """True when ``type`` matches ``pattern`` (see the module docstring)."""
    return _matches(compile_pattern(pattern), type.split("."))


def _specificity(segments: tuple[tuple[int, str], ...]) -> tuple[int, ...]:
    # Smaller is more specific; an exact type is all zeros. A longer pattern with the same
    # prefix loses to a ``**`` only at the position where ``**`` stands, which the
    # per-position comparison already decides.
    return tuple(rank for rank, _ in segments)


class App:
    """A set of processors and listeners; pass it to ``evserver serve module:app``.

    >>> app = App()
    >>> @app.processor("order.created")
    ... def create(event): return {"id": event.data["id"]}
    """

    def __init__(self, name: str = "evserver") -> None:
        self.name = name
        self._processors: dict[str, tuple[tuple[tuple[int, str], ...], Handler]] = {}
        self._listeners: list[tuple[tuple[tuple[int, str], ...], Handler]] = []
        self._routes: dict[str, Route] = {}

    # ------------------------------------------------------------------ registration

    def processor(
        self,
        pattern: str,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        blocking: bool = False,
        ordered_by: str | Callable[[Event], Any] | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as THE processor for ``pattern``.

        Its return value is the reply to a request. A second processor for the same
        pattern raises ``RegistrationError`` at import time. ``timeout`` (seconds),
        ``retries`` (after the first attempt) and ``backoff`` (base delay, exponential with
        jitter) default to the ``[handlers]`` config table; ``blocking=True`` runs the
        handler in a native thread pool so CPU-bound or non-green code cannot stall the
        hub; ``ordered_by`` (a field of ``event.data`` or a function of the event) makes
        events with the same key run strictly in arrival order.
        """
        segments = compile_pattern(pattern)
        options = _options(pattern, timeout, retries, backoff, blocking)
        if ordered_by is not None:
            if not (isinstance(ordered_by, str) or callable(ordered_by)):
                raise RegistrationError(
                    f"{pattern!r}: ordered_by must be a field name or a callable")
            options["ordered_by"] = ordered_by

        def register(func: F) -> F:
            self._check_callable(func, pattern)
            if pattern in self._processors:
                other = self._processors[pattern][1]
                raise RegistrationError(
                    f"a processor for {pattern!r} is already registered ({other.name}); "
                    "each event type has exactly one processor"
                )
            self._processors[pattern] = (segments, Handler(func, pattern, "processor", options))
            self._routes.clear()
            return func

        return register

    def listener(
        self,
        pattern: str,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        blocking: bool = False,
    ) -> Callable[[F], F]:
        """Register the decorated function as a listener: it sees every matching event.

        Its return value is ignored and its failure never changes a request's reply. Options
        as for ``processor``.
        """
        segments = compile_pattern(pattern)
        options = _options(pattern, timeout, retries, backoff, blocking)

        def register(func: F) -> F:
            self._check_callable(func, pattern)
            self._listeners.append((segments, Handler(func, pattern, "listener", options)))
            self._routes.clear()
            return func

        return register

    @staticmethod
    def _check_callable(func: Any, pattern: str) -> None:
        if not callable(func):
            raise RegistrationError(f"handler for {pattern!r} must be callable, got {func!r}")

    # ------------------------------------------------------------------ routing

    def route(self, type: str) -> Route:
        """Return the cached ``Route`` for an event type, resolving it on first use."""
        route = self._routes.get(type)
        if route is None:
            route = self._resolve(type)
            if len(self._routes) >= _ROUTE_CACHE_MAX:
                self._routes.clear()
            self._routes[type] = route
        return route

    def _resolve(self, type: str) -> Route:
        parts = type.split(".")
        best: tuple[tuple[int, ...], Handler] | None = None
        for segments, handler in self._processors.values():
            if _matches(segments, parts):
                rank = _specificity(segments)
                if best is None or rank < best[0]:
                    best = (rank, handler)
        listeners = tuple(h for segments, h in self._listeners if _matches(segments, parts))
        return Route(type, best[1] if best else None, listeners)

    @property
    def handlers(self) -> list[Handler]:
        """Every registered handler, processors first, in registration order."""
        return [h for _, h in self._processors.values()] + [h for _, h in self._listeners]
