"""Conformance tests for evserver.forward against the Forward Protocol v1.5 checklist.

Wire bytes are built by hand where the exact encoding matters (str32 entries, ext8 EventTime,
the spec's worked examples) and with fluent-logger where interop with a real client is the point.
"""

from __future__ import annotations

import gzip
import socket
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import pytest
from fluent import sender
from hypothesis import given, settings
from hypothesis import strategies as st

from evserver import forward
from evserver.errors import ForwardError, FrameTooLarge, ProtocolError
from evserver.forward import (
    ForwardConnection,
    ForwardEvent,
    ForwardHandshake,
    ForwardRequest,
    HandshakeFailed,
    RequestTooLarge,
    ack_bytes,
)

T0 = 1441588984
NOW = 1_700_000_000.25


@pytest.fixture(autouse=True)
def _pin_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward, "_now", lambda: NOW)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def event_time(seconds: int, nanoseconds: int = 0) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", seconds, nanoseconds))


def str32(data: bytes) -> bytes:
    """A msgpack str32 header plus raw bytes, as Fluentd out_forward writes PackedForward."""
    return b"\xdb" + struct.pack(">I", len(data)) + data


def fluentd_packed(tag: str, blob: bytes, option: dict[str, Any]) -> bytes:
    return b"\x93" + packb(tag) + str32(blob) + packb(option)


def entries_blob(*entries: Any) -> bytes:
    return b"".join(packb(e) for e in entries)


def decode_all(data: bytes, **kwargs: Any) -> list[ForwardRequest]:
    conn = ForwardConnection(**kwargs)
    conn.receive_data(data)
    requests = list(conn)
    assert not conn.in_request
    return requests


def decode_one(data: bytes, **kwargs: Any) -> ForwardRequest:
    (request,) = decode_all(data, **kwargs)
    return request


def simple(request: ForwardRequest) -> list[tuple[Any, Any, Any]]:
    """(time, record, v1.5 metadata) per event; every event is marked as from Forward."""
    assert all(e.type == request.tag and e.meta["protocol"] == "forward"
               for e in request.events)
    return [(e.time, e.data, {k: v for k, v in e.meta.items() if k != "protocol"})
            for e in request.events]


# --- 1-2. Message mode and acks --------------------------------------------------------------


def test_message_mode_spec_example_bytes() -> None:
    wire = bytes.fromhex(
        "93a8746167 2e6e616d65 ce55ece6f8 81a76d657373616765 a3626172".replace(" ", "")
    )
    request = decode_one(wire)
    assert (request.tag, request.mode, request.chunk, request.options) == (
        "tag.name",
        "message",
        None,
        {},
    )
    assert simple(request) == [(T0, {"message": "bar"}, {})]
    assert request.size == len(wire)
    assert request.skipped == 0


def test_message_mode_with_empty_option_asks_no_ack() -> None:
    request = decode_one(packb(["tag", T0, {"a": 1}, {}]))
    assert simple(request) == [(T0, {"a": 1}, {})]
    assert request.chunk is None


@pytest.mark.parametrize(
    "chunk",
    ["p8n9gmxTQVC8/nh2wlKKeQ==", "VESFkVa4eEpn+/hwFcOpLw==\n", b"\x00\xffraw-bin-chunk", ""],
)
def test_ack_echoes_chunk_byte_identically(chunk: str | bytes) -> None:
    request = decode_one(packb(["tag", T0, {"a": 1}, {"chunk": chunk}]))
    assert request.chunk == chunk
    assert type(request.chunk) is type(chunk)
    ack = ack_bytes(request.chunk)
    assert ack == b"\x81\xa3ack" + packb(chunk)
    assert msgpack.unpackb(ack, raw=False) == {"ack": chunk}


def test_ack_matches_spec_example_bytes() -> None:
    expected = bytes.fromhex("81a361636bb870386e39676d7854515643382f6e6832776c4b4b65513d3d")
    assert ack_bytes("p8n9gmxTQVC8/nh2wlKKeQ==") == expected


