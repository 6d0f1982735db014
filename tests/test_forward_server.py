"""The Forward listener end to end: real ``evserver serve`` processes, real fluent-logger.

``tests/apps/forward_app.py`` appends every event it processes to ``FORWARD_RECORD`` (JSON
lines) before the event is acked, so each test compares what its handlers saw with what was
sent. Acks are checked byte for byte on raw sockets: fluent-logger 0.11.1 has no
``require_ack_response`` (only the Fluentd and Fluent Bit senders ask for acks).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import socket
import struct
import time
import urllib.request
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from click.testing import CliRunner
from conftest import APPS, ServerFactory, ServerProcess, free_port
from fluent import asyncsender, handler, sender
from rawpeer import RawPeer

from evserver import Client
from evserver import protocol as p
from evserver.cli import main
from evserver.dispatch import Job
from evserver.event import TYPE_RULE, Event
from evserver.forward import ForwardConnection as ForwardDecoder
from evserver.forward import ack_bytes
from evserver.forward_session import ForwardProtocol
from evserver.metrics import new_counters
from evserver.plan import Failure

APP = f"{APPS}/forward_app.py:app"
T0 = 1_700_000_000
pytestmark = pytest.mark.timeout(60)


class Forward:
    """A served app with its Forward port, record file and admin URL."""

    def __init__(self, server: ServerProcess, port: int, record: Path, admin: int) -> None:
        self.server = server
        self.address = ("127.0.0.1", port)
        self.record = record
        self.admin = admin

    def events(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def wait_events(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return wait_for(lambda: (e := self.events()) and len(e) >= n and e, timeout,
                        f"{n} recorded events")

    def stats(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin}/stats"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)

    def counters(self) -> dict[str, int]:
        return self.stats()["totals"]["counters"]

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)  # a poll interval, not a wait for something to happen
    return value


@pytest.fixture
def forward(server_factory: ServerFactory, tmp_path: Path) -> Iterator[Callable[..., Forward]]:
    def start(*args: str) -> Forward:
        port, admin = free_port(), free_port()
        record = tmp_path / f"record-{port}.jsonl"
        server = server_factory(APP, "--forward-enabled", "--forward-port", str(port),
                                "--admin-port", str(admin), *args,
                                env={"FORWARD_RECORD": str(record)})
        return Forward(server, port, record, admin)

    yield start


_READERS: weakref.WeakKeyDictionary[socket.socket, tuple[msgpack.Unpacker, list[Any]]] = (
    weakref.WeakKeyDictionary())


def read_msgs(sock: socket.socket, n: int) -> list[Any]:
    """Read exactly ``n`` msgpack values (bin stays bytes, str stays str); values that
    arrived in the same read as the last of them wait for the next call on that socket."""
    unpacker, pending = _READERS.setdefault(sock, (msgpack.Unpacker(raw=False), []))
    while len(pending) < n:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"EOF after {len(pending)} of {n} messages")
        unpacker.feed(data)
        pending.extend(unpacker)
    out, pending[:] = pending[:n], pending[n:]
    return out


def recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF (the test's socket timeout bounds it)."""
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def fwd(tag: str, entries: list[Any], **options: Any) -> bytes:
    return msgpack.packb([tag, entries, options] if options else [tag, entries])


# --------------------------------------------------------------------------- fluent-logger


