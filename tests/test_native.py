"""The native protocol object, sans-I/O: its state table, the handshake and units of work."""

from __future__ import annotations

import pytest
from rawpeer import RawPeer

from evserver import App
from evserver import protocol as p
from evserver.auth import Authenticator, client_hello
from evserver.errors import AuthError, NoKey, ProtocolError, StateError, TooManyPending
from evserver.metrics import new_counters
from evserver.native import (
    AUTH,
    AWAIT_HELLO,
    CLOSED,
    CLOSING,
    OPEN,
    TRANSITIONS,
    NativeProtocol,
)
from evserver.states import Lifecycle
from evserver.testing import serve_in_thread

KEY = "k" * 32


def native(auth: Authenticator | None = None, max_pending: int = 8) -> NativeProtocol:
    return NativeProtocol(hello_info={"server": "test"}, max_frame_bytes=1 << 20,
                          max_pending_replies=max_pending, auth=auth,
                          counters=new_counters("server"), job_events=64, peer="peer")


def test_the_table_is_the_lifecycle() -> None:
    assert {(s, e) for (s, e) in TRANSITIONS} >= {
        (AWAIT_HELLO, "hello"), (AUTH, "verified"), (OPEN, "frame"), (OPEN, "error")}
    assert (OPEN, "hello") not in TRANSITIONS
    life = Lifecycle(TRANSITIONS, OPEN)
    with pytest.raises(StateError, match="verified is not allowed in state OPEN"):
        life.fire("verified")
    with pytest.raises(ProtocolError):
        life.fire("hello", unexpected=ProtocolError)
    assert life.fire("eof") == CLOSED


def test_the_optional_first_hello_then_work() -> None:
    proto = native()
    assert proto.data_to_send().startswith(p.encode_hello({"server": "test"})[:3])
    proto.receive_data(p.encode_hello({"client": "x"}) + p.encode_event(1, ["a", 1]))
    [(events, requests, frames)] = proto.next_jobs()
    assert [e.type for e in events] == ["a"] and not requests and frames[0].corr == 1
    assert proto.lifecycle.state == OPEN and proto.replies_pending == 1


def test_a_hello_after_the_start_is_an_error_after_the_frames_before_it() -> None:
    proto = native()
    proto.receive_data(p.encode_event(0, ["a", 1]) + p.encode_hello({}) + p.encode_ping(2))
    [(events, _, _)] = proto.next_jobs()  # the event before the HELLO still runs
    assert [e.type for e in events] == ["a"]
    with pytest.raises(ProtocolError, match="HELLO after the start"):
        proto.next_jobs()
    assert proto.lifecycle.state == CLOSING
    with pytest.raises(ProtocolError):
        proto.receive_data(p.encode_ping(3))  # nothing more is read


def test_with_keys_the_first_frame_must_authenticate() -> None:
    proto = native(Authenticator({"default": KEY}))
    assert proto.opening
    proto.receive_data(p.encode_event(1, ["a", 1]))
    with pytest.raises(AuthError):
        proto.next_jobs()
    assert proto.lifecycle.state == CLOSING
    assert b"this server requires a shared key" in proto.error_bytes(NoKey("no HELLO"))
    assert b"this server" not in proto.error_bytes(AuthError("wrong proof"))  # only "no"


def test_authenticating_then_pipelined_frames_become_work() -> None:
    proto = native(Authenticator({"default": KEY}))
    reader = p.FrameReader(p.CLIENT_RECEIVES)
    reader.receive_data(proto.data_to_send())
    nonce = reader.next_frame().body["nonce"]
    info, _ = client_hello(KEY.encode(), None, nonce)
    proto.receive_data(p.encode_hello(info) + p.encode_event(0, ["after", 1]))
    assert proto.next_jobs() == [] and not proto.opening  # the handshake, and nothing else
    reader.receive_data(proto.data_to_send())
    assert set(reader.next_frame().body) == {"proof"}  # the server's proving HELLO
    [(events, _, _)] = proto.next_jobs()
    assert [e.type for e in events] == ["after"]


def test_too_many_pending_replies() -> None:
    proto = native(max_pending=2)
    proto.receive_data(b"".join(p.encode_ping(n) for n in range(1, 4)))
    with pytest.raises(TooManyPending) as info:
        proto.next_jobs()
    assert info.value.code == "overloaded" and proto.lifecycle.state == CLOSING


def test_live_hello_after_the_start_gets_bad_frame() -> None:
    app = App()

    @app.processor("echo")
    def echo(event):  # type: ignore[no-untyped-def]
        return event.data

    with serve_in_thread(app) as server:
        peer = RawPeer(server.address)
        peer.send(p.encode_event(1, ["echo", 1], request=True) + p.encode_hello({}))
        frames = peer.recv_frames(2)  # the REPLY first, then the ERROR
        assert [f.kind for f in frames] == [p.REPLY, p.ERROR]
        assert frames[1].body[0] == "bad_frame" and "HELLO after the start" in frames[1].body[2]
        peer.close()
        assert server.counters["protocol_errors"] == 1
