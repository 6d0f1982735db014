"""Shared-key authentication, protected mode and error hygiene, over real loopback sockets.

Servers run in-process (``serve_in_thread``) except where the CLI itself is under test.
Every wait is bounded by a socket timeout or the handshake timeout under test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import APPS, REPO

from evserver import App, Client
from evserver import auth as a
from evserver import protocol as p
from evserver.auth import Authenticator, AuthError
from evserver.config import load_config
from evserver.errors import ConfigError, RemoteError
from evserver.security import configured_keys, exposure_problem, loopback_only
from evserver.testing import serve_in_thread

KEY = "k" * 32
OLD, NEW = "old-secret-0123456789", "new-secret-0123456789"


def keys(**by_id: str) -> dict[str, object]:
    """The settings accepting these shared keys, by key id."""
    return {"security.shared_keys": by_id}


def make_app() -> App:
    app = App()
    app.seen = []

    @app.processor("echo")
    def echo(event):
        app.seen.append(event.data)
        return event.data

    @app.processor("boom")
    def boom(event):
        secret_local = "do-not-leak"  # noqa: F841 - must never reach the client
        raise ValueError("it broke")

    return app


def hello(sock: socket.socket, reader: p.FrameReader) -> p.Frame:
    while (frame := reader.next_frame()) is None:
        data = sock.recv(65536)
        assert data, "EOF before a frame"
        reader.receive_data(data)
    return frame


def frames_until_eof(sock: socket.socket, reader: p.FrameReader) -> list[p.Frame]:
    """Frames until EOF; a reset (we sent data the server never read) ends it too."""
    out = []
    try:
        while data := sock.recv(65536):
            reader.receive_data(data)
            out.extend(reader)
    except ConnectionResetError:
        pass
    return out


# ------------------------------------------------------------------ sans-I/O handshake


def test_handshake_round_trip_and_tampering() -> None:
    auth = Authenticator({"a": KEY, "b": OLD})
    snonce = a.new_nonce()
    info, cnonce = a.client_hello(KEY.encode(), None, snonce)
    key_id, reply = auth.verify(snonce, info)
    assert key_id == "a"
    a.verify_server(KEY.encode(), snonce, cnonce, reply)
    with pytest.raises(AuthError):  # a proof for another connection's nonce
        auth.verify(a.new_nonce(), info)
    with pytest.raises(AuthError):  # the named key is not the one used
        auth.verify(snonce, {"auth": {**info["auth"], "key_id": "b"}})
    with pytest.raises(AuthError):
        auth.verify(snonce, {"auth": {**info["auth"], "key_id": "nope"}})
    with pytest.raises(AuthError):  # a server without the key cannot answer
        a.verify_server(KEY.encode(), snonce, cnonce, {"proof": b"\0" * 32})
    with pytest.raises(AuthError):  # a reflected client proof is not a server proof
        a.verify_server(KEY.encode(), snonce, cnonce, {"proof": info["auth"]["proof"]})
    for bad in (None, {}, {"auth": 1}, {"auth": {"cnonce": b"x", "proof": b""}},
                {"auth": {"cnonce": cnonce, "proof": "str"}},
                {"auth": {"key_id": 5, "cnonce": cnonce, "proof": b""}}):
        with pytest.raises(AuthError):
            auth.verify(snonce, bad)
    with pytest.raises(ValueError):
        Authenticator({"short": "x"})


# ------------------------------------------------------------------ over the wire


def test_right_key_round_trip_and_server_info() -> None:
    app = make_app()
    with serve_in_thread(app, settings=keys(default=KEY)) as server:
        with Client(*server.address, timeout=5, shared_key=KEY) as client:
            assert client.request("echo", {"x": 1}) == {"x": 1}
            assert client.server_info["auth"] == "hmac-sha256"
            client.send_many([("echo", i) for i in range(50)], ack=True)
        assert server.counters["auth_failures"] == 0
    assert len(app.seen) == 51


@pytest.mark.parametrize("key,key_id", [("w" * 32, None), (KEY, "other"), ("w" * 32, "default")])
def test_wrong_key_refused_nothing_dispatched(key: str, key_id: str | None) -> None:
    app = make_app()
    with serve_in_thread(app, settings=keys(default=KEY, other=OLD)) as server:
        with pytest.raises(AuthError), Client(*server.address, timeout=5, shared_key=key,
                                              key_id=key_id, retries=0) as client:
            client.request("echo", 1)
        assert server.counters["auth_failures"] == 1
    assert app.seen == []


def test_no_key_gets_auth_failed_and_nothing_dispatched() -> None:
    app = make_app()
    with serve_in_thread(app, settings=keys(default=KEY)) as server:
        with pytest.raises(RemoteError) as info, Client(*server.address, timeout=5,
                                                        retries=0) as client:
            client.request("echo", 1)
        assert info.value.code == "auth_failed"
        # A raw peer that pipelines events behind nothing: one ERROR, then EOF.
        with socket.create_connection(server.address, timeout=5) as sock:
            reader = p.FrameReader(p.CLIENT_RECEIVES)
            assert hello(sock, reader).body["auth"] == "hmac-sha256"
            sock.sendall(p.encode_event(0, ["echo", 2]) + p.encode_event(1, ["echo", 3],
                                                                          request=True))
            frames = frames_until_eof(sock, reader)
        assert [(f.kind, f.corr, f.body[0]) for f in frames] == [(p.ERROR, 0, "auth_failed")]
        assert server.counters["auth_failures"] == 2
    assert app.seen == []


def test_replayed_handshake_refused() -> None:
    """A recorded client HELLO is bound to the nonce of the connection it was made for."""
    app = make_app()
    with serve_in_thread(app, settings=keys(default=KEY)) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            reader = p.FrameReader(p.CLIENT_RECEIVES)
            snonce = hello(sock, reader).body["nonce"]
            info, _ = a.client_hello(KEY.encode(), None, snonce)
            recorded = p.encode_hello(info) + p.encode_event(1, ["echo", "legit"], request=True)
            sock.sendall(recorded)
            assert hello(sock, reader).body.keys() == {"proof"}
            assert reader.next_frame() or hello(sock, reader)  # the reply to "legit"
        with socket.create_connection(server.address, timeout=5) as sock:
            reader = p.FrameReader(p.CLIENT_RECEIVES)
            assert hello(sock, reader).body["nonce"] != snonce
            sock.sendall(p.encode_hello(info) + p.encode_event(1, ["echo", "replay"],
                                                              request=True))
            frames = frames_until_eof(sock, reader)
        assert [(f.kind, f.body[0]) for f in frames] == [(p.ERROR, "auth_failed")]
    assert app.seen == ["legit"]


def test_events_pipelined_behind_the_hello_are_served() -> None:
    app = make_app()
    with serve_in_thread(app, settings=keys(default=KEY)) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            reader = p.FrameReader(p.CLIENT_RECEIVES)
            snonce = hello(sock, reader).body["nonce"]
            info, cnonce = a.client_hello(KEY.encode(), "default", snonce)
            sock.sendall(p.encode_hello(info) + b"".join(
                p.encode_event(i, ["echo", i], request=True) for i in range(1, 21)))
            a.verify_server(KEY.encode(), snonce, cnonce, hello(sock, reader).body)
            replies = []
            while len(replies) < 20:
                replies.append(hello(sock, reader))
        assert sorted(f.body for f in replies) == list(range(1, 21))


def test_key_rotation_without_downtime() -> None:
    """Old and new keys side by side: clients with either work, by id or by trying all."""
    app = make_app()
    with serve_in_thread(app, settings=keys(old=OLD, new=NEW)) as server:
        for key, key_id in ((OLD, "old"), (NEW, "new"), (OLD, None), (NEW, None)):
            with Client(*server.address, timeout=5, shared_key=key, key_id=key_id) as client:
                assert client.request("echo", key_id) == key_id
    with serve_in_thread(app, settings=keys(new=NEW)) as server:  # old key retired
        with Client(*server.address, timeout=5, shared_key=NEW) as client:
            assert client.request("echo", "still") == "still"
        with pytest.raises(AuthError), Client(*server.address, timeout=5, shared_key=OLD,
                                              retries=0) as client:
            client.request("echo", "refused")
    assert "refused" not in app.seen


def test_client_refuses_a_server_that_does_not_authenticate() -> None:
    """A client with a key never sends events to a server that cannot prove it has it."""
    app = make_app()
    with serve_in_thread(app) as server, pytest.raises(AuthError), Client(
            *server.address, timeout=5, shared_key=KEY, retries=0) as client:
        client.send("echo", "leak?")
    assert app.seen == []


def test_slow_unauthenticated_peer_dropped_at_handshake_timeout() -> None:
    app = make_app()
    settings = {**keys(default=KEY), "security.handshake_timeout": 0.5}
    with serve_in_thread(app, settings=settings) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            reader = p.FrameReader(p.CLIENT_RECEIVES)
            hello(sock, reader)
            start = time.monotonic()
            frame = p.encode_hello({"auth": {"cnonce": b"x" * 16, "proof": b"y" * 32}})
            sock.sendall(frame[:-1])  # all but one byte, then silence
            frames = frames_until_eof(sock, reader)
            elapsed = time.monotonic() - start
        assert [(f.kind, f.body[0]) for f in frames] == [(p.ERROR, "handshake_timeout")]
        assert elapsed < 5
        assert server.counters["handshake_timeouts"] == 1
    assert app.seen == []


def test_unauthenticated_peer_holds_a_small_buffer_only() -> None:
    app = make_app()
    with serve_in_thread(app, settings=keys(default=KEY)) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            reader = p.FrameReader(p.CLIENT_RECEIVES)
            hello(sock, reader)
            big = p.encode_hello({"auth": {"pad": b"x" * 100_000}})
            try:
                sock.sendall(big)
            except OSError:
                pass  # the server may close before reading it all
            frames = frames_until_eof(sock, reader)
        # The ERROR may be lost to the reset caused by the unread rest of the frame.
        assert [(f.kind, f.body[0]) for f in frames] in ([(p.ERROR, "frame_too_large")], [])
        assert server.counters["protocol_errors"] == 1
    assert app.seen == []


def test_failures_are_logged_rate_limited_with_peer(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from evserver.logs import LogBudget

    budget = LogBudget(per_interval=3, interval=60)
    logger = logging.getLogger("evserver.security")
    with caplog.at_level(logging.WARNING, "evserver.security"):
        logged = [budget.warning(logger, "auth", "authentication failed for %s: %s",
                                 "127.0.0.1:5000", "wrong proof") for _ in range(10)]
    assert logged == [True] * 3 + [False] * 7
    assert caplog.text.count("authentication failed for 127.0.0.1:5000: wrong proof") == 3


# ------------------------------------------------------------------ error hygiene


@pytest.mark.parametrize("debug", [False, True])
def test_handler_errors_carry_type_and_message_only(debug: bool) -> None:
    with serve_in_thread(make_app(), settings={"security.debug": debug}) as server, Client(
            *server.address, timeout=5) as client, pytest.raises(RemoteError) as info:
        client.request("boom")
    assert info.value.type == "ValueError"
    if debug:
        assert "Traceback" in info.value.message and "test_security.py" in info.value.message
    else:
        assert info.value.message == "it broke"


# ------------------------------------------------------------------ config and protected mode


def test_keys_from_config_and_env(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'[security.shared_keys]\nold = "{OLD}"\nnew = "{NEW}"\n')
    cfg = load_config(f, env={"EVSERVER_SHARED_KEY": KEY})
    assert configured_keys(cfg) == {"old": OLD, "new": NEW, "default": KEY}
    cfg = load_config(env={"EVSERVER_SECURITY_SHARED_KEYS": f'{{"a": "{OLD}"}}'})
    assert configured_keys(cfg) == {"a": OLD}
    with pytest.raises(ConfigError) as info:
        load_config(env={"EVSERVER_SHARED_KEY": "short-secret"})
    assert "short-secret" not in str(info.value)  # secrets stay out of error messages
    with pytest.raises(ConfigError):
        f.write_text('[security.shared_keys]\na = 5\n')
        load_config(f, env={})


def test_exposure_check() -> None:
    assert loopback_only("127.0.0.1") and loopback_only("::1") and loopback_only("localhost")
    assert not loopback_only("0.0.0.0") and not loopback_only("")
    assert exposure_problem(load_config(env={})) is None
    exposed = load_config(env={}, overrides={"server.host": "0.0.0.0"})
    assert "--insecure" in (exposure_problem(exposed) or "")
    assert exposure_problem(exposed.replace(**{"security.insecure": True})) is None
    assert exposure_problem(exposed.replace(**{"security.shared_key": KEY})) is None


def _serve_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EVSERVER_")}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "evserver", "serve", *args],
                          capture_output=True, text=True, timeout=30, env=environ,
                          cwd=REPO / "tests", stdin=subprocess.DEVNULL)


def test_serve_refuses_non_loopback_without_key_before_binding() -> None:
    # A nonexistent app: reaching the app import would exit 4, binding would log "listening".
    result = _serve_cli("no_such_module:app", "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2, result.stderr
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "--insecure" in result.stderr and "shared key" in result.stderr
    assert "listening" not in result.stderr
    # The same through the environment, and with workers (the master checks first).
    result = _serve_cli("no_such_module:app", "--port", "0", "--workers", "2",
                        env={"EVSERVER_SERVER_HOST": "0.0.0.0"})
    assert result.returncode == 2 and "refusing to listen" in result.stderr


def test_serve_with_insecure_or_key_passes_the_check() -> None:
    """--insecure (or a key) lets serve go on; shown with an app that fails to import, so
    nothing is ever bound to 0.0.0.0 here."""
    for extra, env in ((["--insecure"], None), ([], {"EVSERVER_SHARED_KEY": KEY})):
        result = _serve_cli("no_such_module:app", "--host", "0.0.0.0", "--port", "0",
                            "--no-admin-enabled", *extra, env=env)
        assert result.returncode == 4, result.stderr  # got as far as importing the app
        assert "refusing" not in result.stderr


def test_serve_with_shared_key_end_to_end(server_factory) -> None:
    server = server_factory(f"{APPS}/basic.py:app", "--no-admin-enabled",
                            env={"EVSERVER_SHARED_KEY": KEY})
    with Client(*server.address, timeout=5, shared_key=KEY) as client:
        assert client.request("echo", [1, 2]) == [1, 2]
    result = subprocess.run(
        [sys.executable, "-m", "evserver", "request", "echo", '{"a": 1}',
         "--port", str(server.port)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
        env={**os.environ, "EVSERVER_SHARED_KEY": KEY})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '{"a": 1}'
    result = subprocess.run(
        [sys.executable, "-m", "evserver", "ping", "--port", str(server.port),
         "--shared-key", "x" * 20],
        capture_output=True, text=True, timeout=30, cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("EVSERVER_")})
    assert result.returncode == 1 and "authentication failed" in result.stderr


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                out.append(int(entry))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_share_the_keys_and_keep_them_off_the_command_line(server_factory) -> None:
    server = server_factory(f"{APPS}/basic.py:app", "--workers", "2", "--no-admin-enabled",
                            env={"EVSERVER_SHARED_KEY": KEY})
    pids = set()
    for _ in range(8):  # SO_REUSEPORT spreads connections; every worker must know the key
        with Client(*server.address, timeout=5, shared_key=KEY) as client:
            pids.add(client.request("pid"))
        with pytest.raises(AuthError), Client(*server.address, timeout=5, shared_key="z" * 32,
                                              retries=0) as client:
            client.request("pid")
    workers = _children(server.proc.pid)
    assert pids <= set(workers) and len(workers) == 2
    for pid in [server.proc.pid, *workers]:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert KEY.encode() not in cmdline


def test_protocol_doc_test_vector() -> None:
    """docs/protocol.md's test vector, for other-language clients, stays true."""
    key, snonce, cnonce = b"0123456789abcdef", b"\0" * 16, b"\xff" * 16
    doc = (REPO / "docs" / "protocol.md").read_text()
    assert a.client_proof(key, snonce, cnonce).hex() in doc
    assert a.server_proof(key, snonce, cnonce).hex() in doc


def test_exposure_check_covers_the_forward_listener() -> None:
    forward = {"forward.enabled": True, "forward.host": "0.0.0.0"}
    cfg = load_config(env={}, overrides=forward)
    assert "Fluentd Forward" in (exposure_problem(cfg) or "")
    assert exposure_problem(cfg.replace(**{"forward.shared_key": "fwd-secret"})) is None
    assert exposure_problem(cfg.replace(**{"security.insecure": True})) is None