def test_ack_of_non_utf8_str_chunk_is_byte_identical() -> None:
    raw_chunk = b"\xa7\xc9}\x9a\x0cSAP\xbc\xfex\x76"  # a str holding invalid UTF-8
    wire = b"\x94" + packb("tag") + packb(T0) + packb({"a": 1})
    wire += b"\x81\xa5chunk" + bytes([0xA0 | len(raw_chunk)]) + raw_chunk
    request = decode_one(wire)
    assert ack_bytes(request.chunk) == b"\x81\xa3ack" + bytes([0xA0 | len(raw_chunk)]) + raw_chunk


def test_acks_come_back_in_request_order() -> None:
    chunks = [f"chunk-{i}==\n" for i in range(5)]
    wire = b"".join(packb(["t", T0, {"i": i}, {"chunk": c}]) for i, c in enumerate(chunks))
    acks = [ack_bytes(r.chunk) for r in decode_all(wire) if r.chunk is not None]
    assert acks == [ack_bytes(c) for c in chunks]


def test_invalid_message_event_is_skipped_but_still_acked() -> None:
    request = decode_one(packb(["tag", T0, "not a map", {"chunk": "c1"}]))
    assert request.events == []
    assert request.skipped == 1
    assert request.chunk == "c1"


# --- 3. Time encodings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("time_bytes", "expected"),
    [
        (bytes.fromhex("d70055ece6f800000000"), float(T0)),  # fixext8
        (bytes.fromhex("d70055ece6f8075bcd15"), T0 + 0.123456789),  # fixext8 + ns
        (bytes.fromhex("c7080055ece6f8075bcd15"), T0 + 0.123456789),  # ext8, length 8
        (bytes.fromhex("ce55ece6f8"), T0),  # uint32
        (bytes.fromhex("cb41d57b39be200000"), T0 + 0.5),  # float64 (fluent-logger)
        (b"\x00", NOW),  # 0 -> now, as Fluentd does
        (b"\xc0", NOW),  # nil -> now, as Fluentd does
    ],
)
def test_time_encodings_in_message_mode(time_bytes: bytes, expected: float) -> None:
    wire = b"\x93" + packb("tag") + time_bytes + packb({"k": "v"})
    (entry,) = decode_one(wire).events
    assert entry.time == pytest.approx(expected, abs=1e-6)
    assert entry.data == {"k": "v"}


def test_event_time_keeps_nanoseconds_to_float_precision() -> None:
    (entry,) = decode_one(packb(["tag", event_time(T0, 999_999_999), {}])).events
    assert entry.time == T0 + 0.999999999


def test_v15_metadata_time_form_in_forward_and_packed() -> None:
    meta = {"otel": {"trace_id": "abc"}}
    entries = [
        [[event_time(T0, 5), meta], {"a": 1}],
        [[T0, {}], {"a": 2}],
        [[0], {"a": 3}],
        [T0, {"a": 4}],
    ]
    expected = [
        (T0 + 5e-9, {"a": 1}, meta),
        (T0, {"a": 2}, {}),
        (NOW, {"a": 3}, {}),
        (T0, {"a": 4}, {}),
    ]
    for wire in (
        packb(["tag", entries]),
        packb(["tag", entries_blob(*entries)]),
        fluentd_packed("tag", entries_blob(*entries), {"compressed": "text"}),
    ):
        request = decode_one(wire)
        assert simple(request) == expected
        assert request.skipped == 0


def test_invalid_entries_are_skipped_and_counted() -> None:
    entries = [
        [T0, {"ok": 1}],
        [T0, "record is a str"],
        ["time is a str", {}],
        [True, {}],  # bool is not a time
        [[T0, "meta is a str"], {}],
        [[T0, {}, {}], {}],
        [[[T0], {}], {}],
        [T0, {}, "extra"],
        42,
        [event_time(T0), {"ok": 2}],
    ]
    request = decode_one(packb(["tag", entries, {"chunk": "x"}]))
    assert [e.data for e in request.events] == [{"ok": 1}, {"ok": 2}]
    assert request.skipped == 8
    assert request.chunk == "x"


# --- 4-6. Forward, PackedForward, CompressedPackedForward ------------------------------------


def test_forward_mode_n_entries_one_ack() -> None:
    entries = [[T0 + i, {"i": i}] for i in range(50)]
    request = decode_one(packb(["app", entries, {"size": 50, "chunk": "abc==\n"}]))
    assert request.mode == "forward"
    assert [e.data["i"] for e in request.events] == list(range(50))
    assert request.options == {"size": 50, "chunk": "abc==\n"}
    assert ack_bytes(request.chunk) == packb({"ack": "abc==\n"})


