"""The bytes of a stream entry and of a reply, both msgpack.

An entry (field ``d`` of a partition stream entry) is ``[origin, token, events]``: the edge
node that appended it, the edge's token for the job, and per event ``[type, data, id, time,
meta, index, want]``. ``index`` is the event's place in the edge's job; ``want`` says what
the edge waits for: ``NOTHING``, ``ACK`` (to know it ran) or ``REPLY`` (a request's value).
The event id is assigned by the edge, so every delivery of an event carries the same id and
handlers can deduplicate on it.

A reply (field ``d`` of an inbox entry) is ``[token, partition, results]`` with ``[index,
None, value]`` per request and ``[index, [code, type, message], None]`` per failed event
(an event not listed succeeded): the edge waits for one reply per partition its job went
to, and ignores a second one (a redelivered entry's).
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..event import Event

NOTHING, ACK, REPLY = 0, 1, 2
FIELD = b"d"

Failed = tuple[str, str, str]  # code, exception type, message
Outcome = tuple[int, Failed | None, Any]  # index, failure, value


def encode_entry(origin: str, token: int, items: list[tuple[Event, int, int]]) -> bytes:
    """``items``: (event, index, want) in the order they must run."""
    return msgpack.packb([origin, token, [
        [e.type, e.data, e.id, e.time, e._meta, index, want] for e, index, want in items]])


def decode_entry(raw: bytes) -> tuple[str, int, list[tuple[Event, int, int]]]:
    origin, token, rows = msgpack.unpackb(raw, strict_map_key=False)
    items = [(Event(t, data, eid, at, meta), index, want)
             for t, data, eid, at, meta, index, want in rows]
    return origin, token, items


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