def test_fluent_logger_sender_asyncsender_and_handler(forward: Callable[..., Forward]) -> None:
    f = forward()
    host, port = f.address
    plain = sender.FluentSender("app", host=host, port=port)
    assert plain.emit("int", {"n": 1})
    assert plain.emit_with_time("at", T0, {"n": 2})
    assert plain.emit_with_time("at.ns", sender.EventTime(T0 + 0.123456789), {"n": 3})
    plain.close()
    nano = sender.FluentSender("app", host=host, port=port, nanosecond_precision=True)
    assert nano.emit_with_time("float", T0 + 0.25, {"n": 4})  # float -> EventTime
    nano.close()
    background = asyncsender.FluentSender("async", host=host, port=port)
    for i in range(5):
        background.emit("ev", {"i": i})
    background.close()  # flushes the queue, then joins the sending thread
    logger = logging.getLogger("test_forward.handler")
    log_handler = handler.FluentHandler("app.log", host=host, port=port)
    log_handler.setFormatter(handler.FluentRecordFormatter())
    logger.addHandler(log_handler)
    try:
        logger.warning({"message": "hello", "user": "ann"})
    finally:
        logger.removeHandler(log_handler)
        log_handler.close()

    events = f.wait_events(10)
    by_type = Counter(e["type"] for e in events)
    assert by_type == {"app.int": 1, "app.at": 1, "app.at.ns": 1, "app.float": 1,
                       "async.ev": 5, "app.log": 1}
    one = {e["type"]: e for e in events}
    assert one["app.at"]["data"] == {"n": 2} and one["app.at"]["time"] == T0
    assert abs(one["app.at.ns"]["time"] - (T0 + 0.123456789)) < 1e-6
    assert one["app.float"]["time"] == T0 + 0.25
    assert abs(one["app.int"]["time"] - time.time()) < 60
    assert [e["data"]["i"] for e in events if e["type"] == "async.ev"] == list(range(5))
    assert one["app.log"]["data"]["message"] == "hello"
    assert one["app.log"]["data"]["user"] == "ann"
    assert one["app.log"]["data"]["sys_name"] == "test_forward.handler"
    assert all(e["meta"] == {"protocol": "forward"} for e in events)
    counters = f.counters()
    assert counters["forward_events"] == 10 and counters["forward_requests"] == 10


# --------------------------------------------------------------------------- acks


def test_acks_are_byte_identical_and_in_request_order(forward: Callable[..., Forward]) -> None:
    f = forward()
    packed = b"".join(msgpack.packb([T0 + i, {"p": i}]) for i in range(3))
    requests = [
        (msgpack.packb(["m", T0, {"k": 1}, {"chunk": "c1=="}]), ack_bytes("c1==")),
        (fwd("f", [[T0, {"k": 2}], [[T0 + 1, {"trace": "x"}], {"k": 3}]], chunk="c2=="),
         ack_bytes("c2==")),
        (fwd("none", [[T0, {"k": 4}]]), b""),  # no chunk: no ack
        (msgpack.packb(["pk", packed, {"chunk": b"\x00bin\xff"}], use_bin_type=True),
         ack_bytes(b"\x00bin\xff")),
        (msgpack.packb(["gz", gzip.compress(packed), {"chunk": "c4", "compressed": "gzip"}]),
         ack_bytes("c4")),
        (msgpack.packb(["listened.x", [[T0, {"k": 5}]], {"chunk": "c5"}]), ack_bytes("c5")),
    ]
    expected = b"".join(ack for _, ack in requests)
    with f.connect() as sock:
        sock.sendall(b"".join(wire for wire, _ in requests))  # pipelined in one write
        got = b""
        while len(got) < len(expected):
            data = sock.recv(65536)
            assert data, f"EOF after {got!r}"
            got += data
    assert got == expected
    assert expected == (b"\x81\xa3ack\xa4c1==" + b"\x81\xa3ack\xa4c2==" + b"\x81\xa3ack\xc4\x05"
                        b"\x00bin\xff" + b"\x81\xa3ack\xa2c4" + b"\x81\xa3ack\xa2c5")
    events = f.wait_events(11)
    assert [e["type"] for e in events].count("pk") == 3 and len(events) == 11
    meta = [e["meta"] for e in events if e["type"] == "f"]
    assert meta == [{"protocol": "forward"}, {"trace": "x", "protocol": "forward"}]
    assert {e["time"] for e in events if e["type"] == "gz"} == {T0, T0 + 1, T0 + 2}


def test_invalid_event_is_skipped_and_request_still_acked(forward: Callable[..., Forward]) -> None:
    f = forward()
    with f.connect() as sock:
        sock.sendall(fwd("mixed", [[T0, {"ok": 1}], [T0, "not a map"], ["x", {}], [T0, {"ok": 2}]],
                         chunk="mix"))
        assert read_msgs(sock, 1) == [{"ack": "mix"}]
    assert [e["data"] for e in f.wait_events(2)] == [{"ok": 1}, {"ok": 2}]
    assert f.counters()["forward_skipped"] == 2