def test_packed_forward_as_bin() -> None:
    blob = entries_blob(*([event_time(T0, i), {"i": i}] for i in range(10)))
    request = decode_one(packb(["app", blob, {"size": 10}]))
    assert request.mode == "packed"
    assert [e.data["i"] for e in request.events] == list(range(10))
    assert request.events[3].time == pytest.approx(T0 + 3e-9)


def test_packed_forward_as_str32_with_non_utf8_bytes_fluentd_style() -> None:
    records = [{"message": "héllo wörld", "n": i, "bin": b"\xff\x00"} for i in range(3)]
    blob = entries_blob(*([event_time(T0, 1), r] for r in records))
    with pytest.raises(UnicodeDecodeError):
        blob.decode("utf-8")  # the trap this mode sets for strict decoders
    request = decode_one(fluentd_packed("app", blob, {"size": 3, "compressed": "text"}))
    assert request.mode == "packed"
    assert [e.data for e in request.events] == records
    assert type(request.events[0].data["message"]) is str


@pytest.mark.parametrize("members", [1, 2, 3])
def test_compressed_packed_forward_multi_member(members: int) -> None:
    entries = [[T0, {"i": i}] for i in range(30)]
    per = len(entries) // members
    blob = b"".join(
        gzip.compress(entries_blob(*entries[i * per : (i + 1) * per])) for i in range(members)
    )
    request = decode_one(packb(["app", blob, {"compressed": "gzip", "chunk": "z"}]))
    assert request.mode == "compressed"
    assert [e.data["i"] for e in request.events] == list(range(30))
    assert request.chunk == "z"


def test_unknown_compression_is_rejected() -> None:
    blob = entries_blob([T0, {}])
    with pytest.raises(ForwardError, match="unsupported compression"):
        decode_one(packb(["app", blob, {"compressed": "zstd"}]))


@pytest.mark.parametrize(
    "blob",
    [
        gzip.compress(entries_blob([T0, {}]))[:-5],  # truncated member
        gzip.compress(entries_blob([T0, {}])) + b"junk",  # trailing non-gzip bytes
        b"\x1f\x8b not really gzip",
    ],
)
def test_broken_gzip_is_a_protocol_error(blob: bytes) -> None:
    with pytest.raises(ForwardError, match="gzip"):
        decode_one(packb(["app", blob, {"compressed": "gzip"}]))


def test_decompression_bomb_is_capped_without_allocating_the_output() -> None:
    cap = 1 << 20
    bomb = gzip.compress(b"\x00" * (64 << 20), compresslevel=9)  # ~64 KiB on the wire
    wire = packb(["app", bomb, {"compressed": "gzip"}])
    conn = ForwardConnection(max_decompressed_bytes=cap)
    conn.receive_data(wire)
    tracemalloc.start()
    try:
        with pytest.raises(RequestTooLarge, match="decompressed"):
            conn.next_request()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * cap


def test_decompressed_size_exactly_at_cap_is_accepted() -> None:
    blob = entries_blob(*([T0, {"i": i}] for i in range(100)))
    wire = packb(["app", gzip.compress(blob), {"compressed": "gzip"}])
    assert len(decode_one(wire, max_decompressed_bytes=len(blob)).events) == 100
    with pytest.raises(RequestTooLarge):
        decode_one(wire, max_decompressed_bytes=len(blob) - 1)


@pytest.mark.parametrize(
    "blob",
    [
        entries_blob([T0, {}])[:-1],  # entry cut short
        b"\xc1",  # never-used msgpack byte
    ],
)
def test_malformed_packed_stream_fails_the_request(blob: bytes) -> None:
    with pytest.raises(ForwardError, match="packed entries"):
        decode_one(packb(["app", blob]))


# --- 7. Stream handling ----------------------------------------------------------------------


