"""The blocking client and the client CLI against real server processes (see conftest.py),
plus a scripted fake server where a test must control the exact answers and their order."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import APPS, REPO, ServerFactory, ServerProcess, crash_mid_stream, free_port

from evserver import Client, RemoteError
from evserver import protocol as p
from evserver.cli import main
from evserver.errors import ClientConnectionError, FrameTooLarge

pytestmark = pytest.mark.timeout(60)

BASIC = f"{APPS}/basic.py:app"


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory(BASIC)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(*server.address, timeout=10) as c:
        yield c


def recorded(path: Path) -> list[tuple[str, Any]]:
    """The (id, data) pairs the basic app's recorder wrote, in processing order."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [(eid, json.loads(data)) for eid, data in (line.split("\t", 1) for line in lines)]


# ---------------------------------------------------------------------- send / request


def test_fire_and_forget_events_are_processed(client: Client) -> None:
    for i in range(100):
        client.send("tick", i)
    assert client.request("counts", {"tick": 100})["tick"] == 100


def test_send_with_ack_returns_after_processing(client: Client) -> None:
    client.send("tick", ack=True)
    client.send("tick", {"x": 1}, ack=True, meta={"k": "v"})
    assert client.request("counts")["tick"] == 2  # no waiting: the acks came after the work


def test_events_carry_client_assigned_ids_times_and_meta(client: Client) -> None:
    seen = client.request("event", "d", meta={"trace": "abc"})
    assert seen["meta"] == {"trace": "abc"} and seen["data"] == "d"
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+-[0-9a-f]+", seen["id"])
    assert abs(seen["time"] - time.time()) < 60
    first, second = client.send("tick", ack=True), client.send("tick", ack=True)
    assert first != second
    assert client.send("tick", ack=True, id="mine") == "mine"


MSGPACK_VALUES = [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, -0.0, float("inf"),
    "", "héllo ☃", b"", b"\x00\xff" * 100, [], [1, [2, [None]]], {}, {"a": {"b": [b"x", 1.25]}},
    "x" * 100_000,
]


@pytest.mark.parametrize("value", MSGPACK_VALUES, ids=lambda v: type(v).__name__)
def test_request_echoes_every_msgpack_type_unchanged(client: Client, value: Any) -> None:
    reply = client.request("echo", value)
    assert reply == value and type(reply) is type(value)


