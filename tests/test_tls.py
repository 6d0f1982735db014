"""TLS on the event port and the admin port, with a CA made at test time (tests/tlscerts.py)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from conftest import APPS, REPO, evserver_env, free_port, launch
from tlscerts import Pki, make_pki

from evserver import App, Client
from evserver import protocol as p
from evserver._eventlet import eventlet
from evserver.errors import ClientConnectionError
from evserver.testing import serve_in_thread
from evserver.tls import client_context, server_context

KEY = "tls-and-a-key-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-other"), "other")


def make_app() -> App:
    app = App()
    app.seen = []
    app.started = threading.Event()

    @app.processor("echo")
    def echo(event):
        app.seen.append(event.data)
        return event.data

    @app.processor("slow")
    def slow(event):
        app.started.set()
        eventlet.sleep(event.data)  # the handler's own work, not a wait in the test
        return "done"

    return app


def serve_tls(pki: Pki, *args: str, stderr: int = subprocess.DEVNULL
              ) -> tuple[subprocess.Popen[bytes], int, int]:
    """``evserver serve`` the basic app with the [tls] certificate (plus ``args``); return the
    process, its event port and its admin port."""
    port, admin_port = free_port(), free_port()
    proc = launch("serve", f"{APPS}/basic.py:app", "--port", str(port),
                  "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                  "--admin-port", str(admin_port), *args, cwd=pki.ca.parent, stderr=stderr)
    return proc, port, admin_port


def until_closed(sock: socket.socket) -> bytes:
    """What a plaintext peer of a TLS port gets: maybe an alert, then EOF or a reset."""
    received = b""
    try:
        while chunk := sock.recv(100):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_context_defaults(pki: Pki) -> None:
    ctx = server_context(pki.server_cert, pki.server_key, ca=pki.ca, require_client_cert=True)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED  # the eventlet.wrap_ssl pitfall avoided
    assert server_context(pki.server_cert, pki.server_key).verify_mode == ssl.CERT_NONE
    client = client_context(pki.ca)
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    with pytest.raises(ValueError):
        server_context(pki.server_cert, pki.server_key, require_client_cert=True)


def test_tls_round_trip(pki: Pki) -> None:
    app = make_app()
    with serve_in_thread(app, settings=pki.settings()) as server:
        with Client(*server.address, timeout=5, tls=True, cafile=str(pki.ca)) as client:
            assert client.request("echo", {"big": "x" * 200_000}) == {"big": "x" * 200_000}
            client.send_many([("echo", i) for i in range(100)], ack=True)
        with Client(*server.address, timeout=5, ssl=client_context(pki.ca),
                    server_hostname="localhost") as client:
            assert client.ping() > 0
    assert len(app.seen) == 101


def test_wrong_ca_refused(pki: Pki, other_pki: Pki) -> None:
    app = make_app()
    with serve_in_thread(app, settings=pki.settings()) as server, pytest.raises(
            ClientConnectionError, match="CERTIFICATE_VERIFY_FAILED"), Client(
            *server.address, timeout=5, cafile=str(other_pki.ca), retries=3) as client:
        client.request("echo", "secret")
    assert app.seen == []


def test_client_cert_required(pki: Pki, other_pki: Pki) -> None:
    app = make_app()
    with serve_in_thread(app, settings=pki.settings(require_client_cert=True)) as server:
        with pytest.raises(ClientConnectionError), Client(
                *server.address, timeout=5, cafile=str(pki.ca), retries=0) as client:
            client.request("echo", "no cert")
        with pytest.raises(ClientConnectionError), Client(  # a cert from another CA
                *server.address, timeout=5, cafile=str(pki.ca), certfile=str(other_pki.client_cert),
                keyfile=str(other_pki.client_key), retries=0) as client:
            client.request("echo", "foreign cert")
        with Client(*server.address, timeout=5, cafile=str(pki.ca),
                    certfile=str(pki.client_cert), keyfile=str(pki.client_key)) as client:
            assert client.request("echo", "with cert") == "with cert"
        assert server.counters["tls_failures"] >= 2
    assert app.seen == ["with cert"]


def test_plaintext_peer_on_tls_port(pki: Pki) -> None:
    app = make_app()
    with serve_in_thread(app, settings=pki.settings(**{"security.handshake_timeout": 0.5})
                         ) as server, socket.create_connection(
            server.address, timeout=10) as sock:
        sock.sendall(p.encode_event(1, ["echo", "plain"], request=True))
        assert not until_closed(sock).startswith(b"\x93")  # never a REPLY
        assert server.counters["handshake_timeouts"] == 1  # a partial TLS record: it waits
    assert app.seen == []


def test_tls_and_shared_key_together(pki: Pki) -> None:
    app = make_app()
    with serve_in_thread(app, settings=pki.settings(**{"security.shared_key": KEY})
                         ) as server, Client(
            *server.address, timeout=5, cafile=str(pki.ca), shared_key=KEY) as client:
        assert client.request("echo", "both") == "both"


def test_graceful_stop_keeps_tls_replies_encrypted(pki: Pki) -> None:
    """Stopping shuts the read side of each connection; on TLS sockets that must not drop
    the TLS layer, or the in-flight replies would go out in plaintext."""
    app = make_app()
    with serve_in_thread(app, settings=pki.settings()) as server, Client(
            *server.address, timeout=10, cafile=str(pki.ca), retries=0) as client:
        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(client.request("slow", 0.3)))
        worker.start()
        assert app.started.wait(10)
        server.stop()
        worker.join(10)
        assert result == ["done"]


@pytest.mark.parametrize("workers", ["1", "2"])  # green admin / the master's threaded one
def test_serve_tls_event_and_admin_ports(pki: Pki, workers: str) -> None:
    """``serve`` with [tls] flags: both ports speak TLS. Started by hand, since the
    server_factory fixture's readiness probe speaks plaintext; the client's bounded
    reconnection backoff waits for the port instead."""
    env = evserver_env()
    proc, port, admin_port = serve_tls(pki, "--workers", workers, stderr=subprocess.PIPE)
    try:
        with Client("127.0.0.1", port, timeout=5, cafile=str(pki.ca), retries=40,
                    backoff=0.05, backoff_max=0.25) as client:
            assert client.request("echo", "over tls") == "over tls"
        ctx = client_context(pki.ca)
        with urllib.request.urlopen(f"https://127.0.0.1:{admin_port}/stats", context=ctx,
                                    timeout=10) as resp:
            stats = json.loads(resp.read())
        assert stats["totals"]["counters"]["connections_total"] >= 1
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
            # plain HTTP to the TLS admin port
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=10).read()
        cli = subprocess.run(
            [sys.executable, "-m", "evserver", "ping", "--port", str(port), "--tls-ca",
             str(pki.ca)], capture_output=True, text=True, timeout=30, env=env)
        assert cli.returncode == 0 and "pong" in cli.stdout, cli.stderr
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert b"admin listening on https://" in err, err.decode()


def test_serve_bad_tls_files_exit_2(tmp_path: Path) -> None:
    env = evserver_env()
    result = subprocess.run(
        [sys.executable, "-m", "evserver", "serve", "x:app", "--port", "0", "--tls-cert",
         str(tmp_path / "missing.pem")], capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 2 and "[tls]" in result.stderr


def test_forward_over_tls_acks_and_turns_plaintext_away(pki: Pki) -> None:
    """Fluent Bit's ``tls on``: the Forward listener speaks TLS with the [tls] certificate."""
    import msgpack

    app = make_app()
    forward = {"forward.enabled": True, "forward.port": 0, "forward.tls": True,
               "security.handshake_timeout": 0.5}
    with serve_in_thread(app, settings=pki.settings(**forward)) as server:
        assert server.forward is not None
        address = server.forward.address
        with client_context(pki.ca).wrap_socket(socket.create_connection(address, timeout=10),
                                                server_hostname="localhost") as tls:
            tls.sendall(msgpack.packb(["echo", 1700000000, {"n": 1}])
                        + msgpack.packb(["echo", 1700000000, {"n": 2}, {"chunk": "c1"}]))
            assert msgpack.unpackb(tls.recv(100)) == {"ack": "c1"}
        with socket.create_connection(address, timeout=10) as plain:
            plain.sendall(msgpack.packb(["echo", 1700000000, {"n": 3}, {"chunk": "c2"}]))
            assert b"ack" not in until_closed(plain)
        assert server.counters["tls_failures"] + server.counters["handshake_timeouts"] == 1
    assert app.seen == [{"n": 1}, {"n": 2}]