def mixed_parts() -> list[tuple[bytes, tuple[str, list[Any]] | None]]:
    blob = entries_blob([event_time(T0, 7), {"p": 1}], [[T0, {"m": 1}], {"p": 2}])
    parts = [
        (packb(["a", T0, {"m": 1}]), ("a", [{"m": 1}])),
        (b"\xc0", None),
        (
            packb(["b", [[T0, {"f": 1}], [T0, {"f": 2}]], {"chunk": "c\n"}]),
            ("b", [{"f": 1}, {"f": 2}]),
        ),
        (fluentd_packed("c", blob, {"compressed": "text"}), ("c", [{"p": 1}, {"p": 2}])),
        (
            packb(["d", gzip.compress(blob) + gzip.compress(blob), {"compressed": "gzip"}]),
            ("d", [{"p": 1}, {"p": 2}] * 2),
        ),
        (b"\xc0\xc0", None),
    ]
    return parts


def mixed_stream() -> tuple[bytes, list[tuple[str, list[Any]]]]:
    parts = mixed_parts()
    return b"".join(p for p, _ in parts), [e for _, e in parts if e is not None]


def summary(requests: list[ForwardRequest]) -> list[tuple[str, list[Any]]]:
    return [(r.tag, [e.data for e in r.events]) for r in requests]


def test_several_requests_in_one_feed() -> None:
    wire, expected = mixed_stream()
    assert summary(decode_all(wire)) == expected


def test_every_split_point() -> None:
    wire, expected = mixed_stream()
    for cut in range(len(wire) + 1):
        conn = ForwardConnection()
        got = []
        for piece in (wire[:cut], wire[cut:]):
            conn.receive_data(memoryview(piece))
            got.extend(conn)
        assert summary(got) == expected, cut
        assert not conn.in_request


def test_byte_at_a_time_and_in_request_tracks_boundaries() -> None:
    wire, expected = mixed_stream()
    boundaries = {len(wire) - 1}  # between the two trailing nil heartbeats
    offset = 0
    for part, _ in mixed_parts():
        offset += len(part)
        boundaries.add(offset)
    conn = ForwardConnection()
    got = []
    for i in range(len(wire)):
        conn.receive_data(wire[i : i + 1])
        got.extend(conn)
        assert conn.in_request == ((i + 1) not in boundaries), i
    assert summary(got) == expected


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_chunking(data: st.DataObject) -> None:
    wire, expected = mixed_stream()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    conn = ForwardConnection()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        conn.receive_data(wire[start:end])
        got.extend(conn)
    assert summary(got) == expected


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.floats(allow_nan=False),
)
records = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        json_scalars,
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
        max_leaves=10,
    ),
    max_size=6,
)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        # From 5 s: an EventTime in the first 4.3 s of 1970 reads as int seconds (forward.py).
        st.tuples(st.integers(5, 2**32 - 1), st.integers(0, 999_999_999), records),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(["message", "forward", "packed_bin", "packed_str32", "gzip"]),
)
def test_records_round_trip_in_every_mode(events: list[tuple[int, int, dict]], mode: str) -> None:
    wire_entries = [[event_time(s, ns), rec] for s, ns, rec in events]
    if mode == "message":
        wire = b"".join(packb(["t", t, rec]) for t, rec in wire_entries)
    elif mode == "forward":
        wire = packb(["t", wire_entries])
    elif mode == "packed_bin":
        wire = packb(["t", entries_blob(*wire_entries)])
    elif mode == "packed_str32":
        wire = fluentd_packed("t", entries_blob(*wire_entries), {"compressed": "text"})
    else:
        wire = packb(["t", gzip.compress(entries_blob(*wire_entries)), {"compressed": "gzip"}])
    got = [e for r in decode_all(wire) for e in r.events]
    assert [e.data for e in got] == [rec for _, _, rec in events]
    assert [e.time for e in got] == [(s * 10**9 + ns) / 10**9 for s, ns, _ in events]
    assert [e.time_ns for e in got] == [s * 10**9 + ns for s, ns, _ in events]


# --- 8. Heartbeats and malformed input -------------------------------------------------------


def test_nil_heartbeats_are_skipped() -> None:
    conn = ForwardConnection()
    conn.receive_data(b"\xc0\xc0")
    assert conn.next_request() is None
    assert not conn.in_request


