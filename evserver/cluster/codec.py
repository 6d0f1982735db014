"""The bytes of a stream entry and of a reply, both msgpack.

An entry (field ``d`` of a partition stream entry) is ``[origin, token, events, indexes,
wants]``: the edge node that appended it, the edge's token for the job, per event ``[type,
data, id, time, meta]``, and in two flat lists each event's place in the edge's job and
what the edge waits for: ``NOTHING``, ``ACK`` (to know it ran) or ``REPLY`` (a request's
value). Flat lists cost less to build and scan than a field per event.
An event without a client-given id gets one derived from its place in the stream
(``<stream entry id>/<index>``, see ``AppendedEvent``), so every delivery of it carries the
same id and handlers can deduplicate on it, and the edge pays nothing for ids.

A reply (field ``d`` of an inbox entry) is ``[token, partition, results]`` with ``[index,
None, value]`` per request and ``[index, [code, type, message], None]`` per failed event
(an event not listed succeeded): the edge waits for one reply per partition its job went
to, and ignores a second one (a redelivered entry's).
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..event import Event, decoded

NOTHING, ACK, REPLY = 0, 1, 2
FIELD = b"d"

Failed = tuple[str, str, str]  # code, exception type, message
Outcome = tuple[int, Failed | None, Any]  # index, failure, value


def encode_entry(origin: str, token: int, events: list[Event], indexes: list[int],
                 wants: list[int]) -> bytes:
    """The events in the order they must run, with their indexes in the edge's job."""
    return msgpack.packb([origin, token, [[e.type, e.data, e._id, e.time, e._meta]
                                          for e in events], indexes, wants])


class AppendedEvent(Event):
    """An event read from a partition stream. Without a client-given id, its id is its
    place in the stream: ``<partition>:<entry id>/<index>``, the same on every delivery,
    unique in the cluster, and formatted only if a handler reads it."""

    __slots__ = ("_entry", "_index")

    _entry: str
    _index: int

    @property
    def id(self) -> str:
        if self._id is None:
            self._id = f"{self._entry}/{self._index}"
        return self._id

    @id.setter
    def id(self, value: str) -> None:
        self._id = value


class Entry:
    """A decoded entry: who appended it, its events and, per event, index and want."""

    __slots__ = ("events", "indexes", "origin", "token", "wants")

    def __init__(self, origin: str, token: int, events: list[Event], indexes: list[int],
                 wants: list[int]) -> None:
        self.origin = origin
        self.token = token
        self.events = events
        self.indexes = indexes
        self.wants = wants

    @property
    def wanted(self) -> bool:
        """Does the edge wait for a report on this entry?"""
        return ACK in self.wants or REPLY in self.wants


def decode_entry(raw: bytes, place: str) -> Entry:
    """``place``: ``<partition>:<entry id>``, the prefix of derived event ids."""
    origin, token, rows, indexes, wants = msgpack.unpackb(raw, strict_map_key=False)
    events: list[Event] = []
    append = events.append
    for (etype, data, eid, at, meta), index in zip(rows, indexes, strict=True):
        event = decoded(AppendedEvent, etype, data, at, meta, eid)
        event._entry = place
        event._index = index
        append(event)
    return Entry(origin, token, events, indexes, wants)


Report = tuple[int, int, list[Outcome]]  # token, partition, outcomes


def encode_reply(token: int, partition: int, outcomes: list[Outcome]) -> bytes:
    """The bytes of a report; a reply value msgpack cannot carry becomes that event's error."""
    rows = [[index, list(f) if f else None, value] for index, f, value in outcomes]
    try:
        return msgpack.packb([token, partition, rows])
    except (TypeError, ValueError, OverflowError) as exc:
        error = ["handler_error", "TypeError",
                 f"the processor's return value cannot be sent: {exc}"]
        return msgpack.packb([token, partition, [
            [index, f, None] if f else [index, error, None] for index, f, _v in rows]])


def decode_reply(raw: bytes) -> Report:
    token, partition, rows = msgpack.unpackb(raw, strict_map_key=False)
    return token, partition, [(index, tuple(f) if f else None, value)
                              for index, f, value in rows]