def test_failed_request_is_not_acked_and_the_connection_closes(
    forward: Callable[..., Forward],
) -> None:
    f = forward()
    with f.connect() as sock:
        sock.sendall(fwd("ok", [[T0, {}]], chunk="a") + fwd("fail.x", [[T0, {}]], chunk="b")
                     + fwd("ok", [[T0, {}]], chunk="c"))
        assert recv_all(sock) == ack_bytes("a")  # "b" failed: no ack for it or after it
    assert "closing without its ack" in f.server.log()
    assert f.counters()["forward_unacked"] == 1


def test_unit_acks_wait_for_earlier_requests_and_stop_at_a_failure() -> None:
    """Jobs of one connection may finish out of order; acks must not (sans-I/O)."""
    counters = new_counters("forward")
    proto = ForwardProtocol(ForwardDecoder(), counters=counters, job_events=64)
    proto.chunks = {1: "a", 2: "b", 3: "c", 4: "d"}
    events = {n: Event("t", n) for n in (1, 2, 3, 4)}

    def job(*numbers: int) -> Job:
        return Job(proto, [events[n] for n in numbers], context=[(n, 1) for n in numbers])

    assert proto.job_done(job(2)) == (b"", None)
    assert proto.job_done(job(1)) == (ack_bytes("a") + ack_bytes("b"), None)
    failed = job(3, 4)
    failed.failures[id(failed.events[0])] = Failure("handler_error", "RuntimeError", "boom")
    assert proto.job_done(failed) == (b"", "request failed")  # no ack for 4 either: closing
    assert not proto.chunks and counters["forward_unacked"] == 1


# --------------------------------------------------------------------------- handshake


def ping(sock: socket.socket, key: str, *, user: str = "", password: str = "",
         then: bytes = b"") -> Any:
    """Answer the server's HELO like Fluentd's out_forward (``then`` pipelined behind the
    PING in the same write); return the PONG."""
    (helo,) = read_msgs(sock, 1)
    assert helo[0] == "HELO" and helo[1]["keepalive"] is True
    nonce, auth = helo[1]["nonce"], helo[1]["auth"]
    salt, hostname = os.urandom(8).hex(), "client.example"
    digest = hashlib.sha512(salt.encode() + hostname.encode() + nonce + key.encode()).hexdigest()
    pw = hashlib.sha512(auth + user.encode() + password.encode()).hexdigest() if user else ""
    sock.sendall(msgpack.packb(["PING", hostname, salt, digest, user, pw]) + then)
    (pong,) = read_msgs(sock, 1)
    return pong


def test_requests_pipelined_behind_the_ping_are_acked_after_the_pong_in_order(
    forward: Callable[..., Forward],
) -> None:
    """More requests than one job holds, acked and fire-and-forget interleaved, in one write:
    the reader runs them a job at a time, yet the PONG still goes out first."""
    f = forward("--forward-shared-key", "s3cret")
    wire = b"".join(msgpack.packb(["t", T0, {"i": i}, {"chunk": f"c{i}"}] if i % 2 else
                                  ["t", T0, {"i": i}]) for i in range(300))
    with f.connect() as sock:
        assert ping(sock, "s3cret", then=wire)[:2] == ["PONG", True]
        assert read_msgs(sock, 150) == [{"ack": f"c{i}"} for i in range(1, 300, 2)]
    assert [e["data"]["i"] for e in f.wait_events(300)] == list(range(300))


def test_handshake_ok_then_bad_digest_gets_pong_false_and_eof(
    forward: Callable[..., Forward],
) -> None:
    f = forward("--forward-shared-key", "s3cret", "--forward-users", "ann:pw1")
    with f.connect() as sock:
        pong = ping(sock, "s3cret", user="ann", password="pw1")
        assert pong[:3] == ["PONG", True, ""] and len(pong[4]) == 128
        sock.sendall(fwd("authed", [[T0, {"x": 1}]], chunk="ok"))
        assert read_msgs(sock, 1) == [{"ack": "ok"}]
    for key, user, password, reason in (("wrong", "ann", "pw1", "shared_key mismatch"),
                                        ("s3cret", "ann", "nope", "username/password mismatch")):
        with f.connect() as sock:
            assert ping(sock, key, user=user, password=password) == [
                "PONG", False, reason, "", ""]
            assert recv_all(sock) == b""
    with f.connect() as sock:  # requests before the PING are not served
        read_msgs(sock, 1)
        sock.sendall(fwd("sneaky", [[T0, {}]], chunk="no"))
        assert read_msgs(sock, 1) == [["PONG", False, "invalid ping message", "", ""]]
        assert recv_all(sock) == b""
    assert [e["type"] for e in f.wait_events(1)] == ["authed"]
    assert f.counters()["forward_auth_failures"] == 3


