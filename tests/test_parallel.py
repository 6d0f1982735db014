"""Handlers that wait run in parallel: one job's events spread over the green-thread pool.

Real servers on loopback (``serve_in_thread``: the server has its own hub in another native
thread, so handlers wait with ``eventlet.sleep``). The tests count, never time: concurrency
reached, order per key, what had run when an ACK arrived.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from typing import Any

import msgpack
import pytest

from evserver import App, Client, Event, RemoteError
from evserver import protocol as p
from evserver._eventlet import eventlet
from evserver.connection import JOB_EVENTS
from evserver.testing import serve_in_thread
from tests.rawpeer import RawPeer


class Gauge:
    """Handlers in flight, and the most ever in flight at once."""

    def __init__(self) -> None:
        self.now = self.max = self.done = 0

    def __enter__(self) -> Gauge:
        self.now += 1
        self.max = max(self.max, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        self.now -= 1
        self.done += 1


def test_a_batch_into_a_waiting_processor_spreads_over_the_pool() -> None:
    app, gauge = App(), Gauge()

    @app.processor("io")
    def io(event: Event) -> None:
        with gauge:
            eventlet.sleep(0.01)

    with serve_in_thread(app, pool_size=64) as server, Client(*server.address) as client:
        client.send_many([("io", i) for i in range(1000)], ack=True, batch_size=1000)
        assert gauge.done == 1000  # acked: every one of them ran
        assert gauge.max >= 32, gauge.max
        assert gauge.max <= 64  # pool_size bounds everything running, inline runs included


def test_pool_size_still_bounds_a_batch() -> None:
    app, gauge = App(), Gauge()
    app.processor("io")(lambda event: gauge.__enter__() and (eventlet.sleep(0.002),
                                                               gauge.__exit__()))
    with serve_in_thread(app, pool_size=4) as server, Client(*server.address) as client:
        client.send_many([("io", i) for i in range(200)], ack=True, batch_size=200)
    assert gauge.done == 200 and gauge.max == 4


def test_the_ack_comes_after_every_processor_and_listener_of_the_batch() -> None:
    app, seen = App(), defaultdict(int)
    acked_after: list[dict[str, int]] = []

    @app.processor("job")
    def job(event: Event) -> None:
        eventlet.sleep(0.001 * (event.data % 7))
        seen["processor"] += 1

    @app.listener("job")
    def audit(event: Event) -> None:
        eventlet.sleep(0.001 * (event.data % 5))
        seen["audit"] += 1

    @app.listener("**")
    def trace(event: Event) -> None:
        eventlet.sleep(0.001 * (event.data % 3))
        seen["trace"] += 1

    with serve_in_thread(app, pool_size=32) as server, Client(*server.address) as client:
        for _ in range(3):
            client.send_many([("job", i) for i in range(300)], ack=True, batch_size=300)
            acked_after.append(dict(seen))
    assert acked_after == [{"processor": n, "audit": n, "trace": n} for n in (300, 600, 900)]


def test_the_listeners_of_one_event_overlap_when_they_wait() -> None:
    app, gauge = App(), Gauge()
    for name in ("a", "b", "c"):
        app.listener("note")(_waiting(gauge, 0.05, name))
    with serve_in_thread(app, pool_size=8) as server, Client(*server.address) as client:
        client.send("note", 1, ack=True)
    assert gauge.done == 3 and gauge.max == 3


def test_a_failing_listener_among_overlapping_ones_fails_the_acked_event() -> None:
    app, gauge = App(), Gauge()
    app.listener("note")(_waiting(gauge, 0.02, "ok"))

    @app.listener("note")
    def broken(event: Event) -> None:
        with gauge:
            eventlet.sleep(0.01)
            raise ValueError("listener broke")

    with serve_in_thread(app, pool_size=8) as server, Client(*server.address) as client, \
            pytest.raises(RemoteError, match="listener broke"):
        client.send("note", 1, ack=True)
    assert gauge.done == 2 and gauge.max == 2


class Gate:
    """An app whose "hold" requests wait until an "open" request of the same name (their
    data) lets them go, and whose "echo" requests answer at once: what runs behind a
    waiting handler, counted."""

    def __init__(self) -> None:
        self.app = App()
        self.held = 0
        self.gates: dict[Any, Any] = {}  # hub Events, made in the server's hub thread
        self.app.processor("hold")(self.hold)
        self.app.processor("open")(self.open)
        self.app.processor("echo")(lambda event: event.data)

    def _gate(self, name: Any) -> Any:
        if name not in self.gates:
            self.gates[name] = eventlet.event.Event()
        return self.gates[name]

    def hold(self, event: Event) -> str:
        self.held += 1
        self._gate(event.data).wait()
        return "released"

    def open(self, event: Event) -> int:
        self._gate(event.data).send()
        return self.held

    def wait_held(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while self.held < n:
            assert time.monotonic() < deadline, f"{self.held} of {n} held"
            time.sleep(0.005)


def test_a_request_sent_while_the_readers_own_job_waits_is_answered_meanwhile() -> None:
    gate = Gate()
    with serve_in_thread(gate.app, pool_size=8) as server:
        peer = RawPeer(server.address, timeout=5)
        peer.send(p.encode_event(1, ["hold", None], request=True))
        gate.wait_held(1)  # the reader runs it inline (the pool is idle) and it waits
        for corr in range(2, 5):
            reply = peer.request(corr, "echo", corr)
            assert (reply.kind, reply.corr, reply.body) == (p.REPLY, corr, corr)
        assert gate.held == 1  # still waiting: nothing behind it waited for it
        peer.send(p.encode_event(5, ["open", None], request=True))
        replies = peer.by_corr(2)
        assert (replies[1].body, replies[5].body) == ("released", 1)
        peer.close()


def test_jobs_decoded_behind_a_waiting_inline_job_run_meanwhile() -> None:
    gate = Gate()
    with serve_in_thread(gate.app, pool_size=8) as server:
        peer = RawPeer(server.address, timeout=5)
        # One write: the first job (JOB_EVENTS requests) starts with "hold"; the echoes of
        # the jobs behind it are answered while it waits.
        behind = range(JOB_EVENTS + 1, JOB_EVENTS + 8)
        frames = [p.encode_event(1, ["hold", None], request=True)]
        frames += [p.encode_event(c, ["echo", c], request=True) for c in range(2, behind.stop)]
        peer.send(b"".join(frames))
        answered = peer.by_corr(len(behind))
        assert sorted(answered) == list(behind) and gate.held == 1
        peer.send(p.encode_event(999, ["open", None], request=True))
        rest = peer.by_corr(JOB_EVENTS + 1)  # the first job answers when all of it ran
        assert rest[1].body == "released" and rest[999].body == 1
        peer.close()


def test_a_reader_whose_job_ends_after_the_next_reader_took_over_leaves_it_alone() -> None:
    gate = Gate()
    with serve_in_thread(gate.app, pool_size=8) as server:
        peer, other = RawPeer(server.address, timeout=5), RawPeer(server.address, timeout=5)
        peer.send(p.encode_event(1, ["hold", "a"], request=True))
        gate.wait_held(1)
        peer.send(p.encode_event(2, ["hold", "b"], request=True))  # a second reader runs it
        gate.wait_held(2)
        # Released from elsewhere: the first reader's job ends while the second one's waits.
        assert other.request(1, "open", "a").body == 2
        assert peer.recv_frames(1)[0].corr == 1
        assert other.request(2, "open", "b").body == 2
        assert peer.recv_frames(1)[0].corr == 2
        for corr in range(3, 6):  # exactly one reader is left, and it reads
            assert peer.request(corr, "echo", corr).body == corr
        assert server.counters["protocol_errors"] == 0
        peer.close()
        other.close()


def test_a_connection_whose_inline_jobs_wait_keeps_to_jobs_per_connection() -> None:
    gate = Gate()
    with serve_in_thread(gate.app, pool_size=8) as server:
        limit = server.jobs_per_connection  # 4: half the pool
        peer, other = RawPeer(server.address, timeout=5), RawPeer(server.address, timeout=5)
        for corr in range(1, limit + 1):  # each read's job waits, and a new reader goes on
            peer.send(p.encode_event(corr, ["hold", "x"], request=True))
            gate.wait_held(corr)
        more = range(limit + 1, 2 * limit + 1)
        peer.send(b"".join(p.encode_event(c, ["hold", "x"], request=True) for c in more))
        conn = next(c for c in server.connections if c.protocol.replies_pending)
        deadline = time.monotonic() + 5
        while conn.protocol.replies_pending < 2 * limit:  # decoded: now it may not dispatch
            assert time.monotonic() < deadline
            time.sleep(0.005)
        deadline = time.monotonic() + 0.3  # the window in which a dispatch would show
        while time.monotonic() < deadline:
            assert gate.held == limit
            time.sleep(0.005)
        # Half the pool is still free for the other connections.
        assert other.request(1, "open", "x").body == limit
        replies = peer.by_corr(2 * limit)
        assert {f.body for f in replies.values()} == {"released"}
        peer.close()
        other.close()


def test_a_peer_that_half_closes_still_gets_the_reply_of_a_slow_request() -> None:
    app = App()

    @app.processor("nap")
    def nap(event: Event) -> str:
        eventlet.sleep(event.data)
        return "done"

    # Longer than drain_timeout, which bounds a stopping server's wait, not a peer's.
    with serve_in_thread(app, pool_size=8, drain_timeout=0.3) as server:
        peer = RawPeer(server.address, timeout=5)
        peer.send(p.encode_event(1, ["nap", 0.8], request=True))
        peer.sock.shutdown(socket.SHUT_WR)
        reply = peer.recv_frames(1)[0]
        assert (reply.kind, reply.corr, reply.body) == (p.REPLY, 1, "done")
        assert peer.sock.recv(1) == b""  # then the server closes
        peer.close()


def _waiting(gauge: Gauge, seconds: float, name: str) -> Any:
    def listener(event: Event) -> None:
        with gauge:
            eventlet.sleep(seconds)

    listener.__name__ = listener.__qualname__ = name
    return listener


class OrderLog:
    """What an ordered processor saw: per key the sequence numbers, and concurrency."""

    def __init__(self) -> None:
        self.by_key: dict[int, list[int]] = defaultdict(list)
        self.gauge = Gauge()
        self.per_key: dict[int, int] = defaultdict(int)
        self.overlap_within_key = False

    def processor(self, event: Event) -> None:
        key, seq = event.data["key"], event.data["seq"]
        with self.gauge:
            self.per_key[key] += 1
            self.overlap_within_key |= self.per_key[key] > 1
            eventlet.sleep(0.002)
            self.by_key[key].append(seq)
            self.per_key[key] -= 1


def _ordered_app(keys_log: OrderLog) -> App:
    app = App()
    app.processor("ordered", ordered_by="key")(keys_log.processor)
    return app


def _check_order(log: OrderLog, keys: int, per_key: int) -> None:
    assert sorted(log.by_key) == list(range(keys))
    for key in range(keys):
        assert log.by_key[key] == list(range(per_key)), key  # strictly in arrival order
    assert not log.overlap_within_key
    assert log.gauge.max >= keys // 2, log.gauge.max  # different keys ran in parallel


def _ordered_events(keys: int, per_key: int) -> list[tuple[str, dict[str, int]]]:
    return [("ordered", {"key": n % keys, "seq": n // keys}) for n in range(keys * per_key)]


def test_ordered_keys_in_one_batch_run_in_parallel_across_keys_in_order_per_key() -> None:
    log = OrderLog()
    with serve_in_thread(_ordered_app(log), pool_size=64) as server, \
            Client(*server.address) as client:
        client.send_many(_ordered_events(10, 30), ack=True, batch_size=300)
    _check_order(log, 10, 30)


def test_ordered_keys_in_pipelined_single_event_frames() -> None:
    log = OrderLog()
    with serve_in_thread(_ordered_app(log), pool_size=64) as server:
        peer = RawPeer(server.address)
        frames = [p.encode_event(n + 1, event) for n, event in enumerate(_ordered_events(8, 25))]
        peer.send(b"".join(frames))  # one write: many frames per read
        answers = peer.recv_frames(len(frames))
        assert sorted(a.corr for a in answers) == list(range(1, len(frames) + 1))
        assert all(a.kind == p.ACK for a in answers)
        peer.close()
    _check_order(log, 8, 25)


def test_ordered_keys_over_forward_run_in_parallel_in_order_per_key() -> None:
    log = OrderLog()
    with serve_in_thread(_ordered_app(log), pool_size=64, settings=FORWARD) as server:
        sock = socket.create_connection(server.forward.address, timeout=10)
        entries = [[1700000000, data] for _, data in _ordered_events(10, 20)]
        sock.sendall(msgpack.packb(["ordered", entries, {"chunk": "c1"}]))
        unpacker = msgpack.Unpacker()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            unpacker.feed(sock.recv(4096))
            if answers := list(unpacker):
                assert answers == [{"ack": "c1"}]
                break
        sock.close()
    _check_order(log, 10, 20)


FORWARD = {"forward.enabled": True, "forward.port": 0}


def test_blocking_handlers_of_one_batch_run_in_parallel_native_threads() -> None:
    app, lock, state = App(), threading.Lock(), {"now": 0, "max": 0, "done": 0}

    @app.processor("cpu", blocking=True)
    def native(event: Event) -> None:  # runs in a native thread: real time.sleep
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.01)
        with lock:
            state["now"] -= 1
            state["done"] += 1

    with serve_in_thread(app, pool_size=16) as server, Client(*server.address) as client:
        client.send_many([("cpu", i) for i in range(100)], ack=True, batch_size=100)
    assert state["done"] == 100 and state["max"] >= 8, state


def test_requests_pipelined_in_one_read_run_in_parallel_and_answer_in_order() -> None:
    app, gauge = App(), Gauge()

    @app.processor("echo")
    def echo(event: Event) -> int:
        with gauge:
            eventlet.sleep(0.001 * (50 - event.data))  # later requests finish first
            return event.data

    with serve_in_thread(app, pool_size=64) as server:
        peer = RawPeer(server.address)
        peer.send(b"".join(p.encode_event(n + 1, ["echo", n], request=True) for n in range(50)))
        answers = peer.recv_frames(50)
        peer.close()
    assert [(a.kind, a.corr, a.body) for a in answers] == [
        (p.REPLY, n + 1, n) for n in range(50)]
    assert gauge.max >= 25


def test_a_request_with_no_processor_runs_no_listener() -> None:
    app, seen = App(), []
    app.listener("orphan.*")(lambda event: seen.append(event.id))
    with serve_in_thread(app) as server, Client(*server.address) as client:
        with pytest.raises(RemoteError) as info:
            client.request("orphan.created", {"id": 1})
        client.send("orphan.noted", 1, ack=True)  # an event still reaches its listeners
    assert info.value.code == "no_handler"
    assert len(seen) == 1


def test_a_reply_msgpack_refuses_is_answered_with_an_error() -> None:
    app = App()
    app.processor("r")(lambda event: memoryview(b"abcd")[::2])  # msgpack: BufferError
    with serve_in_thread(app, pool_size=2) as server, \
            Client(*server.address, timeout=5, retries=0) as client:
        with pytest.raises(RemoteError, match="cannot be sent"):
            client.request("r", 1)
        with pytest.raises(RemoteError, match="cannot be sent"):
            client.request("r", 2)  # the same connection still answers
