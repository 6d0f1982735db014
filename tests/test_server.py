"""The server over real loopback sockets: replies, acks, errors, limits, handler options,
ordering and graceful shutdown. The server runs on its own hub in a thread
(``evserver.testing.serve_in_thread``); peers are plain blocking sockets."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest
from conftest import wait_for
from rawpeer import RawPeer

from evserver import App
from evserver import protocol as p
from evserver._eventlet import eventlet
from evserver.testing import serve_in_thread


def make_app():
    app = App()
    app.seen = []
    app.audited = []
    app.started = threading.Condition()
    app.running = 0

    @app.processor("echo")
    def echo(event):
        return event.data

    @app.processor("meta")
    def meta(event):
        return {"id": event.id, "meta": event.meta, "time": event.time}

    @app.processor("fail")
    def fail(event):
        raise ValueError(f"bad {event.data}")

    @app.processor("unsendable")
    def unsendable(event):
        return object()

    @app.processor("slow")
    def slow(event):
        with app.started:
            app.running += 1
            app.started.notify_all()
        eventlet.sleep(event.data)
        app.seen.append(event.id)
        return "done"

    @app.processor("count")
    def count(event):
        return len(app.seen)

    @app.processor("order.*")
    def order(event):
        app.seen.append(event.id)

    @app.listener("order.**")
    def audit(event):
        app.audited.append(event.type)

    @app.listener("order.bad")
    def bad_listener(event):
        raise RuntimeError("listener broke")

    @app.listener("only.listened")
    def only(event):
        app.audited.append(event.type)

    return app


@pytest.fixture
def app():
    return make_app()


@pytest.fixture
def server(app):
    with serve_in_thread(app, idle_timeout=0) as srv:
        yield srv


@pytest.fixture
def peer(server):
    peer = RawPeer(server.address)
    yield peer
    peer.close()


def test_request_reply_round_trips_msgpack_values(peer):
    values = [None, True, 1, -5, 2**64 - 1, 1.5, "héllo", b"\x00\xff", [1, [2]], {"a": {"b": 1}}]
    for corr, value in enumerate(values, 1):
        reply = peer.request(corr, "echo", value)
        assert (reply.kind, reply.corr, reply.body) == (p.REPLY, corr, value)


def test_event_fields_reach_the_handler(peer):
    peer.send(p.encode_event(1, p.event_wire("meta", 1, "my-id", 12.5, {"k": "v"}),
                             request=True))
    reply = peer.recv_frames(1)[0]
    assert reply.body == {"id": "my-id", "meta": {"k": "v"}, "time": 12.5}


def test_ack_fire_and_forget_batch_and_ping(app, peer):
    peer.send(p.encode_event(0, ["order.a", 1]) + p.encode_event(7, ["order.b", 2])
              + p.encode_batch(8, [["order.c", i] for i in range(100)]) + p.encode_ping(9))
    frames = peer.by_corr(3)
    assert frames[7].kind == p.ACK and frames[8].kind == p.ACK and frames[9].kind == p.PONG
    peer.send(p.encode_batch(0, [["order.d", i] for i in range(50)]))
    assert peer.request(10, "count").body == 152
    assert app.audited.count("order.c") == 100


def test_handler_errors_are_error_frames(app, peer):
    peer.send(p.encode_event(1, ["fail", 3], request=True)
              + p.encode_event(2, ["nothing.here", 1], request=True)
              + p.encode_event(3, ["only.listened", 1], request=True)
              + p.encode_event(4, ["nothing.here", 1])
              + p.encode_event(5, ["unsendable", 1], request=True)
              + p.encode_event(0, ["fail", 1]))
    f = peer.by_corr(5)
    assert f[1].body == ("handler_error", "ValueError", "bad 3")
    assert f[2].body[:2] == ("no_handler", "RoutingError")
    assert f[3].body[:2] == ("no_handler", "RoutingError")  # no processor: nothing ran
    assert f[4].body[:2] == ("no_handler", "RoutingError")
    assert f[5].body[1] == "TypeError"
    # The connection is still healthy, and a fire-and-forget failure got no response.
    assert peer.request(7, "echo", "ok").body == "ok"
    assert "only.listened" not in app.audited  # a refused request runs no listener either


def test_listener_failure_nacks_an_ack_but_never_changes_a_reply(app, peer):
    peer.send(p.encode_event(1, ["order.bad", 1], request=True)
              + p.encode_event(2, ["order.bad", 1]))
    f = peer.by_corr(2)
    assert f[1].kind == p.REPLY and f[1].body is None
    assert f[2].body == ("handler_error", "RuntimeError", "listener broke")


def test_garbage_connection_beside_a_healthy_one(server, peer):
    bad = RawPeer(server.address)
    bad.send(b"\xc1\xc1\xc1 definitely not msgpack")
    error = bad.recv_frames(1)[0]
    assert error.kind == p.ERROR and error.corr == 0 and error.body[0] == "bad_frame"
    assert bad.read_until_eof() == b""
    assert peer.request(1, "echo", "still here").body == "still here"
    assert server.counters["protocol_errors"] == 1


def test_requests_before_a_malformed_frame_are_answered_before_the_error(server):
    bad = RawPeer(server.address)
    bad.send(p.encode_event(1, ["echo", "first"], request=True)
             + p.encode_batch(2, [["order.x", 1]]) + b"\xc1 not msgpack"
             + p.encode_event(3, ["echo", "never"], request=True))
    reply, ack, error = bad.recv_frames(3)
    assert (reply.kind, reply.corr, reply.body) == (p.REPLY, 1, "first")
    assert (ack.kind, ack.corr) == (p.ACK, 2)
    assert error.kind == p.ERROR and error.corr == 0 and error.body[0] == "bad_frame"
    assert bad.read_until_eof() == b""


def test_oversized_frame_is_refused(app):
    with serve_in_thread(app, max_frame_bytes=4096) as server:
        big, ok = RawPeer(server.address), RawPeer(server.address)
        big.send(p.encode_event(0, ["echo", b"x" * 5000]))
        error = big.recv_frames(1)[0]
        assert error.body[0] == "frame_too_large"
        assert big.read_until_eof() == b""
        assert ok.request(1, "echo", b"y" * 4000).body == b"y" * 4000


def test_max_connections_refuses_with_an_error(app, caplog):
    with serve_in_thread(app, max_connections=2) as server:
        a, b = RawPeer(server.address), RawPeer(server.address)
        c = RawPeer.__new__(RawPeer)
        import socket

        c.sock = socket.create_connection(server.address, timeout=5)
        c.reader, c.frames, c.timeout = p.FrameReader(p.CLIENT_RECEIVES), [], 5
        error = c.recv_frames(1)[0]
        assert error.kind == p.ERROR and error.body[0] == "overloaded"
        assert a.request(1, "echo", 1).body == 1 and b.request(1, "echo", 2).body == 2
        assert server.counters["refused_connections"] == 1
        assert "at max_connections=2" in caplog.text


def test_idle_timeout_closes_silent_connections(app, caplog):
    with serve_in_thread(app, idle_timeout=0.3) as server:
        peer = RawPeer(server.address)
        error = peer.recv_frames(1)[0]
        assert error.body[0] == "idle_timeout"
        assert peer.read_until_eof() == b""
        assert "closing idle connection" in caplog.text


def parked(server):
    return [c for c in list(server.connections) if c.parked is not None]


def test_a_silent_connection_parks_and_its_next_reader_goes_on_where_it_stopped(app):
    with serve_in_thread(app, park_after=0.05) as server:
        peer = RawPeer(server.address)
        assert peer.request(1, "echo", "before").body == "before"
        wire = p.encode_event(2, ["echo", "split across the park"], request=True)
        peer.send(wire[:5])  # a partial frame stays with the connection, not its reader
        wait_for(lambda: parked(server), 5, "the connection to park")
        peer.send(wire[5:])
        assert peer.recv_frames(1)[0].body == "split across the park"
        for i in range(3):
            wait_for(lambda: parked(server), 5, "the connection to park again")
            assert peer.request(10 + i, "echo", i).body == i
        assert server.counters["idle_closed"] == 0


def test_parked_connections_end_on_eof_idle_timeout_and_stop(app):
    with serve_in_thread(app, park_after=0.05, idle_timeout=0.6) as server:
        gone, silent = RawPeer(server.address), RawPeer(server.address)
        wait_for(lambda: len(parked(server)) == 2, 5, "both connections to park")
        gone.close()
        wait_for(lambda: len(server.connections) == 1, 5, "the closed peer to be dropped")
        error = silent.recv_frames(1)[0]  # woken to time out while parked
        assert error.kind == p.ERROR and error.body[0] == "idle_timeout"
        assert silent.read_until_eof() == b""
        assert server.counters["idle_closed"] == 1
        last = RawPeer(server.address)
        wait_for(lambda: parked(server), 5, "the last connection to park")
    assert last.read_until_eof() == b""  # the graceful stop woke and closed it
    assert not server.connections


def test_a_connection_parked_from_its_start_still_times_out_on_time(app):
    with serve_in_thread(app, park_after=30, idle_timeout=0.3) as server:
        started = time.monotonic()
        peer = RawPeer(server.address)  # never sends: parked since it was accepted
        wait_for(lambda: parked(server), 5, "the new connection to park")
        assert peer.recv_frames(1)[0].body[0] == "idle_timeout"
        assert time.monotonic() - started < 5  # its own timer, not a sweep 30 s away


def test_waiting_on_a_slow_reply_is_not_idleness_for_a_parked_connection(app):
    with serve_in_thread(app, park_after=0.05, idle_timeout=0.5) as server:
        peer = RawPeer(server.address)
        assert peer.request(1, "slow", 0.8).body == "done"  # longer than idle_timeout
        wait_for(lambda: parked(server), 5, "the connection to park after the reply")
        assert peer.request(2, "echo", "still served").body == "still served"
        assert server.counters["idle_closed"] == 0


def test_requests_queued_for_the_pool_are_answered_before_a_protocol_error(app):
    with serve_in_thread(app, pool_size=1, idle_timeout=0) as server:
        busy = RawPeer(server.address)
        busy.send(p.encode_event(1, ["slow", 0.3], request=True))  # holds the only slot
        with app.started:
            assert app.started.wait_for(lambda: app.running == 1, timeout=5)
        bad = RawPeer(server.address)
        bad.send(p.encode_event(7, ["echo", "queued"], request=True) + b"\xc1")
        reply, error = bad.recv_frames(2)
        assert (reply.kind, reply.corr, reply.body) == (p.REPLY, 7, "queued")
        assert error.kind == p.ERROR and error.body[0] == "bad_frame"
        assert busy.recv_frames(1)[0].body == "done"


def test_idle_timeout_does_not_cut_a_slow_request(app):
    with serve_in_thread(app, idle_timeout=0.2) as server:
        peer = RawPeer(server.address)
        assert peer.request(1, "slow", 0.5).body == "done"


def test_max_pending_replies(app):
    with serve_in_thread(app, max_pending_replies=10) as server:
        peer = RawPeer(server.address)
        peer.send(b"".join(p.encode_event(i, ["slow", 0.2]) for i in range(1, 30)))
        frames = []
        while not frames or frames[-1].corr != 0:
            frames += peer.recv_frames(1)
        assert frames[-1].body[0] == "overloaded"
        assert server.counters["overloaded_closed"] == 1


def test_graceful_stop_finishes_in_flight_work_and_writes_acks(app):
    with serve_in_thread(app, drain_timeout=10) as server:
        peers = [RawPeer(server.address) for _ in range(5)]
        for i, peer in enumerate(peers):
            peer.send(p.encode_event(1, p.event_wire("slow", 0.3, f"id{i}")))
            peer.send(p.encode_event(0, p.event_wire("slow", 0.3, f"ff{i}")))
        with app.started:  # every handler is running: now stop
            assert app.started.wait_for(lambda: app.running == 10, timeout=10)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        for peer in peers:
            assert peer.recv_frames(1)[0].kind == p.ACK
            assert peer.read_until_eof() == b""
        stopper.join(10)
        assert not stopper.is_alive()
    assert sorted(x for x in app.seen if x.startswith("id")) == [f"id{i}" for i in range(5)]


def test_drain_timeout_bounds_a_stuck_handler(app):
    with serve_in_thread(app, drain_timeout=0.5) as server:
        peer = RawPeer(server.address)
        peer.send(p.encode_event(1, ["slow", 30]))
        assert RawPeer(server.address).request(1, "echo", 1).body == 1
        server.stop(timeout=5)  # would take 30 s without the bound
        assert peer.read_until_eof() == b""


# ---------------------------------------------------------------------- handler options

def options_app(calls):
    app = App()

    @app.processor("timeout", timeout=0.1)
    def too_slow(event):
        eventlet.sleep(5)

    @app.processor("flaky", retries=2, backoff=0.01)
    def flaky(event):
        calls.append(event.id)
        if calls.count(event.id) < 3:
            raise ConnectionError("try again")
        return len(calls)

    @app.processor("doomed", retries=1, backoff=0.01)
    def doomed(event):
        calls.append(event.id)
        raise KeyError("never")

    @app.processor("cpu", blocking=True)
    def cpu(event):
        return sum(range(event.data))

    return app


def test_timeout_retry_and_blocking_options():
    calls = []
    with serve_in_thread(options_app(calls)) as server:
        peer = RawPeer(server.address)
        assert peer.request(1, "timeout").body[:2] == ("timeout", "HandlerTimeout")
        assert peer.request(2, "flaky").body == 3  # third attempt succeeds
        failed = peer.request(3, "doomed")
        assert failed.body[1] == "KeyError" and len(calls) == 5  # 1 + 1 retry
        assert peer.request(4, "cpu", 1000).body == sum(range(1000))


def ordering_app(ordered: bool):
    app = App()
    app.seen = {}

    @app.processor("ordered", ordered_by="key" if ordered else None)
    def handle(event):
        eventlet.sleep(random.random() / 500)
        app.seen.setdefault(event.data["key"], []).append(event.data["n"])

    return app


def run_ordering(app, keys=10, per_key=200):
    """Each key streams from its own connection (so its arrival order is defined) in small
    writes; the server splits the stream into several jobs that run in parallel."""
    with serve_in_thread(app, pool_size=32) as server:
        peers = [RawPeer(server.address) for _ in range(keys)]
        for start in range(0, per_key, 10):
            for key, peer in enumerate(peers):
                peer.send(b"".join(p.encode_event(n + 1, ["ordered", {"key": key, "n": n}])
                                   for n in range(start, start + 10)))
        for peer in peers:
            assert all(f.kind == p.ACK for f in peer.recv_frames(per_key))
    return app.seen


def test_ordered_by_key_keeps_arrival_order_per_key():
    seen = run_ordering(ordering_app(ordered=True))
    assert sorted(seen) == list(range(10))
    for key, ns in seen.items():
        assert ns == list(range(200)), f"key {key} out of order"


def test_without_ordered_by_order_is_not_kept():
    """The control for the test above: the same load does get reordered without the option."""
    seen = run_ordering(ordering_app(ordered=False))
    assert any(ns != sorted(ns) for ns in seen.values())


# ---------------------------------------------------------------------- review regressions

def hostile_app():
    app = App()

    @app.processor("own-timeout")
    def own_timeout(event):
        with eventlet.Timeout(0.01):  # a BaseException escaping the handler
            eventlet.sleep(1)

    @app.processor("exit")
    def leave(event):
        raise SystemExit(3)

    @app.processor("http")
    def http(event):
        import urllib.error

        raise urllib.error.HTTPError("http://x", 503, "Service Unavailable", {}, None)

    app.processor("echo")(lambda event: event.data)
    app.processor("slow")(lambda event: eventlet.sleep(event.data))
    return app


def test_base_exceptions_and_odd_error_codes_fail_the_event_not_the_server():
    with serve_in_thread(hostile_app(), pool_size=2) as server:
        peer = RawPeer(server.address)
        for corr in (1, 2, 3):  # more failures than pool slots: no worker may die
            peer.send(p.encode_batch(corr, [["own-timeout", 1], ["echo", 2]]))
            assert peer.recv_frames(1)[0].body[:2] == ("handler_error", "Timeout")
        assert peer.request(4, "exit").body[:2] == ("handler_error", "SystemExit")
        assert peer.request(5, "http").body[:2] == ("handler_error", "HTTPError")
        assert peer.request(6, "echo", "alive").body == "alive"
        assert server.dispatcher.busy == 0


def test_stop_is_bounded_even_with_a_full_queue_and_stuck_handlers():
    with serve_in_thread(hostile_app(), pool_size=1, queue_size=1, drain_timeout=0.5) as server:
        peers = [RawPeer(server.address) for _ in range(4)]
        for peer in peers:
            peer.send(p.encode_event(1, ["slow", 30]))
        started = time.monotonic()
        server.stop(timeout=5)
        assert time.monotonic() - started < 3


def test_a_peer_that_never_reads_replies_cannot_grow_the_servers_buffer():
    from evserver import connection as server_module

    with serve_in_thread(hostile_app(), idle_timeout=0) as server:
        s = socket.create_connection(server.address)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reply = b"x" * 60_000
        frame = p.encode_event(1, ["echo", reply], request=True)
        stop = time.monotonic() + 2
        s.settimeout(0.2)
        sent = 0
        try:
            while time.monotonic() < stop:
                s.sendall(frame)
                sent += 1
        except (TimeoutError, OSError):
            pass  # the server stopped reading us: that is the point
        (conn,) = [c for c in server.connections]
        assert conn.out_bytes <= server_module._OUT_LIMIT + 2 * len(reply)
        assert sent * len(reply) > server_module._OUT_LIMIT  # we did try to overflow it
        s.close()