def test_remote_error_from_a_failing_processor(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.request("fail", "bad id")
    assert (info.value.type, info.value.code) == ("ValueError", "handler_error")
    assert info.value.message.endswith("bad id")  # after the server's dead-letter note
    with pytest.raises(RemoteError, match=r"ValueError: .*nope"):
        client.send("fail", "nope", ack=True)
    assert client.request("echo", 1) == 1  # the connection is still fine


def test_remote_error_for_a_missing_processor(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.request("no.such.type")
    assert info.value.type == "RoutingError" and info.value.code == "no_handler"
    assert "no.such.type" in info.value.message


def test_bad_frame_is_raised_not_retried_and_the_client_recovers(client: Client) -> None:
    pid = client.request("pid")
    with pytest.raises(RemoteError) as info:  # int map keys are refused by the server
        client.request("echo", {1: "x"})
    assert info.value.code == "bad_frame"
    assert client.request("pid") == pid  # reconnected on the next call


def test_a_frame_over_the_limit_is_refused_locally(client: Client) -> None:
    with pytest.raises(FrameTooLarge):
        client.send("echo", b"x" * (1 << 20))
    assert client.request("echo", "still fine") == "still fine"


def test_request_timeout_abandons_the_request(client: Client) -> None:
    with pytest.raises(TimeoutError, match="no answer"):
        client.request("sleep", 0.5, timeout=0.05)
    assert client.request("echo", 2) == 2  # the late reply to the abandoned one is ignored


def test_ping_and_flush(client: Client) -> None:
    client.flush()  # nothing sent yet: no connection needed
    rtt = client.ping()
    assert 0 < rtt < 5
    client.send("tick")
    client.flush()


# ---------------------------------------------------------------------- send_many


def test_send_many_fire_and_forget(client: Client) -> None:
    n = client.send_many(("many.ff", i) for i in range(10_000))
    assert n == 10_000
    assert client.request("counts", {"many.ff": n})["many.ff"] == n


def test_send_many_with_ack(client: Client) -> None:
    events = [("many.ack", i) if i % 2 else ("many.ack", i, {"k": str(i)}) for i in range(10_000)]
    assert client.send_many(events, ack=True, batch_size=300) == 10_000
    assert client.request("counts")["many.ack"] == 10_000


def test_send_many_bounds_frames_by_bytes(client: Client) -> None:
    big = b"x" * 200_000  # 500 of these would be a 100 MB frame
    assert client.send_many((("many.big", big) for _ in range(30)), ack=True) == 30
    assert client.request("counts")["many.big"] == 30


def test_send_many_raises_after_every_batch_settled(client: Client) -> None:
    events = [("sleep", 0.2)] + [("tick", i) for i in range(50)] + [("fail", "batch 3")]
    with pytest.raises(RemoteError, match="batch 3") as info:
        client.send_many(events * 3, ack=True, batch_size=10)
    assert "3 of 16 batches failed" in info.value.__notes__[0]
    assert client.request("counts")["tick"] == 150  # the failures did not stop the rest


# ---------------------------------------------------------------------- reconnecting


def test_acked_events_survive_a_server_crash(server_factory: ServerFactory,
                                             tmp_path: Path) -> None:
    """SIGKILL the server while a client streams acked events and batches, restart it on the
    same port: every event is processed at least once, the re-sent ones under their ids."""
    record = tmp_path / "seen"
    ids: list[str] = []

    def stream(address: tuple[str, int], crash: Callable[[], None]) -> None:
        def many() -> Iterator[tuple[str, Any]]:
            for i in range(20_000):
                if i == 6000:  # batches are in flight, their acks unread
                    crash()
                yield ("rec", {"many": i})

        with Client(*address, retries=100, backoff=0.01, backoff_max=0.2) as c:
            ids.extend(c.send("rec", {"one": i}, ack=True) for i in range(100))
            c.send_many(many(), ack=True, batch_size=250)
            ids.extend(c.send("rec", {"one": i}, ack=True) for i in range(100, 200))

    second = crash_mid_stream(server_factory, BASIC, {"BASIC_RECORD": str(record)}, stream)
    seen = recorded(record)
    seen_ids = {eid for eid, _ in seen}
    assert set(ids) <= seen_ids and len(ids) == 200
    assert {d["one"] for _, d in seen if "one" in d} == set(range(200))
    assert {d["many"] for _, d in seen if "many" in d} == set(range(20_000))
    assert second.proc.poll() is None


def test_reconnects_after_an_idle_timeout_without_losing_a_send(
        server_factory: ServerFactory) -> None:
    server = server_factory(BASIC, "--idle-timeout", "0.3")
    with Client(*server.address) as client:
        pid = client.request("pid")
        # Wait for the server's ERROR idle_timeout + close to reach the client's socket.
        assert select.select([client._sock], [], [], 10)[0]
        client.send("tick")  # must not vanish into the closed connection
        assert client.request("counts", {"tick": 1})["tick"] == 1
        assert client.request("pid") == pid


def test_connection_refused_is_a_client_connection_error() -> None:
    port = free_port()
    client = Client("127.0.0.1", port, retries=2, backoff=0.01)
    with pytest.raises(ClientConnectionError,
                       match=rf"^cannot connect to 127\.0\.0\.1:{port}: Connection refused$"):
        client.connect()
    with pytest.raises(ClientConnectionError):
        client.request("echo")  # lazily, too


# ---------------------------------------------------------------------- scripted server


class FakeServer:
    """Accepts connections one after another and runs ``script(index, conn)`` on each."""

    def __init__(self, script: Callable[[int, FakeConn], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.errors: list[BaseException] = []
        self._script = script
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # the listener was closed
            while True:
                sock, _ = self.listener.accept()
                self.connections += 1
                conn = FakeConn(sock)
                try:
                    self._script(self.connections, conn)
                except BaseException as exc:
                    self.errors.append(exc)
                finally:
                    sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() would not
        self.listener.close()
        self._thread.join(10)
        assert not self.errors, self.errors


class FakeConn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(10)
        self.reader = p.FrameReader(p.SERVER_RECEIVES)
        self.send(p.encode_hello({"server": "fake", "max_frame_bytes": p.DEFAULT_MAX_FRAME_BYTES}))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frames(self, n: int) -> list[p.Frame]:
        out: list[p.Frame] = []
        while len(out) < n:
            out.extend(self.reader)
            if len(out) < n:
                data = self.sock.recv(65536)
                assert data, f"EOF after {len(out)} of {n} frames"
                self.reader.receive_data(data)
        return out

    def wait_closed(self) -> None:
        """Read until the client hangs up."""
        while self.sock.recv(65536):
            pass


@contextlib.contextmanager
def fake_server(script: Callable[[int, FakeConn], None]) -> Iterator[FakeServer]:
    server = FakeServer(script)
    try:
        yield server
    finally:
        server.close()


def test_answers_are_matched_by_corr_in_any_order() -> None:
    def script(index: int, conn: FakeConn) -> None:
        frames = conn.frames(3)  # the whole window, unanswered
        assert [len(f.body) for f in frames] == [2, 2, 1]
        last, middle, first = reversed(frames)
        conn.send(p.encode_ack(last.corr) + p.encode_error(middle.corr, "handler_error",
                                                           "KeyError", "'id'"))
        conn.send(p.encode_ack(first.corr))
        conn.wait_closed()

    with fake_server(script) as fake, Client("127.0.0.1", fake.port, window=3) as client:
        with pytest.raises(RemoteError, match="KeyError") as info:
            client.send_many([("a", i) for i in range(5)], ack=True, batch_size=2)
        assert info.value.__notes__ == ["1 of 3 batches failed; the others were processed"]
        client.close()


@pytest.mark.parametrize("code", ["overloaded", "idle_timeout", "shutting_down"])
def test_a_connection_error_from_the_server_means_reconnect_and_resend(code: str) -> None:
    received: list[p.Frame] = []

    def script(index: int, conn: FakeConn) -> None:
        (frame,) = conn.frames(1)
        received.append(frame)
        if index == 1:
            conn.send(p.encode_error(0, code, "Busy", "try later"))
        else:
            conn.send(p.encode_reply(frame.corr, "done"))
            conn.wait_closed()

    with fake_server(script) as fake, Client("127.0.0.1", fake.port, backoff=0.01) as client:
        assert client.request("x", 1) == "done"
        client.close()
    first, second = received
    assert (first.corr, first.body) == (second.corr, second.body)  # same bytes, same event id


def test_a_server_that_keeps_hanging_up_exhausts_the_retries() -> None:
    with fake_server(lambda index, conn: None) as fake:
        client = Client("127.0.0.1", fake.port, retries=3, backoff=0.01)
        # A close may reach the client as EOF or, if its write crossed the close, as a reset.
        with pytest.raises(ClientConnectionError,
                           match=r"lost: (the server closed|Connection reset)"):
            client.request("x")
    assert fake.connections == 4


def test_a_protocol_error_from_the_server_is_raised_without_retrying() -> None:
    def script(index: int, conn: FakeConn) -> None:
        conn.frames(1)
        conn.send(p.encode_error(0, "frame_too_large", "FrameTooLarge", "too big"))

    with fake_server(script) as fake, Client("127.0.0.1", fake.port) as client:
        with pytest.raises(RemoteError) as info:
            client.send("x", ack=True)
        assert info.value.code == "frame_too_large"
    assert fake.connections == 1


# ---------------------------------------------------------------------- CLI


# One line; the message may carry the server's "dead-lettered after N attempt(s): " note.
REMOTE_ERROR = re.compile(r"evserver: remote error: ValueError: (dead-lettered .*: )?bad id\n")


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_request_prints_the_reply_as_json(server: ServerProcess) -> None:
    result = invoke("request", "echo", '{"a": [1, null, "x"]}', "--port", str(server.port))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"a": [1, None, "x"]}
    result = invoke("request", "echo", "--port", str(server.port))  # data defaults to null
    assert result.stdout == "null\n"


def test_cli_send_and_ping(server: ServerProcess) -> None:
    port = str(server.port)
    result = invoke("send", "tick", "1", "--ack", "--meta", "a=b", "--meta", "c=d=e",
                    "--port", port)
    assert result.exit_code == 0 and result.stdout.strip()
    assert invoke("send", "tick", "--port", port).exit_code == 0
    result = invoke("request", "event", "--meta", "k=v=w", "--port", port)
    assert json.loads(result.stdout)["meta"] == {"k": "v=w"}
    result = invoke("ping", "--port", port)
    assert re.fullmatch(rf"pong from 127\.0\.0\.1:{port} in \d+\.\d\d ms\n", result.stdout)


def test_cli_port_from_the_environment(server: ServerProcess) -> None:
    result = CliRunner().invoke(main, ["ping"], env={"EVSERVER_PORT": str(server.port)})
    assert result.exit_code == 0, result.output


def test_cli_errors_with_click_runner(server: ServerProcess) -> None:
    result = invoke("request", "fail", '"bad id"', "--port", str(server.port))
    assert result.exit_code == 1 and REMOTE_ERROR.fullmatch(result.stderr)
    result = invoke("request", "echo", "{nope", "--port", str(server.port))
    assert result.exit_code == 2 and "not valid JSON" in result.stderr
    result = invoke("send", "tick", "--meta", "novalue", "--port", str(server.port))
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVSERVER_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "evserver", *args], capture_output=True,
                          text=True, env=env, timeout=30)


def test_cli_exit_codes_in_a_real_process(server: ServerProcess) -> None:
    absent = str(free_port())
    for command in (["ping"], ["send", "x"], ["request", "x", "1"]):
        result = run_cli(*command, "--port", absent)
        assert result.returncode == 1
        assert result.stderr == (f"evserver: cannot connect to 127.0.0.1:{absent}: "
                                 "Connection refused\n")
    port = str(server.port)
    result = run_cli("request", "fail", "--port", port)
    assert result.returncode == 1 and REMOTE_ERROR.fullmatch(result.stderr)
    result = run_cli("request", "echo", "[1,", "--port", port)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = run_cli("request", "echo", '{"k": [true, 1.5]}', "--port", port)
    assert (result.returncode, json.loads(result.stdout)) == (0, {"k": [True, 1.5]})