def test_forward_tls_needs_a_certificate(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "evserver", "serve", f"{APPS}/basic.py:app", "--port", "0",
         "--forward-enabled", "--forward-port", "0", "--forward-tls"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=evserver_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "forward.tls: TLS needs a certificate (tls.cert)" in result.stderr


def test_admin_cli_presents_a_client_certificate_when_the_server_demands_one(pki: Pki) -> None:
    env = evserver_env()
    proc, port, admin_port = serve_tls(pki, "--tls-ca", str(pki.ca), "--tls-require-client-cert")
    try:
        with Client("127.0.0.1", port, timeout=5, cafile=str(pki.ca),
                    certfile=str(pki.client_cert), keyfile=str(pki.client_key), retries=40,
                    backoff=0.05, backoff_max=0.25) as client:
            assert client.ping() > 0  # the server is up
        stats = [sys.executable, "-m", "evserver", "stats", "--json",
                 "--admin", f"https://127.0.0.1:{admin_port}"]
        env["EVSERVER_ADMIN_CA"] = str(pki.ca)
        refused = subprocess.run(stats, capture_output=True, text=True, timeout=30, env=env,
                                 cwd=pki.ca.parent)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        env["EVSERVER_ADMIN_CERT"] = str(pki.client_cert)
        env["EVSERVER_ADMIN_KEY"] = str(pki.client_key)
        ok = subprocess.run(stats, capture_output=True, text=True, timeout=30, env=env,
                            cwd=pki.ca.parent)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["totals"]["counters"]["connections_total"] >= 1
    finally:
        proc.terminate()
        proc.wait(15)