# --------------------------------------------------------------------------- robustness


def test_garbage_closes_only_that_connection(forward: Callable[..., Forward]) -> None:
    f = forward("--forward-max-request-bytes", "4096")
    with f.connect() as good, f.connect() as bad, f.connect() as big, f.connect() as empty:
        good.sendall(fwd("before", [[T0, {}]], chunk="1"))
        assert read_msgs(good, 1) == [{"ack": "1"}]
        empty.close()  # connect-then-close: nothing to log
        bad.sendall(fwd("served", [[T0, {}]], chunk="s") + b"\xc1 not msgpack")
        assert recv_all(bad) == ack_bytes("s")  # the valid request before it still counts
        big.sendall(fwd("big", [[T0, {"pad": "x" * 8192}]], chunk="2"))
        assert recv_all(big) == b""
        good.sendall(fwd("after", [[T0, {}]], chunk="3"))
        assert read_msgs(good, 1) == [{"ack": "3"}]
    assert [e["type"] for e in f.wait_events(3)] == ["before", "served", "after"]
    counters = wait_for(lambda: (c := f.counters())["forward_connections"] == 4 and c, 10,
                        "all connections counted")
    assert counters["forward_errors"] == 2
    lines = [line for line in f.server.log().splitlines() if "Forward" in line]
    closing = [line for line in lines if "closing connection" in line]
    assert len(closing) == 2, lines
    assert any("exceeds max_request_bytes (4096)" in line for line in closing), closing
    assert len(lines) == 3, lines  # the startup line and the two closes; no empty-close noise


def test_udp_heartbeat_echo(forward: Callable[..., Forward]) -> None:
    f = forward()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(b"\x00", f.address)
        assert udp.recvfrom(16) == (b"\x00", f.address)
    with f.connect() as sock:  # a nil heartbeat on TCP is ignored
        sock.sendall(b"\xc0" + fwd("after.nil", [[T0, {}]], chunk="n"))
        assert read_msgs(sock, 1) == [{"ack": "n"}]


# --------------------------------------------------------------------------- load


def test_packed_forward_load_with_acks_on_two_workers(forward: Callable[..., Forward]) -> None:
    """100k events, 100 PackedForward requests with chunks over 8 connections to 2 workers:
    every acked event was processed exactly once."""
    f = forward("--workers", "2")
    wait_for(lambda: len(f.stats()["workers"]) == 2, 20, "both workers serving")
    conns, per_conn, per_request = 8, 25, 500
    started = time.monotonic()
    socks = [f.connect() for _ in range(conns)]
    for c, sock in enumerate(socks):
        wire = []
        for r in range(per_conn):
            base = (c * per_conn + r) * per_request
            blob = b"".join(msgpack.packb([T0, {"seq": base + i}]) for i in range(per_request))
            wire.append(msgpack.packb(["load", blob, {"chunk": f"{c}-{r}", "size": per_request}]))
        sock.sendall(b"".join(wire))
    acked = []
    for c, sock in enumerate(socks):
        with sock:
            acks = read_msgs(sock, per_conn)
        assert acks == [{"ack": f"{c}-{r}"} for r in range(per_conn)]
        acked += [(c * per_conn + r) * per_request + i
                  for r in range(per_conn) for i in range(per_request)]
    elapsed = time.monotonic() - started
    seqs = Counter(e["data"]["seq"] for e in f.events())
    assert sorted(seqs) == sorted(acked) and len(acked) == 100_000
    assert set(seqs.values()) == {1}
    pids = Counter(e["pid"] for e in f.events())
    print(f"\n100k Forward events acked in {elapsed:.2f}s ({100_000 / elapsed:,.0f} events/s); "
          f"per worker: {dict(pids)}")
    totals = wait_for(lambda: (c := f.counters()).get("forward_events") == 100_000 and c, 10,
                      "stats from both workers")
    assert totals["forward_requests"] == conns * per_conn


