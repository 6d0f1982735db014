"""Forward edges real clients hit, on the sans-I/O decoder: EventTime nanoseconds, which tags
are event types, and records with integer keys. The same over a real server: the end of
tests/test_forward_server.py."""

from __future__ import annotations

import random
import struct
from typing import Any

import msgpack
import pytest

from evserver.errors import ForwardError
from evserver.event import Event
from evserver.forward import ForwardConnection

T0 = 1_700_000_000


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def event_time(seconds: int, nanoseconds: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", seconds, nanoseconds))


def decode(wire: bytes) -> list[Event]:
    conn = ForwardConnection()
    conn.receive_data(wire)
    return [e for request in conn.requests() for e in request.events]


# ------------------------------------------------------- point 9: EventTime nanoseconds


def test_event_time_nanoseconds_are_kept_exactly_in_every_mode() -> None:
    rng = random.Random(9)
    times = [(T0 + rng.randrange(10**6), rng.randrange(10**9)) for _ in range(3000)]
    entries = [[event_time(s, ns), {"i": i}] for i, (s, ns) in enumerate(times)]
    packed = b"".join(packb(e) for e in entries)
    wire = (packb(["packed", packed, {"size": len(entries)}])
            + packb(["forward", entries[:100]])
            + b"".join(packb(["message", *e]) for e in entries[:100])
            + packb(["meta", [[[event_time(*times[0]), {"k": "v"}], {"i": 0}]]]))
    events = decode(wire)
    expected = [s * 10**9 + ns for s, ns in times]
    got = {e.type: [] for e in events}
    for e in events:
        got[e.type].append(e.time_ns)
    assert got["packed"] == expected
    assert got["forward"] == got["message"] == expected[:100]
    assert got["meta"] == expected[:1]
    assert all(abs(e.time - e.time_ns / 1e9) < 1e-6 for e in events)  # still float seconds
    assert isinstance(events[0].time, float)
    (plain,) = decode(packb(["int", T0, {"at": event_time(T0, 7)}]))
    assert plain.time == T0 and plain.time_ns == T0 * 10**9
    assert plain.data == {"at": T0 * 10**9 + 7}  # an EventTime in a record: int nanoseconds


# ------------------------------------------------- point 10: one rule for types and tags


BAD_TYPES = ["", "a..b", "*", "order.*", "a b", ".a", "a.", "tab\there"]


@pytest.mark.parametrize("bad", BAD_TYPES)
def test_forward_tags_follow_the_event_type_rule(bad: str) -> None:
    conn = ForwardConnection()
    conn.receive_data(packb(["ok.tag", T0, {}]) + packb([bad, T0, {}]))
    assert conn.next_request().tag == "ok.tag"  # type: ignore[union-attr]
    with pytest.raises(ForwardError, match="tag must be dot-separated non-empty segments"):
        conn.next_request()


# --------------------------------------------------- point 11: records with integer keys


def test_integer_record_keys_become_text_and_the_connection_goes_on() -> None:
    conn = ForwardConnection()
    packed = packb([T0, {"a": 1}]) + packb([T0, {2: "two", "b": {3: [4]}}])
    conn.receive_data(packb(["before", T0, {"k": 1}])
                      + packb(["message", T0, {1: "one", "k": "v"}, {"chunk": "m"}])
                      + packb(["packed", packed, {"size": 2}])
                      + packb(["forward", [[T0, {5: 5}], [T0, {"x": 1}]]])
                      + packb(["after", T0, {"k": 2}]))
    events = [(e.type, e.data) for r in conn.requests() for e in r.events]
    assert events == [("before", {"k": 1}), ("message", {"1": "one", "k": "v"}),
                      ("packed", {"a": 1}), ("packed", {"2": "two", "b": {"3": [4]}}),
                      ("forward", {"5": 5}), ("forward", {"x": 1}), ("after", {"k": 2})]


def test_packed_entries_with_integer_keys_on_a_strict_connection() -> None:
    packed = packb([event_time(T0, 5), {1: "x"}]) + packb([T0, {"y": 2}])
    for option in ({"size": 2}, {}):  # the one-call path and the streaming one
        (first, second) = decode(packb(["p", packed, option]))
        assert first.data == {"1": "x"} and first.time_ns == T0 * 10**9 + 5
        assert second.data == {"y": 2}


def test_colliding_integer_keys_never_build_an_int_keyed_dict() -> None:
    """Ints that all hash alike (multiples of 2**61-1, as far as msgpack's 64 bits reach)
    would make a dict quadratic (hash flooding): they arrive as text, whose hashes are
    randomised."""
    keys = [i * (2**61 - 1) for i in range(-4, 8)]
    assert len({hash(k) for k in keys}) == 1
    (event,) = decode(packb(["flood", T0, dict.fromkeys(keys, 0)]))
    assert event.data == {str(k): 0 for k in keys}
