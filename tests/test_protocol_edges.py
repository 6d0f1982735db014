"""Protocol edges a client written from docs/protocol.md alone runs into: what the server
does with an empty event id, and what its ERROR frames say about a bad frame or a failed
handshake. Real servers over loopback, exact bytes on the wire (``RawPeer``)."""

from __future__ import annotations

import socket

import msgpack
import pytest
from conftest import APPS, ServerFactory, ServerProcess
from rawpeer import RawPeer

from evserver import Client, RemoteError
from evserver import protocol as p

KEY = "k" * 24


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory(f"{APPS}/basic.py:app")


def refusal(server: ServerProcess, wire: bytes) -> tuple[str, str]:
    """Send ``wire`` on a fresh connection: the connection-level ERROR's (code, message),
    after which the server must close the connection."""
    peer = RawPeer(server.address)
    try:
        peer.send(wire)
        (frame,) = peer.recv_frames(1)
        assert frame.kind == p.ERROR and frame.corr == 0, frame
        assert peer.read_until_eof() == b""
        return frame.body[0], frame.body[2]
    finally:
        peer.close()


# ------------------------------------------------------------- point 8: an empty event id


def test_empty_event_id_is_refused_not_kept(server: ServerProcess) -> None:
    for wire in (p.encode_event(1, ["echo", 1, ""], request=True),
                 p.encode_batch(1, [["echo", 1, "ok-id"], ["echo", 2, ""]]),
                 p.encode_event(0, ["echo", 1, "", 1.5])):
        code, message = refusal(server, wire)
        assert (code, message) == ("bad_frame", "event id must be a non-empty string or nil")
    peer = RawPeer(server.address)  # a real id is still the event's
    try:
        peer.send(p.encode_event(7, ["event", None, "given"], request=True))
        (reply,) = peer.recv_frames(1)
        assert reply.kind == p.REPLY and reply.body["id"] == "given"
    finally:
        peer.close()


# ------------------------------------------- point 12: errors in the client's terms


@pytest.mark.parametrize(("wire", "expected"), [
    (msgpack.packb([1, 0, ["echo", {1: "x"}]]),
     "a map has an integer key; map keys must be strings"),
    (msgpack.packb([1, 0, ["echo", {(1, 2): "x"}]]),
     "a map has an array key; map keys must be strings"),
    (b"\xc1", "bytes that are not msgpack (a byte that starts no msgpack value)"),
    (msgpack.packb([3, 2**64 - 1, ["echo", 1]]),
     "REQUEST needs a correlation id: an integer from 1 to 9223372036854775807 (2^63-1), "
     "got 18446744073709551615"),
    (msgpack.packb([3, 0, ["echo", 1]]),
     "REQUEST needs a correlation id: an integer from 1 to 9223372036854775807 (2^63-1), "
     "got 0"),
    (msgpack.packb([1, "x", ["echo", 1]]),
     "EVENT needs a correlation id: an integer from 0 to 9223372036854775807 (2^63-1), "
     "got 'x'"),
    (b"\x91" * 3000, "values are nested too deeply to decode"),
])
def test_bad_frames_are_explained_in_protocol_terms(server: ServerProcess, wire: bytes,
                                                    expected: str) -> None:
    code, message = refusal(server, wire)
    assert code == "bad_frame" and message == expected
    for internal in ("strict_map_key", "Error", "> 0", "undecodable"):
        assert internal not in message


# ---------------------------------------------- point 13: a hint for a client without key


def test_auth_failure_hints_at_the_key_only_when_none_was_sent(
        server_factory: ServerFactory) -> None:
    server = server_factory(f"{APPS}/basic.py:app", env={"EVSERVER_SHARED_KEY": KEY})
    with (Client(*server.address, timeout=5, retries=0) as keyless,
          pytest.raises(RemoteError) as info):
        keyless.request("echo", 1)
    assert info.value.code == "auth_failed"
    assert "requires a shared key and the client sent none" in info.value.message
    assert "EVSERVER_SHARED_KEY" in info.value.message and "--key-id" in info.value.message
    with socket.create_connection(server.address, timeout=5) as sock:  # a HELLO, no auth
        sock.sendall(p.encode_hello({}))
        reader = p.FrameReader(p.CLIENT_RECEIVES)
        frames: list[p.Frame] = []
        while len(frames) < 2 and (data := sock.recv(4096)):
            reader.receive_data(data)
            frames.extend(reader)
        assert frames[1].kind == p.ERROR and "EVSERVER_SHARED_KEY" in frames[1].body[2]
    with (Client(*server.address, timeout=5, retries=0, shared_key="w" * 24) as wrong,
          pytest.raises(PermissionError) as denied):
        wrong.ping()
    assert str(denied.value).endswith(": authentication failed")  # a wrong key: no more
