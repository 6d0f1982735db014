"""The ``Event`` value handed to processors and listeners.

It lives in its own module because both the wire codecs and the app need it, and neither
should import the other. Events are built once per decoded event on the hot path, so the
class uses ``__slots__`` and assigns an id lazily: most fire-and-forget events never have
their id read.
"""

from __future__ import annotations

import itertools
import os
import re
import time as _time
import uuid
from typing import Any, TypeVar

# Ids the server assigns: unique per process start (random prefix) and cheap (a counter),
# instead of a uuid4 per event, which costs more than decoding the event.
_ID_PREFIX = uuid.uuid4().hex[:12]
_id_counter = itertools.count(1)


# The one rule for event types, native or a Forward tag: dot-separated non-empty segments,
# printable, without whitespace or '*' (which only patterns use). A type that could never be
# routed by a pattern, or only by accident ("a..b", "", "*"), is refused where it arrives.
_TYPE = re.compile(r"[^\s.*]+(?:\.[^\s.*]+)*\Z")
TYPE_RULE = "dot-separated non-empty segments without whitespace or '*'"
#: Types already found valid: the decoders' per-event check is one set lookup. Bounded, so
#: a peer inventing types cannot grow it; past the bound, types are checked each time.
KNOWN_TYPES: set[str] = set()
_KNOWN_TYPES_MAX = 4096
_WIRE_NAMES = {int: "an integer", float: "a float", bool: "a boolean", bytes: "bin",
               list: "an array", dict: "a map", type(None): "nil"}


def type_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid event type, or None when it is."""
    if type(value) is not str:
        return f"must be a string, got {_WIRE_NAMES.get(type(value), type(value).__name__)}"
    if value in KNOWN_TYPES:
        return None
    if not (_TYPE.match(value) and value.isprintable()):
        return f"must be {TYPE_RULE}, got {value[:100]!r}"
    if len(KNOWN_TYPES) < _KNOWN_TYPES_MAX:
        KNOWN_TYPES.add(value)
    return None


def new_event_id() -> str:
    """Return a fresh event id, unique across processes and restarts."""
    return f"{_ID_PREFIX}-{os.getpid():x}-{next(_id_counter):x}"


class Event:
    """One event: ``type``, ``data`` (any msgpack value), ``id``, ``time``, ``meta``.

    ``id`` is the client's when it sent one (so handlers can deduplicate re-sent events),
    otherwise assigned by the server the first time it is read.
    """

    __slots__ = ("_id", "_meta", "data", "time", "type")

    def __init__(
        self,
        type: str,
        data: Any = None,
        id: str | None = None,
        time: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.type = type
        self.data = data
        self._id = id
        self.time = _time.time() if time is None else time
        self._meta = meta  # the empty dict is made on first use: most events have no meta

    @property
    def id(self) -> str:
        if self._id is None:
            self._id = new_event_id()
        return self._id

    @id.setter
    def id(self, value: str) -> None:
        self._id = value

    @property
    def time_ns(self) -> int:
        """``time`` in integer nanoseconds since the epoch.

        Derived from ``time``, whose float64 holds about 0.25 us at current epochs; a
        Forward event whose sender gave nanoseconds (EventTime) has them exactly.
        """
        t = self.time
        return t * 1_000_000_000 if type(t) is int else round(t * 1e9)

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = {}
        return self._meta

    @meta.setter
    def meta(self, value: dict[str, Any]) -> None:
        self._meta = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(type={self.type!r}, id={self.id!r}, data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.type, self.data, self.id, self.time, self.meta) == (
            other.type,
            other.data,
            other.id,
            other.time,
            other.meta,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable value object


E = TypeVar("E", bound=Event)
_alloc = object.__new__


def decoded(cls: type[E], type: str, data: Any, time: float, meta: dict[str, Any] | None,
            id: str | None = None) -> E:
    """``cls(type, data, id, time, meta)`` for the decoders' per-event loops: CPython 3.11
    calls a function in about half the time it takes to run a class's ``__init__``, which
    made this about 8 % of the whole per-event cost of a batch."""
    event = _alloc(cls)
    event.type = type
    event.data = data
    event._id = id
    event.time = time
    event._meta = meta
    return event
