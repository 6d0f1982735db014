"""Shared fixtures: real ``evserver serve`` processes on loopback.

``server_factory(app_spec, *extra_args, env=None, port=None)`` starts
``python -m evserver serve APP --host 127.0.0.1 --port PORT *extra_args`` in a temporary
directory (so no ``config/evserver.toml`` or ``EVSERVER_*`` variable of the developer leaks
in; the admin listener gets an ephemeral port, since a busy one refuses the start), waits
until the server's HELLO arrives (bounded by ``START_TIMEOUT``) and returns a
``ServerProcess`` (``.host``, ``.port``, ``.address``, ``.proc``, ``.stop()``, ``.log()``).
Pass ``port=`` to restart a server where a killed one listened. Every server a test started
is stopped (SIGTERM, then SIGKILL) at teardown, and a failing test's report shows each
server's stderr. ``APPS`` is the folder of test apps (``tests/apps``), e.g.
``server_factory(f"{APPS}/basic.py:app")``.

``redis_factory(*args)`` starts a real ``redis-server`` on a free loopback port (the cluster
tests' engine), waits until it answers PING and stops it by PID at teardown; ``restart()``
brings it back on the same port and directory (with ``--appendonly yes``, its data too).
These tests never skip: without ``redis-server`` they fail and say how to install it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from evserver import protocol as p

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def wait_for(cond: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``cond`` until it is truthy (its value is returned) or fail after ``timeout``;
    for outcomes that have no event to wait on (a process gone, a file written)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)  # a poll interval, not a wait for something to happen


def hold_the_pool(app: Any) -> threading.Event:
    """Give ``app`` a "hold" processor that keeps its pool slot (a green wait) until the
    returned Event is set, for at most 10 s: with ``pool_size=1`` the jobs behind it queue."""
    from evserver._eventlet import eventlet

    release = threading.Event()

    @app.processor("hold")
    def hold(event: Any) -> str:
        deadline = time.monotonic() + 10
        while not release.is_set() and time.monotonic() < deadline:
            eventlet.sleep(0.005)
        return "released"

    return release


def free_port() -> int:
    """A port nothing listens on right now (bind port 0, close): racy but fine on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evserver_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an evserver subprocess: this checkout first on PYTHONPATH, and no
    ``EVSERVER_*`` variable of the developer's leaking in; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVSERVER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env


def launch(*args: str, cwd: Path, log: Path | None = None, env: dict[str, str] | None = None,
           stderr: int | None = None) -> subprocess.Popen[bytes]:
    """The one way the tests start evserver: ``python -m evserver ARGS`` in ``cwd`` with
    ``evserver_env(env)``, stdout and stderr appended to ``log`` (or stderr to ``stderr``)."""
    out: Any = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "evserver", *args], cwd=cwd,
                                env=evserver_env(env), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out if log is not None else stderr)
    finally:
        if log is not None:
            out.close()


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = STOP_TIMEOUT) -> int:
    """Send ``sig`` to a child that still runs, wait up to ``timeout``, then SIGKILL it if
    it has not exited; its exit code. Every test's way to stop a process it started."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


class ServerProcess:
    """One ``evserver serve`` subprocess; stderr goes to ``log_path``."""

    def __init__(self, proc: subprocess.Popen[bytes], host: str, port: int,
                 log_path: Path) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.log_path = log_path

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (SIGKILL to simulate a crash), wait, kill if needed; the exit code."""
        return stop_process(self.proc, sig, timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until a connection gets the server's HELLO; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(self.address, timeout=1.0) as sock:
                    reader = p.FrameReader(p.CLIENT_RECEIVES)
                    while (frame := reader.next_frame()) is None:
                        data = sock.recv(4096)
                        if not data:
                            raise ConnectionError("closed before HELLO")
                        reader.receive_data(data)
                    if frame.kind == p.HELLO:
                        return
                    raise RuntimeError(f"first frame is not HELLO: {frame}")
            except OSError as exc:  # not listening yet
                last = exc
                time.sleep(0.02)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"server not ready after {timeout}s ({last}):\n{self.log()}")


ServerFactory = Callable[..., ServerProcess]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in getattr(item, "_evserver_servers", ()):
            report.sections.append((f"evserver stderr (port {server.port})", server.log()))


@pytest.fixture
def server_factory(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    servers: list[ServerProcess] = []
    request.node._evserver_servers = servers
    workdir = tmp_path_factory.mktemp("server")

    def start(app_spec: str, *extra_args: str, env: dict[str, str] | None = None,
              port: int | None = None) -> ServerProcess:
        port = free_port() if port is None else port
        log_path = workdir / f"server-{len(servers)}-{port}.log"
        # EVSERVER_ADMIN_PORT=0: a busy admin port would refuse the start.
        proc = launch("serve", app_spec, "--host", "127.0.0.1", "--port", str(port),
                      *extra_args, cwd=workdir, log=log_path,
                      env={"EVSERVER_ADMIN_PORT": "0", **(env or {})})
        server = ServerProcess(proc, "127.0.0.1", port, log_path)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


REDIS_INSTALL = ("redis-server is not installed; the cluster tests need it: "
                 "apt-get install -y redis-server (as root)")


class RedisProcess:
    """One ``redis-server`` subprocess on loopback, in its own directory."""

    def __init__(self, binary: str, port: int, workdir: Path, args: tuple[str, ...]) -> None:
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.args = args
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--dir", str(self.workdir), "--daemonize", "no", *self.args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        wait_for(self.ping, START_TIMEOUT, f"redis-server on port {self.port} to answer PING")

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                               + (self.workdir / "redis.log").read_text(errors="replace"))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def client(self):  # a redis-py client, for tests that look inside
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=10)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop by PID (SIGTERM: Redis writes its AOF and exits)."""
        if self.proc is not None:
            stop_process(self.proc, sig)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_factory(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisProcess]]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(REDIS_INSTALL)
    started: list[RedisProcess] = []

    def start(*args: str) -> RedisProcess:
        server = RedisProcess(binary, free_port(), tmp_path_factory.mktemp("redis"), args)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


def crash_mid_stream(server_factory: ServerFactory, app_spec: str, env: dict[str, str],
                     work: Callable[[tuple[str, int], Callable[[], None]], None]
                     ) -> ServerProcess:
    """Start ``app_spec``, run ``work(address, crash)`` in a thread, and when it calls
    ``crash()`` SIGKILL the server and start another on the same port. ``crash()`` returns
    once the first server is dead, so whatever the client had in flight is lost to it.
    Returns the second server after ``work`` finished; raises what ``work`` raised."""
    first = server_factory(app_spec, env=env)
    in_flight, killed = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def crash() -> None:
        in_flight.set()
        assert killed.wait(20)

    def run() -> None:
        try:
            work(first.address, crash)
        except BaseException as exc:
            errors.append(exc)
        finally:
            in_flight.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert in_flight.wait(20)
    first.stop(signal.SIGKILL)
    killed.set()
    second = server_factory(app_spec, env=env, port=first.port)
    thread.join(40)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    return second
