"""The native codec on bytes alone: whole, byte by byte, with trailing bytes, and garbage."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evserver import protocol as p
from evserver.errors import FrameTooLarge, ProtocolError, UnsupportedVersion

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
types = st.from_regex(r"[a-z]{1,6}(\.[a-z]{1,6}){0,3}", fullmatch=True)
events = st.tuples(
    types, msgpack_values, st.none() | st.text(min_size=1, max_size=10),
    st.none() | st.floats(0, 2e9), st.none() | st.dictionaries(st.text(max_size=5),
                                                               st.text(max_size=5), max_size=3),
)


def server_reader(**kw):
    return p.FrameReader(p.SERVER_RECEIVES, **kw)


def feed_all(reader, data, step=None):
    frames = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        reader.receive_data(data[i : i + step])
        frames.extend(reader)
    return frames


@settings(max_examples=200, deadline=None)
@given(st.lists(events, min_size=1, max_size=5), st.integers(1, 2**63 - 1),
       st.sampled_from([1, 7, None]))
def test_round_trip_event_batch_request(evs, corr, step):
    wire = [p.event_wire(*e) for e in evs]
    data = (p.encode_event(0, wire[0]) + p.encode_batch(corr, wire)
            + p.encode_event(corr, wire[0], request=True))
    frames = feed_all(server_reader(), data, step)
    assert [f.kind for f in frames] == [p.EVENT, p.BATCH, p.REQUEST]
    assert [f.corr for f in frames] == [0, corr, corr]
    expected = [(t, d, i, tm, m or {}) for (t, d, i, tm, m) in evs]
    for got, exp in zip(frames[1].body, expected, strict=True):
        assert got.type == exp[0] and got.data == exp[1] and got.meta == exp[4]
        if exp[2] is not None:
            assert got.id == exp[2]
        if exp[3] is not None:
            assert got.time == exp[3]


def test_server_assigns_id_and_time_when_missing():
    (frame,) = feed_all(server_reader(), p.encode_event(0, ["a", 1]))
    ev = frame.body[0]
    assert ev.id and isinstance(ev.time, float)
    (frame2,) = feed_all(server_reader(), p.encode_event(0, ["a", 1]))
    assert frame2.body[0].id != ev.id


def test_client_side_frames_round_trip():
    data = (p.encode_hello({"server": "x"}) + p.encode_ack(3) + p.encode_reply(4, {"a": [1]})
            + p.encode_error(5, "handler_error", "ValueError", "bad") + p.encode_pong(6))
    for step in (1, 3, None):
        frames = feed_all(p.FrameReader(p.CLIENT_RECEIVES), data, step)
        assert frames == [
            p.Frame(p.HELLO, 0, {"server": "x"}), p.Frame(p.ACK, 3),
            p.Frame(p.REPLY, 4, {"a": [1]}),
            p.Frame(p.ERROR, 5, ("handler_error", "ValueError", "bad")), p.Frame(p.PONG, 6),
        ]


def test_trailing_partial_frame_is_kept():
    one = p.encode_event(0, ["a.b", {"x": 1}])
    r = server_reader()
    r.receive_data(one + one[:3])
    assert len(list(r)) == 1
    assert r.buffered == 3
    r.receive_data(one[3:])
    assert len(list(r)) == 1
    assert r.buffered == 0


def test_large_input_is_fed_in_chunks():
    one = p.encode_event(0, ["a.b", {"x": "y" * 50}])
    data = one * 50_000  # > 3 MiB in one call
    assert len(feed_all(server_reader(), data)) == 50_000


@pytest.mark.parametrize("limit", [1024, 4096])
def test_max_frame_bytes_exact_boundary(limit):
    def frame_of(size):
        base = p.encode_event(0, ["t", b""])
        pad = size - len(base)
        for extra in range(pad, pad - 6, -1):  # bin header grows with the payload
            data = p.encode_event(0, ["t", b"x" * extra])
            if len(data) == size:
                return data
        raise AssertionError(size)

    assert len(feed_all(server_reader(max_frame_bytes=limit), frame_of(limit))) == 1
    with pytest.raises(FrameTooLarge):
        feed_all(server_reader(max_frame_bytes=limit), frame_of(limit + 1))
    # Byte by byte too: the partial frame is refused as soon as it is too large.
    with pytest.raises(FrameTooLarge):
        feed_all(server_reader(max_frame_bytes=limit), frame_of(limit + 1), step=1)


def test_oversized_declared_length_fails_before_buffering_it():
    r = server_reader(max_frame_bytes=1024)
    header = msgpack.packb([1, 0, ["t", b"x" * 10]])[:5] + b"\xc6\x7f\xff\xff\xff"
    with pytest.raises(ProtocolError):
        for _ in range(100):
            r.receive_data(header + b"\x00" * 2000)
            list(r)


@pytest.mark.parametrize("data", [
    b"\xc1",                                   # never-used msgpack byte
    msgpack.packb({"not": "a frame"}),
    msgpack.packb([]),
    msgpack.packb(["1", 0]),                   # kind not an int
    msgpack.packb([99, 0]),                    # unknown kind
    msgpack.packb([p.ACK, 1]),                 # a server does not receive ACKs
    msgpack.packb([p.EVENT, 0]),               # missing event
    msgpack.packb([p.EVENT, -1, ["t", 1]]),    # negative corr
    msgpack.packb([p.REQUEST, 0, ["t", 1]]),   # request without corr
    msgpack.packb([p.EVENT, 0, ["", 1]]),      # empty type
    msgpack.packb([p.EVENT, 0, [5, 1]]),       # type not a string
    msgpack.packb([p.EVENT, 0, ["t"]]),        # no data
    msgpack.packb([p.EVENT, 0, ["t", 1, 2]]),  # id not a string
    msgpack.packb([p.EVENT, 0, ["t", 1, None, "now"]]),
    msgpack.packb([p.EVENT, 0, ["t", 1, None, None, [1]]]),
    msgpack.packb([p.BATCH, 1, "nope"]),
    msgpack.packb([p.PING]),
])
def test_garbage_is_a_protocol_error_and_the_reader_stays_dead(data):
    r = server_reader()
    with pytest.raises(ProtocolError) as info:
        feed_all(r, data + p.encode_ping(1))
    assert info.value.code in ("bad_frame", "frame_too_large")
    with pytest.raises(ProtocolError):
        r.receive_data(p.encode_ping(1))


def test_hello_version_mismatch():
    with pytest.raises(UnsupportedVersion) as info:
        feed_all(server_reader(), msgpack.packb([p.HELLO, 2, {}]))
    assert info.value.code == "unsupported_version"
    assert feed_all(server_reader(), p.encode_hello({}))[0].kind == p.HELLO


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_protocol_error(data):
    r = server_reader(max_frame_bytes=1024)
    try:
        for step in (1, None):
            feed_all(r, data, step)
    except ProtocolError:
        pass


def test_idle_reader_holds_no_decoder():
    r = server_reader()
    r.receive_data(p.encode_ping(1))
    assert len(list(r)) == 1
    assert r._unpacker is None  # the ~41 KiB Unpacker is only alive mid-frame


def test_the_documented_example_bytes_are_what_the_codec_produces():
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    request_hex, reply_hex = re.findall(r"```\n([0-9a-f ]+)\n```", doc)
    assert bytes.fromhex(request_hex) == p.encode_event(7, ["order.created", {"id": 1}],
                                                        request=True)
    assert bytes.fromhex(reply_hex) == p.encode_reply(7, {"id": 1})


def test_coalescing_fire_and_forget_events_keeps_order_and_limits():
    ev = lambda i: p.encode_event(0, ["t", i])  # noqa: E731
    data = (ev(0) + ev(1) + ev(2) + ev(3) + p.encode_event(5, ["t", 4]) + ev(5)
            + p.encode_event(0, ["t", 6, "id6"]) + p.encode_ping(9) + ev(7))
    for step in (1, None):
        r = server_reader()
        frames = []
        for i in range(0, len(data), step or len(data)):
            r.receive_data(data[i : i + (step or len(data))])
            frames += r.frames(coalesce=3)
        if step is None:
            shape = [(f.kind, f.corr, [e.data for e in f.body] if f.kind != p.PING else None)
                     for f in frames]
            assert shape == [
                (p.BATCH, 0, [0, 1, 2]), (p.BATCH, 0, [3]), (p.EVENT, 5, [4]),
                (p.BATCH, 0, [5, 6]), (p.PING, 9, None), (p.BATCH, 0, [7]),
            ]
        events = [e.data for f in frames if f.kind != p.PING for e in f.body]
        assert events == list(range(8))


def test_frames_in_slices_resume_where_the_last_slice_stopped():
    frames = [p.encode_event(0, ["t", i]) for i in range(7)] + [
        p.encode_batch(3, [["t", i] for i in range(7, 12)]), p.encode_ping(4),
        p.encode_event(5, ["t", 12], request=True)] + [
        p.encode_event(0, ["t", i]) for i in range(13, 20)]
    data = b"".join(frames)
    for step in (7, len(data)):
        r = server_reader()
        slices = []
        for i in range(0, len(data), step):
            r.receive_data(data[i : i + step])
            while fs := r.frames(coalesce=3, max_events=4):
                slices.append(fs)
        counts = [sum(len(f.body) if f.kind in p.EVENT_KINDS else 1 for f in fs)
                  for fs in slices]
        assert all(c <= 4 + 4 for c in counts)  # the limit, overshot by at most one frame
        if step == len(data):
            assert counts == [4, 8, 4, 4, 1]  # 3 single events, then a BATCH of 5
        assert [e.data for fs in slices for f in fs if f.kind != p.PING
                for e in f.body] == list(range(20))
        assert r.buffered == 0 and r._unpacker is None


@pytest.mark.parametrize("bad", [b"\xc1", msgpack.packb([p.EVENT, 0, [5, 1]])])
def test_frames_before_a_malformed_one_are_returned_then_the_error(bad):
    r = server_reader()
    r.receive_data(p.encode_event(3, ["t", 1], request=True) + p.encode_event(0, ["t", 2])
                   + bad + p.encode_ping(1))
    frames = r.frames(coalesce=4)
    assert [(f.kind, f.corr) for f in frames] == [(p.REQUEST, 3), (p.BATCH, 0)]
    for _ in range(2):  # and the reader stays dead
        with pytest.raises(ProtocolError):
            r.frames(coalesce=4)


@pytest.mark.parametrize("decode", [lambda r: list(iter(r.next_frame, None)),
                                    lambda r: r.frames(coalesce=4)])
def test_events_without_a_time_get_the_time_they_were_received(decode):
    import time

    r = server_reader()
    before = time.time()
    r.receive_data(p.encode_batch(0, [["t", 1], ["t", 2, None, None]])
                   + p.encode_event(0, ["t", 3]) + p.encode_event(0, ["t", 4, "id", 12.5]))
    times = [e.time for f in decode(r) for e in f.body]
    assert times[3] == 12.5
    assert all(before <= t <= time.time() for t in times[:3])