# ------------------------------------------------ EventTime, tags, integer keys (issue 14)


def test_event_time_nanoseconds_reach_the_handler(forward: Callable[..., Forward]) -> None:
    f = forward()
    rng = random.Random(99)
    times = [(T0 + i, rng.randrange(10**9)) for i in range(500)]
    packed = b"".join(msgpack.packb([msgpack.ExtType(0, struct.pack(">II", s, ns)), {"i": i}])
                      for i, (s, ns) in enumerate(times))
    with f.connect() as sock:
        sock.sendall(msgpack.packb(["ns", packed, {"size": len(times), "chunk": "c1"}]))
        assert read_msgs(sock, 1) == [{"ack": "c1"}]
    recorded = sorted(f.wait_events(500), key=lambda e: e["data"]["i"])
    assert [e["time_ns"] for e in recorded] == [s * 10**9 + ns for s, ns in times]


def test_native_and_forward_refuse_the_same_types(server_factory: ServerFactory,
                                                  forward: Callable[..., Forward]) -> None:
    native = server_factory(f"{APPS}/basic.py:app")
    f = forward()
    for bad in ("", "a..b", "*", "order.*", "a b", ".a", "a.", "tab\there"):
        for wire in (p.encode_event(1, [bad, None], request=True),
                     p.encode_batch(0, [["echo", 1], [bad, 2]])):
            peer = RawPeer(native.address)
            peer.send(wire)
            (error,) = peer.recv_frames(1)
            assert error.kind == p.ERROR and error.body[0] == "bad_frame"
            assert error.body[2] == f"event type must be {TYPE_RULE}, got {bad!r}"
            peer.close()
        with f.connect() as sock:
            sock.sendall(msgpack.packb([bad, T0, {"n": 1}, {"chunk": "x"}]))
            assert sock.recv(100) == b""  # closed, not acked
        with Client(*native.address, timeout=5) as client, pytest.raises(ValueError):
            client.send(bad, 1)
    with f.connect() as sock:  # what passes the rule passes on both
        sock.sendall(msgpack.packb(["docker.nginx-1", T0, {"n": 1}, {"chunk": "ok"}]))
        assert read_msgs(sock, 1) == [{"ack": "ok"}]
    with Client(*native.address, timeout=5) as client:
        assert client.request("echo", "docker.nginx-1") == "docker.nginx-1"
    assert [e["type"] for e in f.wait_events(1)] == ["docker.nginx-1"]


def test_integer_record_keys_are_accepted_end_to_end(forward: Callable[..., Forward]) -> None:
    f = forward()
    with f.connect() as sock:
        sock.sendall(msgpack.packb(["ints", T0, {1: "one"}, {"chunk": "a"}]))
        assert read_msgs(sock, 1) == [{"ack": "a"}]
        sock.sendall(msgpack.packb(["ints", T0, {"k": 2}, {"chunk": "b"}]))  # same connection
        assert read_msgs(sock, 1) == [{"ack": "b"}]
    assert [e["data"] for e in f.wait_events(2)] == [{"1": "one"}, {"k": 2}]
    assert f.counters()["forward_errors"] == 0


def test_evserver_stats_shows_the_forward_counters(forward: Callable[..., Forward]) -> None:
    f = forward()
    with f.connect() as sock:
        sock.sendall(fwd("shown", [[T0, {"n": 1}], [T0, {"n": 2}]], chunk="s1"))
        assert read_msgs(sock, 1) == [{"ack": "s1"}]
    f.wait_events(2)
    result = CliRunner().invoke(main, ["stats", "--admin", f"http://127.0.0.1:{f.admin}"])
    assert result.exit_code == 0, result.output
    assert ("forward: connections 1, requests 1, events 2, skipped 0, errors 0, "
            "auth failures 0, unacked 0, heartbeats 0") in result.output
