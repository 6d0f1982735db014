"""The request/reply hot path's shortcuts, probed over real loopback sockets: decoders
shared through the spares, the reused Packer, the inline REQUEST decode, and reads and writes
that try the OS socket before the green one.

Servers run in threads (``serve_in_thread``), two at once where decoders could cross them;
peers are plain blocking sockets that control the exact bytes and their chunking.
"""

from __future__ import annotations

import contextlib
import gc
import random
import socket
import struct
import threading
import time
import tracemalloc
from typing import Any

import msgpack
import pytest

from evserver import App, Client, Event
from evserver import protocol as p
from evserver._eventlet import eventlet
from evserver.auth import client_hello
from evserver.testing import serve_in_thread
from tests.rawpeer import RawPeer

KEY = "review5-shared-key-0123456789"


class Switchy(dict):
    """A reply whose packing yields to the hub mid-way (its ``items`` waits), and fails
    after the wait when its data says so: the Packer is held across a green switch."""

    def items(self) -> Any:
        eventlet.sleep(0.005)
        if self.get("fail"):
            raise RuntimeError("items failed mid-pack")
        return super().items()


def echo_app() -> App:
    app = App()
    app.events = []  # (type, data) of every fire-and-forget or acked event
    app.lock = threading.Lock()

    @app.processor("echo")
    def echo(event: Event) -> Any:
        return event.data

    @app.processor("ev")
    def ev(event: Event) -> None:
        with app.lock:
            app.events.append(event.data)

    @app.processor("nap")
    def nap(event: Event) -> Any:
        eventlet.sleep(event.data[0])
        return event.data

    @app.processor("bad")
    def bad(event: Event) -> Any:
        return {"not": {1, 2, 3}}  # a set has no msgpack form

    @app.processor("switchy")
    def switchy(event: Event) -> Any:
        return Switchy(event.data)

    @app.processor("huge")
    def huge(event: Event) -> Any:
        return b"x" * event.data

    return app


def _value(rng: random.Random, tag: str) -> Any:
    """A random msgpack value that names its sender, sometimes past 4096 bytes."""
    pick = rng.randrange(8)
    if pick == 0:
        return [tag, rng.randrange(-(1 << 63), 1 << 63)]
    if pick == 1:
        return {"tag": tag, "s": "é" * rng.randrange(0, 40), "f": rng.random()}
    if pick == 2:
        return [tag, b"\x00\xff" * rng.randrange(0, 3000)]  # up to ~6 KiB
    if pick == 3:
        return [tag, None, True, False, [], {}]
    if pick == 4:
        return {"tag": tag, "nested": [[[[rng.randrange(100)]]]] * rng.randrange(1, 20)}
    if pick == 5:
        return [tag, "y" * rng.randrange(4000, 9000)]
    return [tag, rng.randrange(1 << 16)]


def _script(rng: random.Random, tag: str, n: int) -> tuple[bytes, dict[int, tuple[int, Any]],
                                                           list[Any]]:
    """``n`` frames of every kind the server reads: their bytes, the answer each corr is owed
    (kind, value) and the data of every event the "ev" processor must see."""
    out: list[bytes] = []
    owed: dict[int, tuple[int, Any]] = {}
    events: list[Any] = []
    for corr in range(1, n + 1):
        kind = rng.choice(["req", "req", "req", "event0", "event", "batch", "batch0", "ping"])
        if kind == "req":
            value = _value(rng, tag)
            out.append(p.encode_event(corr, ["echo", value], request=True))
            owed[corr] = (p.REPLY, value)
        elif kind in ("event0", "event"):
            value = _value(rng, tag)
            c = 0 if kind == "event0" else corr
            out.append(p.encode_event(c, ["ev", value]))
            events.append(value)
            if c:
                owed[c] = (p.ACK, None)
        elif kind in ("batch", "batch0"):
            values = [_value(rng, tag) for _ in range(rng.randrange(1, 6))]
            c = 0 if kind == "batch0" else corr
            out.append(p.encode_batch(c, [["ev", v] for v in values]))
            events.extend(values)
            if c:
                owed[c] = (p.ACK, None)
        else:
            out.append(p.encode_ping(corr))
            owed[corr] = (p.PONG, None)
    return b"".join(out), owed, events