def test_connect_then_close_is_clean() -> None:
    conn = ForwardConnection()
    assert conn.next_request() is None
    assert not conn.in_request
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"\xc1", "malformed msgpack"),  # garbage byte
        (b"\x2a", "not an array"),  # bare int: framing was lost
        (packb({"tag": "x"}), "not an array"),
        (packb(["tag"]), "1 elements"),
        (packb(["tag", T0, {}, {}, {}]), "5 elements"),
        (packb([1, T0, {}]), "tag must be a string, got an integer"),
        (packb(["tag", T0]), "no record"),
        (packb(["tag", [], {}, {}]), "4 elements"),
        (packb(["tag", T0, {}, "opt"]), "option is a str"),
        (packb(["tag", T0, {}, {"chunk": 5}]), "chunk option"),
    ],
)
def test_malformed_requests_raise_protocol_error(wire: bytes, match: str) -> None:
    conn = ForwardConnection()
    conn.receive_data(packb(["ok", T0, {}]) + wire + packb(["after", T0, {}]))
    assert conn.next_request().tag == "ok"  # type: ignore[union-attr]
    with pytest.raises(ForwardError, match=match) as excinfo:
        conn.next_request()
    assert isinstance(excinfo.value, ProtocolError)
    assert isinstance(excinfo.value, ValueError)
    with pytest.raises(ForwardError):  # sticky: the connection must be closed
        conn.next_request()
    conn.receive_data(b"more")  # ignored, never raises


# --- Size limits -----------------------------------------------------------------------------


def test_request_exactly_at_limit_is_accepted() -> None:
    wire = packb(["tag", T0, {"pad": "x" * 100}])
    assert decode_one(wire, max_request_bytes=len(wire)).events[0].data["pad"] == "x" * 100


@pytest.mark.parametrize("step", [1, 7, 64, 10_000])
def test_oversized_request_fails_early(step: int) -> None:
    limit = 1000
    wire = packb(["tag", [[T0, {"i": i}] for i in range(500)]])  # many small objects
    conn = ForwardConnection(max_request_bytes=limit)
    with pytest.raises(RequestTooLarge) as excinfo:
        for i in range(0, len(wire), step):
            conn.receive_data(wire[i : i + step])
            assert conn.next_request() is None
            assert i < limit + step  # failed as soon as the prefix crossed the limit
    assert isinstance(excinfo.value, FrameTooLarge)
    assert excinfo.value.code == "frame_too_large"


def test_oversized_single_string_is_rejected() -> None:
    wire = packb(["tag", T0, {"big": "x" * 5000}])
    with pytest.raises(RequestTooLarge):
        decode_one(wire, max_request_bytes=1000)
    conn = ForwardConnection(max_request_bytes=1000)
    conn.receive_data(b"\x93\xa3tag\x00\x81\xa1k\xdb\xff\xff\xff\xff")  # claims 4 GiB
    assert conn.next_request() is None and conn.in_request
    conn.receive_data(b"x" * 1000)
    with pytest.raises(RequestTooLarge):
        conn.next_request()


def test_many_small_requests_in_one_large_feed_are_not_oversized() -> None:
    one = packb(["tag", T0, {"pad": "y" * 50}])
    requests = decode_all(one * 200, max_request_bytes=len(one) + 10)
    assert len(requests) == 200
    assert all(r.size == len(one) for r in requests)


# --- 10. Handshake ---------------------------------------------------------------------------

NONCE = bytes(range(16))
AUTH_SALT = bytes(range(16, 32))
SALT = "0123456789abcdef0123456789abcdef"
PING_DIGEST = (
    "c04595ac2136aee29622265d29f517a8f5ac08375f131395a0d0e89d5494bd30"
    "60d2d4f48f757b6caa3bab42127669cf6d775250a56a076ad55920925500a35f"
)
PONG_DIGEST = (
    "84f113ff067cc7c078417277349c6e49a4c889eabad5ef2c82b364c62f27b9ef"
    "e6889ec4d4430509b6b8006d44042d3dd95873fc519269ad6928003ddd1daeb1"
)
PASSWORD_DIGEST = (
    "30ba189083890f86a0f1c763335d41db45565f83c1ccc40cb117adc1677e2597"
    "a24b01d07b410f4f969fcbdbae7dffa606a9a8e02d34f126658def33403a6248"
)
HELO_VECTOR = bytes.fromhex(
    "92a448454c4f83a56e6f6e6365c410"
    + NONCE.hex()
    + "a461757468c410"
    + AUTH_SALT.hex()
    + "a96b656570616c697665c3"
)