def _send_chunked(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    i = 0
    while i < len(data):
        n = rng.choice([1, 2, 3, 7, 50, 300, 1000, 4095, 4097, 9000, 70000])
        sock.sendall(data[i:i + n])
        i += n
        if rng.random() < 0.05:
            time.sleep(0.001)  # let the server see the partial frame on its own


def _collect(sock: socket.socket, count: int, timeout: float = 60.0) -> list[p.Frame]:
    reader = p.FrameReader(p.CLIENT_RECEIVES)
    frames: list[p.Frame] = []
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while len(frames) < count:
        assert time.monotonic() < deadline, f"{len(frames)} of {count} answers"
        data = sock.recv(65536)
        assert data, f"EOF after {len(frames)} of {count} answers: {frames[-3:]}"
        reader.receive_data(data)
        frames.extend(reader)
    return frames


def _conversation(address: tuple[str, int], seed: int, n: int, errors: list[str],
                  events: list[Any], key: str | None = None) -> None:
    rng = random.Random(seed)
    tag = f"conn-{seed}"
    try:
        sock = socket.create_connection(address, timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = _collect(sock, 1)[0]
        assert hello.kind == p.HELLO
        data, owed, sent_events = _script(rng, tag, n)
        if key is not None:  # the authenticating HELLO, with every frame pipelined behind it
            info, _ = client_hello(key.encode(), None, hello.body["nonce"])
            data = p.encode_hello(info) + data
        sender = threading.Thread(target=_send_chunked, args=(sock, data, rng))
        sender.start()
        answers = _collect(sock, len(owed) + (key is not None))
        if key is not None:
            assert answers[0].kind == p.HELLO, answers[0]
            answers = answers[1:]
        sender.join(30)
        got = {}
        for frame in answers:
            assert frame.corr not in got, f"{tag}: corr {frame.corr} answered twice"
            got[frame.corr] = (frame.kind, frame.body)
        assert set(got) == set(owed), f"{tag}: missing {sorted(set(owed) - set(got))[:5]}"
        for corr, (kind, value) in owed.items():
            assert got[corr][0] == kind, f"{tag} corr {corr}: {got[corr]!r} for {kind}"
            if kind == p.REPLY:
                assert got[corr][1] == value, f"{tag} corr {corr}: wrong reply"
        events.extend(sent_events)
        sock.close()
    except BaseException as exc:  # reported by the test thread
        errors.append(f"{tag}: {type(exc).__name__}: {exc}"[:500])


def _stress(servers: int, conns: int = 16, frames: int = 500, key: str | None = None,
            seed: int = 0) -> None:
    apps = [echo_app() for _ in range(servers)]
    settings = {"security.shared_key": key} if key else None
    with contextlib.ExitStack() as stack:
        running = [stack.enter_context(serve_in_thread(app, park_after=0.05, settings=settings))
                   for app in apps]
        errors: list[str] = []
        sent: list[list[Any]] = [[] for _ in range(conns)]
        threads = [threading.Thread(target=_conversation, args=(
            running[i % servers].address, seed + i, frames, errors, sent[i], key))
            for i in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        expected = sorted(repr(v) for values in sent for v in values)
        deadline = time.monotonic() + 10
        while sum(len(app.events) for app in apps) < len(expected):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        got = sorted(repr(v) for app in apps for v in app.events)
        assert got == expected


def test_stress_16_connections_x_500_mixed_frames_in_random_chunks() -> None:
    """16 peers (each decoding in its own thread, so client-side spare decoders cross
    threads) pipeline EVENT, BATCH, REQUEST and PING frames cut at random byte boundaries,
    values up to 9 KiB: every answer matches its frame, every event reaches its processor,
    and none crosses connections."""
    _stress(1)


def test_stress_keyed_frames_pipelined_behind_the_authenticating_hello() -> None:
    """``take_buffered`` hands what follows the HELLO from the pre-auth reader to the full
    one, cut anywhere by the random chunking."""
    _stress(1, conns=12, frames=150, key=KEY)


def test_stress_two_servers_in_two_threads() -> None:
    """The same over two servers in two threads of one process (``serve_in_thread`` twice)."""
    _stress(2)


def test_a_partial_frame_left_by_a_broken_peer_does_not_reach_the_next_connection() -> None:
    """A decoder is handed on only once every byte fed was consumed: a peer that stops
    mid-frame, one that sends garbage and one that errs after valid frames leave nothing
    behind for the connections after them."""
    app = echo_app()
    with serve_in_thread(app) as server:
        for round_ in range(30):
            broken = RawPeer(server.address)
            whole = p.encode_event(7, ["echo", ["broken", "z" * 100]], request=True)
            kind = round_ % 3
            if kind == 0:  # a partial frame, then gone
                broken.send(whole[: 20 + round_])
            elif kind == 1:  # valid frames, then bytes that start no msgpack value
                broken.send(p.encode_event(1, ["echo", "ok"], request=True) + b"\xc1")
                assert broken.recv_frames(1)[0].body == "ok"
                err = broken.recv_frames(1)[0]
                assert err.kind == p.ERROR, err
            else:  # a REQUEST with corr 0: refused
                broken.send(p.encode_event(0, ["echo", "zero"], request=True) + whole[:30])
                err = broken.recv_frames(1)[0]
                assert err.kind == p.ERROR and "correlation id" in err.body[2], err
            broken.close()
            good = RawPeer(server.address)
            for i in range(1, 4):
                reply = good.request(i, "echo", ["good", round_, i])
                assert (reply.kind, reply.corr, reply.body) == (p.REPLY, i, ["good", round_, i])
            good.close()


def test_auth_pipelined_frames_behind_the_hello_are_answered_and_stay_on_their_connection(
) -> None:
    """``take_buffered`` hands what the client pipelined behind its HELLO to the full-size
    reader; with the spares of both sizes in use, every connection gets its own replies."""
    app = echo_app()
    with serve_in_thread(app, settings={"security.shared_key": KEY}) as server:
        for round_ in range(10):
            with Client(*server.address, shared_key=KEY, timeout=10) as client:
                for i in range(5):
                    assert client.request("echo", [round_, i, "x" * (i * 1000)]) == [
                        round_, i, "x" * (i * 1000)]


def test_unserialisable_reply_gets_an_error_frame_and_the_next_replies_are_right() -> None:
    app = echo_app()
    with serve_in_thread(app) as server:
        peer = RawPeer(server.address)
        for round_ in range(20):
            peer.send(p.encode_event(1, ["bad", None], request=True)
                      + p.encode_event(2, ["echo", {"round": round_, "v": [1, 2]}],
                                       request=True))
            answers = peer.by_corr(2)
            assert answers[1].kind == p.ERROR and "cannot be sent" in answers[1].body[2]
            assert answers[2].kind == p.REPLY and answers[2].body == {"round": round_,
                                                                      "v": [1, 2]}
        peer.close()


def test_a_peer_that_stops_reading_gets_every_reply_complete_and_in_order() -> None:
    """Replies bigger than the socket buffers: the OS send takes part, the green sendall the
    rest; the reader pauses at _OUT_LIMIT; once the peer reads, all arrive, whole, in order."""
    app = echo_app()
    with serve_in_thread(app) as server:
        sock = socket.create_connection(server.address, timeout=30)
        n = 40
        payloads = [bytes([i]) * (300_000 + i) for i in range(n)]
        wire = b"".join(p.encode_event(i + 1, ["echo", payloads[i]], request=True)
                        for i in range(n))
        sender = threading.Thread(target=sock.sendall, args=(wire,))
        sender.start()
        deadline = time.monotonic() + 10  # the peer reads nothing until replies back up
        while not any(c.out_bytes for c in list(server.connections)):
            assert time.monotonic() < deadline, "no reply was ever held back"
            time.sleep(0.01)
        frames = _collect(sock, n + 1)
        sender.join(30)
        assert frames[0].kind == p.HELLO
        assert [(f.kind, f.corr) for f in frames[1:]] == [(p.REPLY, i + 1) for i in range(n)]
        assert [f.body for f in frames[1:]] == payloads
        sock.close()


def test_a_huge_reply_does_not_stay_allocated_after_it_was_sent() -> None:
    """msgpack's Packer grows its buffer to the largest value it packed and never shrinks
    it: the reused one must not keep a huge reply's memory for the life of the process."""
    app = echo_app()
    size = 32 << 20
    with serve_in_thread(app) as server, Client(*server.address, timeout=30) as client:
        assert client.request("echo", "warm") == "warm"
        gc.collect()
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            reply = client.request("huge", size)
            assert len(reply) == size
            del reply
            assert client.request("echo", "small") == "small"
            gc.collect()
            after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert after - base < size // 4, f"{(after - base) >> 20} MiB still allocated"


def test_reset_mid_frame_and_eof_mid_frame_leave_the_server_serving() -> None:
    app = echo_app()
    with serve_in_thread(app) as server:
        for round_ in range(20):
            peer = RawPeer(server.address)
            peer.send(p.encode_event(1, ["echo", "a" * 5000], request=True)[:4000])
            if round_ % 2:
                peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            peer.close()
            good = RawPeer(server.address)
            assert good.request(1, "echo", ["after", round_]).body == ["after", round_]
            good.close()
        deadline = time.monotonic() + 10
        while len(server.connections) > 0:
            assert time.monotonic() < deadline, len(server.connections)
            time.sleep(0.01)
        assert server.counters["protocol_errors"] == 0


def test_idle_timeout_closes_with_an_error_frame_on_the_raw_read_path() -> None:
    app = echo_app()
    with serve_in_thread(app, idle_timeout=0.3, park_after=0) as server:
        peer = RawPeer(server.address)
        assert peer.request(1, "echo", "x").body == "x"
        peer.send(p.encode_event(2, ["echo", "y"], request=True)[:5])  # a partial frame
        frame = peer.recv_frames(1)[0]
        assert frame.kind == p.ERROR and frame.body[0] == "idle_timeout", frame
        assert peer.read_until_eof() == b""
        assert server.counters["idle_closed"] == 1


def test_parked_connections_wake_and_go_on_mid_frame() -> None:
    app = echo_app()
    with serve_in_thread(app, park_after=0.05) as server:
        peers = [RawPeer(server.address) for _ in range(8)]
        for i, peer in enumerate(peers):
            assert peer.request(1, "echo", i).body == i
        wholes = [p.encode_event(2, ["echo", ["parked", i, "q" * 3000]], request=True)
                  for i in range(8)]
        for peer, whole in zip(peers, wholes, strict=True):
            peer.send(whole[:1500])
        deadline = time.monotonic() + 10  # the readers park mid-frame
        while not (len(server.connections) == 8
                   and all(c.parked is not None for c in list(server.connections))):
            assert time.monotonic() < deadline, "the readers never parked"
            time.sleep(0.01)
        for i, (peer, whole) in enumerate(zip(peers, wholes, strict=True)):
            peer.send(whole[1500:])
            assert peer.recv_frames(1)[0].body == ["parked", i, "q" * 3000]
            peer.close()


def test_tls_request_replies_use_the_green_path(tmp_path: Any) -> None:
    from tlscerts import make_pki

    pki = make_pki(tmp_path)
    app = echo_app()
    with serve_in_thread(app, settings=pki.settings(), park_after=0.05) as server, \
            Client(*server.address, timeout=10, tls=True, cafile=str(pki.ca)) as client:
        for i in range(50):
            value = ["tls", i, "t" * (i * 300)]
            assert client.request("echo", value) == value
        deadline = time.monotonic() + 10  # idle past park_after: TLS readers never park
        while not all(time.monotonic() - c.last_active > 0.1 for c in list(server.connections)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert all(c.parked is None for c in list(server.connections))
        big = {"big": "b" * 500_000}
        assert client.request("echo", big) == big


def test_graceful_stop_drains_a_waiting_request_through_the_raw_path() -> None:
    app = echo_app()
    with serve_in_thread(app, drain_timeout=5) as server:
        peer = RawPeer(server.address)
        peer.send(p.encode_event(1, ["nap", [0.3, "drained"]], request=True))
        deadline = time.monotonic() + 10
        while not any(c.jobs for c in list(server.connections)):
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.005)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        frame = peer.recv_frames(1)[0]
        assert (frame.kind, frame.corr, frame.body) == (p.REPLY, 1, [0.3, "drained"])
        stopper.join(15)


@pytest.mark.parametrize("frame", [
    [p.REQUEST, 0, ["echo", 1]],
    [p.REQUEST, -1, ["echo", 1]],
    [p.REQUEST, 1 << 63, ["echo", 1]],
    [p.REQUEST, (1 << 64) - 1, ["echo", 1]],
    [p.REQUEST, True, ["echo", 1]],
    [p.REQUEST, 1.0, ["echo", 1]],
    [True, 5, ["echo", 1]],
    [3.0, 5, ["echo", 1]],
    [p.REQUEST, 5, ["echo"]],
    [p.REQUEST, 5, ["echo", 1, ""]],
    [p.REQUEST, 5, [5, 1]],
    [p.REQUEST, 5, "echo"],
    [p.REQUEST, 5, ["echo", 1], None],
])
def test_malformed_requests_are_refused_over_the_wire(frame: list[Any]) -> None:
    app = echo_app()
    with serve_in_thread(app) as server:
        peer = RawPeer(server.address)
        peer.send(msgpack.packb(frame))
        err = peer.recv_frames(1)[0]
        assert err.kind == p.ERROR and err.corr == 0 and err.body[0] == "bad_frame", err
        assert peer.read_until_eof() == b""


@pytest.mark.parametrize("kind", [True, 1.0])
@pytest.mark.parametrize("corr", [0, 5])
def test_an_event_frame_whose_kind_is_not_an_integer_is_refused(kind: Any, corr: int) -> None:
    """docs/protocol.md: a frame is an array whose first element is an *integer* frame kind.
    ``true == 1 == 1.0`` in Python, so the decoder's shortcuts must check the type."""
    app = echo_app()
    with serve_in_thread(app) as server:
        peer = RawPeer(server.address)
        peer.send(msgpack.packb([kind, corr, ["ev", "not-an-int-kind"]]) + p.encode_ping(9))
        frame = peer.recv_frames(1)[0]
        assert frame.kind == p.ERROR and frame.body[0] == "bad_frame", frame
        assert app.events == []


def test_replies_packed_while_another_reply_holds_the_packer_across_a_switch() -> None:
    app = echo_app()
    with serve_in_thread(app) as server:
        peers = [RawPeer(server.address) for _ in range(6)]
        for round_ in range(20):
            for i, peer in enumerate(peers):
                if i % 3 == 0:
                    peer.send(p.encode_event(round_ + 1, ["switchy", {"i": i, "r": round_,
                                                                      "fail": i == 3}],
                                             request=True))
                else:
                    peer.send(p.encode_event(round_ + 1, ["echo", [i, round_, "e" * i * 700]],
                                             request=True))
            for i, peer in enumerate(peers):
                frame = peer.recv_frames(1)[0]
                assert frame.corr == round_ + 1, frame
                if i == 3:
                    assert frame.kind == p.ERROR and "cannot be sent" in frame.body[2], frame
                elif i % 3 == 0:
                    assert (frame.kind, frame.body) == (p.REPLY, {"i": i, "r": round_,
                                                                  "fail": False}), frame
                else:
                    assert (frame.kind, frame.body) == (p.REPLY, [i, round_, "e" * i * 700])
        for peer in peers:
            peer.close()