def make_handshake(users: dict[str, str] | None = {"user": "pass"}) -> ForwardHandshake:  # noqa: B006
    return ForwardHandshake(
        "secret", hostname="server.example.com", users=users, nonce=NONCE, auth_salt=AUTH_SALT
    )


def ping(digest: str = PING_DIGEST, user: str = "user", password: str = PASSWORD_DIGEST) -> bytes:
    return packb(["PING", "client.example.com", SALT, digest, user, password])


def test_helo_matches_worked_vector_and_is_sent_first() -> None:
    conn = ForwardConnection(handshake=make_handshake())
    assert conn.data_to_send() == HELO_VECTOR
    assert conn.data_to_send() == b""
    assert not conn.authenticated


def test_helo_without_user_auth_has_empty_auth_salt() -> None:
    helo = msgpack.unpackb(make_handshake(users=None).helo_bytes())
    assert helo == ["HELO", {"nonce": NONCE, "auth": b"", "keepalive": True}]


def test_good_ping_gets_pong_with_server_digest_then_requests_flow() -> None:
    conn = ForwardConnection(handshake=make_handshake())
    conn.data_to_send()
    conn.receive_data(ping() + packb(["tag", T0, {"a": 1}, {"chunk": "k"}]))
    request = conn.next_request()
    assert request is not None and request.chunk == "k"
    assert msgpack.unpackb(conn.data_to_send()) == [
        "PONG",
        True,
        "",
        "server.example.com",
        PONG_DIGEST,
    ]
    assert conn.authenticated


def test_handshake_split_at_every_byte() -> None:
    wire = ping() + packb(["tag", T0, {}])
    for cut in range(len(wire) + 1):
        conn = ForwardConnection(handshake=make_handshake())
        got = []
        for piece in (wire[:cut], wire[cut:]):
            conn.receive_data(piece)
            got.extend(conn)
        assert [r.tag for r in got] == ["tag"]


@pytest.mark.parametrize(
    ("ping_bytes", "reason"),
    [
        (ping(digest="0" * 128), "shared_key mismatch"),
        (ping(digest=PING_DIGEST.upper()), "shared_key mismatch"),
        (ping(password="0" * 128), "username/password mismatch"),
        (ping(user="nobody"), "username/password mismatch"),
        (packb(["PING", "client.example.com", SALT, PING_DIGEST, "user"]), "invalid ping message"),
        (packb(["tag", T0, {"sneaky": True}]), "invalid ping message"),  # request before auth
        (packb(["PING", 1, SALT, PING_DIGEST, "user", PASSWORD_DIGEST]), "invalid ping message"),
    ],
)
def test_failed_ping_gets_pong_false_and_no_request(ping_bytes: bytes, reason: str) -> None:
    conn = ForwardConnection(handshake=make_handshake())
    conn.data_to_send()
    conn.receive_data(ping_bytes + packb(["tag", T0, {}]))
    with pytest.raises(HandshakeFailed, match=reason) as excinfo:
        conn.next_request()
    assert excinfo.value.code == "auth_failed"
    assert msgpack.unpackb(conn.data_to_send()) == ["PONG", False, reason, "", ""]
    with pytest.raises(HandshakeFailed):
        conn.next_request()
    assert not conn.authenticated


def test_user_auth_off_ignores_username_and_password() -> None:
    handshake = make_handshake(users=None)
    pong = msgpack.unpackb(handshake.verify_ping(msgpack.unpackb(ping(user="", password=""))))
    assert pong == ["PONG", True, "", "server.example.com", PONG_DIGEST]
    assert handshake.authenticated and not handshake.failed


def test_ping_with_binary_str_salt_fluent_bit_style() -> None:
    import hashlib

    salt = bytes(range(0xF0, 0x100))  # 16 random-looking bytes, invalid UTF-8
    digest = hashlib.sha512(salt + b"fb-client" + NONCE + b"secret").hexdigest()
    wire = b"\x96" + packb("PING") + packb("fb-client") + bytes([0xA0 | len(salt)]) + salt
    wire += packb(digest) + packb("") + packb("")
    conn = ForwardConnection(handshake=make_handshake(users=None))
    conn.data_to_send()
    conn.receive_data(wire)
    assert conn.next_request() is None
    pong = msgpack.unpackb(conn.data_to_send())
    assert pong[:3] == ["PONG", True, ""]
    assert pong[4] == hashlib.sha512(salt + b"server.example.com" + NONCE + b"secret").hexdigest()


def test_nil_heartbeat_before_ping_is_ignored() -> None:
    conn = ForwardConnection(handshake=make_handshake())
    conn.receive_data(b"\xc0" + ping())
    assert conn.next_request() is None
    assert conn.authenticated


# --- 13. fluent-logger interop (byte level) --------------------------------------------------


def capture_fluent_logger(tmp_path: Path, emit: Any, **kwargs: Any) -> bytes:
    """Run a real FluentSender against a Unix socket and return the bytes it wrote."""
    path = str(tmp_path / "fluent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    try:
        logger = sender.FluentSender("app", host=f"unix://{path}", **kwargs)
        emit(logger)
        logger.close()
        conn, _ = server.accept()
        with conn:
            chunks = []
            while data := conn.recv(65536):
                chunks.append(data)
        return b"".join(chunks)
    finally:
        server.close()


def test_fluent_logger_int_float_and_event_time(tmp_path: Path) -> None:
    def emit(logger: sender.FluentSender) -> None:
        assert logger.emit_with_time("follow", T0, {"a": 1})
        assert logger.emit_with_time("x", T0 + 0.5, {"k": "v"})  # float64 on the wire
        assert logger.emit_with_time("ns", sender.EventTime(T0, 123456789), {"k": "ns"})
        assert logger.emit("now", {"from": "userA"})

    wire = capture_fluent_logger(tmp_path, emit)
    assert wire.startswith(
        bytes.fromhex("93aa") + b"app.follow" + bytes.fromhex("ce55ece6f881a16101")
    )
    requests = decode_all(wire)
    assert [r.tag for r in requests] == ["app.follow", "app.x", "app.ns", "app.now"]
    assert [r.events[0].time for r in requests[:3]] == [T0, T0 + 0.5, T0 + 0.123456789]
    assert [r.chunk for r in requests] == [None] * 4
    assert requests[3].events[0].data == {"from": "userA"}


def test_fluent_logger_nanosecond_precision(tmp_path: Path) -> None:
    wire = capture_fluent_logger(
        tmp_path,
        lambda s: s.emit_with_time("x", T0 + 0.5, {"k": "v"}),
        nanosecond_precision=True,
    )
    assert wire == bytes.fromhex("93a5") + b"app.x" + bytes.fromhex(
        "d70055ece6f81dcd650081a16ba176"
    )
    assert simple(decode_one(wire)) == [(T0 + 0.5, {"k": "v"}, {})]


def test_fluent_logger_packing_in_forward_and_packed_modes() -> None:
    # fluent-logger only speaks Message mode; reuse its EventTime and packb for batches.
    times = [sender.EventTime.from_unix_nano(T0 * 10**9 + i) for i in range(3)]
    entries = [msgpack.packb((t, {"i": i})) for i, t in enumerate(times)]
    wire = msgpack.packb(("app", b"".join(entries), {"size": 3}))
    assert [e.data["i"] for e in decode_one(wire).events] == [0, 1, 2]


# --- Object model ----------------------------------------------------------------------------


def test_events_and_requests_are_slotted() -> None:
    request = decode_one(packb(["tag", T0, {"a": 1}]))
    for obj in (request, request.events[0]):
        assert not hasattr(obj, "__dict__")
    (event,) = request.events
    assert type(event) is ForwardEvent
    assert (event.type, event.data, event.time, event.meta) == (
        "tag", {"a": 1}, T0, {"protocol": "forward"})
    assert "ForwardEvent(type='tag'" in repr(event) and "tag" in repr(request)


# --- The server's bulk read ------------------------------------------------------------------


def test_requests_merges_runs_of_plain_messages_and_keeps_everything_else_apart() -> None:
    wire = b"".join([
        packb(["a", T0, {"i": 0}]), packb(["a", 0, {"i": 1}]),       # merged
        packb(["b", T0, {"i": 1.5}]),                                # another tag: apart
        packb(["f", [[T0, {"i": 2}]], {"chunk": "c1"}]),            # Forward mode, acked
        packb(["c", T0, {"i": 3}]),                                   # a new run
        packb(["d", T0, {"i": 4}, {"chunk": "c2"}]),                 # has options: alone
        packb(["e", T0 + 0.5, {"i": 5}]), packb(None), packb(["e", T0, "bad"]),
    ])
    conn = ForwardConnection()
    conn.receive_data(wire)
    requests = conn.requests()
    assert [(r.tag, r.mode, r.chunk, r.count, r.skipped) for r in requests] == [
        ("a", "message", None, 2, 0), ("b", "message", None, 1, 0), ("f", "forward", "c1", 1, 0),
        ("c", "message", None, 1, 0), ("d", "message", "c2", 1, 0),
        ("e", "message", None, 1, 0), ("e", "message", None, 1, 1)]
    events = [e for r in requests for e in r.events]
    assert [(e.type, e.data["i"], e.time) for e in events] == [
        ("a", 0, T0), ("a", 1, NOW), ("b", 1.5, T0), ("f", 2, T0), ("c", 3, T0), ("d", 4, T0),
        ("e", 5, T0 + 0.5)]
    assert all(e.meta == {"protocol": "forward"} for e in events)
    assert requests[0].size == len(packb(["a", T0, {"i": 0}])) + len(packb(["a", 0, {"i": 1}]))
    assert conn.requests() == [] and not conn.in_request


def test_requests_stop_at_max_events_and_go_on_from_there() -> None:
    conn = ForwardConnection()
    conn.receive_data(b"".join(packb(["t", T0, {"i": i}]) for i in range(5))
                      + packb(["t", [[T0, {"i": i}] for i in range(5, 9)]]))
    slices = []
    while requests := conn.requests(max_events=3):
        slices.append([e.data["i"] for r in requests for e in r.events])
    assert slices == [[0, 1, 2], [3, 4, 5, 6, 7, 8]]  # the limit is overshot by one request


def test_requests_before_a_malformed_one_are_returned_then_the_error() -> None:
    conn = ForwardConnection()
    conn.receive_data(packb(["t", T0, {"i": 0}]) + packb(["t", [[T0, {"i": 1}]], {"chunk": "c"}])
                      + packb("not a request") + packb(["t", T0, {"i": 2}]))
    assert [r.chunk for r in conn.requests()] == [None, "c"]
    for _ in range(2):
        with pytest.raises(ForwardError, match="not an array"):
            conn.requests()


@pytest.mark.parametrize("size", [None, 3, 2, 4, 0, -1, "3", 10**9])
def test_packed_size_option_is_only_a_hint(size: Any) -> None:
    """The fast path taken with a right ``size`` decodes exactly like the stream; a wrong one
    changes nothing."""
    blob = entries_blob([T0, {"i": 0}], [[T0 + 1, {"m": 1}], {"i": 1}], [T0 + 2, {"i": 2}])
    options = {} if size is None else {"size": size}
    request = decode_one(packb(["tag", blob, options]))
    assert simple(request) == [(T0, {"i": 0}, {}), (T0 + 1, {"i": 1}, {"m": 1}),
                               (T0 + 2, {"i": 2}, {})]
    for bad in (blob[:-1], blob + b"\xc1"):  # truncated, trailing garbage: the same errors
        with pytest.raises(ForwardError):
            decode_one(packb(["tag", bad, options]))


def test_a_request_of_mostly_invalid_entries_fails_fast() -> None:
    """64 KB of gzip inflates to 64 MiB of one-byte non-entries: fail, do not skip them all."""
    bomb = gzip.compress(b"\x00" * (1 << 20))
    with pytest.raises(ForwardError, match="more than 1000 invalid entries"):
        decode_one(packb(["tag", bomb, {"compressed": "gzip"}]))
    few = entries_blob(*([0, "not a map"] for _ in range(forward.MAX_INVALID_ENTRIES)))
    request = decode_one(packb(["tag", few + entries_blob([T0, {"ok": 1}])]))
    assert request.skipped == forward.MAX_INVALID_ENTRIES and len(request.events) == 1
