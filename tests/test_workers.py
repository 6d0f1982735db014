"""``evserver serve --workers N``: real master and worker processes on loopback.

Each test starts ``python -m evserver serve`` with two workers and drives it with plain
blocking sockets (``rawpeer``). Every wait polls a condition against a deadline; nothing
sleeps for a fixed time.
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

import msgpack
import pytest
from conftest import launch, stop_process, wait_for
from rawpeer import RawPeer

from evserver import protocol as p
from evserver.config import load_config
from evserver.contract import EXIT_APP_LOAD_ERROR
from evserver.soak.watch import children
from evserver.supervisor import Supervisor

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SO_REUSEPORT balancing and /proc are Linux's")

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "apps" / "workers_app.py"
T = TypeVar("T")




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie may linger if pid 1 does not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class Master:
    """One ``evserver serve --workers 2`` process; its output (and its workers') in a file."""

    def __init__(self, tmp_path: Path, app: Path = APP, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.address = ("127.0.0.1", self.port)
        self.record = tmp_path / "record.txt"
        self.log_path = tmp_path / f"master-{self.port}.log"
        self.proc = launch("serve", f"{app}:app", "--workers", "2", "--port", str(self.port),
                           "--drain-timeout", "5", *args, cwd=tmp_path, log=self.log_path,
                           env={"WORKERS_APP_RECORD": str(self.record),
                                "EVSERVER_ADMIN_PORT": "0", **(env or {})})

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(lambda: text in self.log, timeout, f"{text!r} in the log:\n{self.log}")

    def wait_ready(self) -> set[int]:
        self.wait_log("master ready")
        return self.workers()

    def workers(self) -> set[int]:
        return children(self.proc.pid)

    def recorded(self) -> set[str]:
        return set(self.record.read_text().split()) if self.record.exists() else set()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        pids = self.workers()
        stop_process(self.proc, signal.SIGQUIT, 5)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Master]]:
    masters: list[Master] = []

    def _start(*args: str, app: Path = APP, port: int | None = None,
               env: dict[str, str] | None = None) -> Master:
        masters.append(Master(tmp_path, app, *args, port=port, env=env))
        return masters[-1]

    yield _start
    for m in masters:
        m.close()


def request(address: tuple[str, int], type: str, data: Any = None) -> Any:
    peer = RawPeer(address, timeout=5)
    try:
        frame = peer.request(1, type, data)
        assert frame.kind == p.REPLY, frame
        return frame.body
    finally:
        peer.close()


class Load(threading.Thread):
    """A client sending ``record`` events with ack=True, one at a time, until stopped.

    A connection that ends is reopened and the unacknowledged event resent (at-least-once,
    as a real client would); ``refused`` counts connections the kernel refused.
    """

    def __init__(self, address: tuple[str, int], name: str, *, give_up: bool = False) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.prefix = name
        self.give_up = give_up  # stop at the first broken connection instead of resending
        self.acked: list[str] = []
        self.refused = 0
        self.reconnects = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        peer: RawPeer | None = None
        pending: str | None = None
        n = 0
        while not self.halt.is_set():
            if pending is None:
                pending, n = f"{self.prefix}-{n}", n + 1
            try:
                if peer is None:
                    peer = RawPeer(self.address, timeout=5)
                peer.send(p.encode_event(n, p.event_wire("record", None, pending)))
                frame = peer.recv_frames(1)[0]
                if frame.kind != p.ACK:
                    self.failures.append(repr(frame))
                    return
                self.acked.append(pending)
                pending = None
            except ConnectionRefusedError:
                self.refused += 1
                peer = None
                if self.give_up:
                    return
            except TimeoutError as exc:
                self.failures.append(f"timeout: {exc}")
                return
            except OSError:  # EOF, reset, broken pipe: the worker closed our connection
                if peer is not None:
                    peer.close()
                peer = None
                self.reconnects += 1
                if self.give_up:
                    return
        if peer is not None:
            peer.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        assert not self.is_alive()


def pids_serving(address: tuple[str, int], connections: int) -> set[int]:
    return {request(address, "pid") for _ in range(connections)}


# --------------------------------------------------------------------------- tests

def test_master_imports_no_eventlet() -> None:
    code = ("import sys, evserver.cli, evserver.supervisor; "
            "assert 'eventlet' not in sys.modules, 'the master must not import eventlet'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=30,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_connections_spread_over_workers_and_pid_file(start, tmp_path: Path) -> None:
    pid_file = tmp_path / "master.pid"
    m = start("--pid-file", str(pid_file))
    workers = m.wait_ready()
    assert len(workers) == 2
    assert pid_file.read_text().strip() == str(m.proc.pid)
    # 2 listeners, hashed per connection: all of 24 on one has probability 2**-23.
    assert pids_serving(m.address, 24) == workers
    m.signal(signal.SIGTERM)
    assert m.proc.wait(10) == 0
    assert not pid_file.exists()


def test_sigkilled_worker_is_replaced_within_a_second(start) -> None:
    m = start()
    before = m.wait_ready()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    m.wait_log("died (killed by SIGKILL); replacing it", timeout=2)
    survivor = before - {victim}
    new = wait_for(lambda: m.workers() - before, 2, "a replacement worker")
    (new_pid,) = new
    wait_for(lambda: m.log.count(" ready on ") >= 3, 2, "the replacement to be ready")
    ready_after = time.monotonic() - killed_at
    assert ready_after < 1.0, f"replacement ready {ready_after:.2f}s after the kill"
    assert pids_serving(m.address, 24) == survivor | {new_pid}


def test_hup_under_acked_load_replaces_workers_without_losing_events(start, tmp_path):
    app = tmp_path / "hup_app.py"
    shutil.copy(APP, app)
    m = start(app=app)
    old = m.wait_ready()
    assert request(m.address, "version") == 1
    clients = [Load(m.address, f"c{i}") for i in range(3)]
    for c in clients:
        c.start()
    wait_for(lambda: all(len(c.acked) >= 20 for c in clients), 10, "load before the reload")
    app.write_text(app.read_text().replace("VERSION = 1", "VERSION = 2"))
    m.signal(signal.SIGHUP)
    wait_for(lambda: len(m.workers()) == 2 and not m.workers() & old, 15,
             f"new workers to replace the old ones:\n{m.log}")
    marks = [len(c.acked) for c in clients]
    wait_for(lambda: all(len(c.acked) >= k + 20 for c, k in zip(clients, marks, strict=True)),
             10, "load after the reload")
    for c in clients:
        c.stop()
    assert [c.failures for c in clients] == [[], [], []]
    assert sum(c.refused for c in clients) == 0
    # Each retiring worker can close a client's connection once, and a listener closing with
    # a connection still in its backlog resets it once more; nothing beyond that.
    assert all(c.reconnects <= len(old) + 1 for c in clients), [c.reconnects for c in clients]
    acked = {e for c in clients for e in c.acked}
    assert len(acked) >= 120
    assert acked <= m.recorded()
    assert {request(m.address, "version") for _ in range(6)} == {2}
    assert "HUP: 2 new workers ready; retiring 2 old ones" in m.log


def test_hup_keeps_an_ephemeral_forward_port(start) -> None:
    """``forward.port = 0`` is resolved once by the master: the workers of every generation
    share that port, so Fluent Bit keeps reaching them across a reload."""
    import re

    from evserver.forward import ack_bytes

    m = start("--forward-enabled", "--forward-port", "0")
    m.wait_ready()
    listening = re.compile(r"Forward protocol listening on 127\.0\.0\.1:(\d+)")
    wait_for(lambda: len(listening.findall(m.log)) == 2, 10, "both workers' Forward listeners")
    (port,) = {int(n) for n in listening.findall(m.log)}
    m.signal(signal.SIGHUP)
    m.wait_log("HUP: 2 new workers ready; retiring 2 old ones", 15)
    ports = [int(n) for n in listening.findall(m.log)]
    assert len(ports) == 4 and set(ports) == {port}, m.log
    # A listener that closes resets the connections in its backlog: wait for the old ones.
    wait_for(lambda: m.log.count("(gen 1) exited") == 2, 15, "the old workers to exit")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # still served
        sock.sendall(msgpack.packb(["hup.forward", [[1, {"x": 1}]], {"chunk": "c1"}]))
        assert sock.recv(100) == ack_bytes("c1")


def test_hup_with_a_broken_app_keeps_the_old_workers(start, tmp_path: Path) -> None:
    app = tmp_path / "hup_bad_app.py"
    shutil.copy(APP, app)
    m = start(app=app)
    old = m.wait_ready()
    app.write_text("import no_such_module_for_evserver\n")
    m.signal(signal.SIGHUP)
    m.wait_log("HUP: reload aborted, keeping the current workers")
    assert "no_such_module_for_evserver" in m.log
    assert m.proc.poll() is None
    assert pids_serving(m.address, 8) <= old == m.workers()


def test_crash_loop_backs_off_and_says_so(start) -> None:
    m = start(env={"WORKERS_APP_EXIT_AT_IMPORT": "3"})
    m.wait_log("crash loop: 3 fast deaths in a row, next start in 1.0s")
    assert m.log.count("died (exit code 3)") <= 4
    assert m.proc.poll() is None  # still supervising, not spinning or gone


def test_sd_notify_ready(start, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        m = start(env={"NOTIFY_SOCKET": path})
        message = sock.recv(4096).decode()
    assert message.startswith("READY=1") and f"MAINPID={m.proc.pid}" in message
    assert "master ready" in m.log


def test_term_under_load_processes_every_acked_event(start) -> None:
    m = start()
    workers = m.wait_ready()
    clients = [Load(m.address, f"t{i}", give_up=True) for i in range(3)]
    for c in clients:
        c.start()
    wait_for(lambda: all(len(c.acked) >= 20 for c in clients), 10, "load")
    m.signal(signal.SIGTERM)
    assert m.proc.wait(10) == 0, m.log
    for c in clients:
        c.stop()
    assert [c.failures for c in clients] == [[], [], []]
    acked = {e for c in clients for e in c.acked}
    assert acked <= m.recorded()
    assert not any(alive(pid) for pid in workers)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(m.address, timeout=2)


def test_second_serve_on_a_taken_port_is_refused(start, tmp_path: Path) -> None:
    first = start()
    first.wait_ready()
    second = start(port=first.port)
    assert second.proc.wait(10) != 0
    assert f"refusing to start: 127.0.0.1:{first.port} is already in use" in second.log
    assert not second.workers()
    assert len(pids_serving(first.address, 8) & first.workers()) >= 1


def test_foreign_reuseport_listener_is_refused(start) -> None:
    with socket.socket() as other:  # what a careless second server would do
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        m = start(port=other.getsockname()[1])
        assert m.proc.wait(10) != 0
    assert "already in use by another process" in m.log
    assert "starting" not in m.log


def test_workers_exit_when_the_master_is_killed(start) -> None:
    m = start()
    workers = m.wait_ready()
    m.proc.kill()
    m.proc.wait(5)
    wait_for(lambda: not any(alive(pid) for pid in workers), 5, "orphaned workers to exit")


def test_app_import_error_stops_the_master_fast(start, tmp_path: Path) -> None:
    bad = tmp_path / "bad_app.py"
    bad.write_text("import no_such_module_for_evserver\n")
    m = start(app=bad)
    assert m.proc.wait(10) == EXIT_APP_LOAD_ERROR
    master_lines = [ln for ln in m.log.splitlines() if "evserver.supervisor" in ln]
    assert any("No module named 'no_such_module_for_evserver'" in ln and "stopping" in ln
               for ln in master_lines), m.log
    assert m.log.count("died") == 0  # not respawned


def test_blocked_hub_is_detected_and_the_worker_replaced(start) -> None:
    m = start("--worker-timeout", "1")
    before = m.wait_ready()
    peer = RawPeer(m.address, timeout=10)
    peer.send(p.encode_event(1, ["block", 5], request=True))
    m.wait_log("its hub is blocked", timeout=5)
    with pytest.raises(ConnectionError):
        peer.recv_frames(1)  # the blocked worker was killed under us
    peer.close()
    assert "most recent call first" in m.log  # the stack dump, before the kill
    wait_for(lambda: len(m.workers()) == 2 and m.workers() != before, 5, "a replacement")


def test_ttin_ttou_change_the_worker_count(start) -> None:
    m = start()
    m.wait_ready()
    m.signal(signal.SIGTTIN)
    wait_for(lambda: len(m.workers()) == 3 and m.log.count(" ready on ") >= 3, 5, "3 workers")
    m.signal(signal.SIGTTOU)
    wait_for(lambda: len(m.workers()) == 2, 10, "back to 2 workers")


def test_stats_request_over_the_control_channel(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORKERS_APP_RECORD", str(tmp_path / "record.txt"))
    port = free_port()
    cfg = load_config(env={}, overrides={"server.port": port, "server.workers": 2})
    sup = Supervisor(f"{APP}:app", cfg)
    worker = sup.spawn(1, cfg)
    try:
        wait_for(lambda: sup.read_channels(0.05) or worker.ready_at, 10, "the worker's ready")
        peer = RawPeer(("127.0.0.1", port))
        for i in range(3):
            peer.send(p.encode_event(i + 1, p.event_wire("record", None, f"s{i}")))
        assert {f.kind for f in peer.recv_frames(3)} == {p.ACK}
        stats = sup.request_stats(timeout=5)
        assert list(stats) == [worker.pid]
        s = stats[worker.pid]
        assert s["pid"] == worker.pid and s["connections"] == 1
        assert s["dispatcher"]["events_processed"] == 3
        assert s["dispatcher"]["by_type"] == {"record": 3}
        assert s["counters"]["connections_total"] == 1
        peer.close()
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.proc.wait(10) == 0
        worker.channel.close()


def test_a_taken_forward_port_is_refused_too(start) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        m = start("--forward-enabled", "--forward-port", str(taken))
        assert m.proc.wait(10) != 0
    assert "Forward listener" in m.log and "already in use" in m.log
    assert not m.workers()


def test_sigkill_a_worker_while_clients_stream_20k_acked_events(start) -> None:
    """Every acknowledged event survives a worker's SIGKILL: clients on the dead worker
    reconnect (to a survivor or the replacement) and re-send what was not acknowledged."""
    from evserver import Client

    m = start()
    m.wait_ready()
    clients = [Client(*m.address, timeout=10, retries=20, backoff=0.05) for _ in range(4)]
    victim = clients[0].request("pid")  # kill the worker that serves client 0
    acked: list[list[str]] = [[] for _ in clients]
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            for n in range(5000):
                clients[i].send("record", n, ack=True, id=f"c{i}-{n}")
                acked[i].append(f"c{i}-{n}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    wait_for(lambda: len(m.recorded()) >= 2000, 20, "the stream to get going")
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(90)
    for c in clients:
        c.close()
    assert not errors, errors
    sent = {eid for ids in acked for eid in ids}
    assert len(sent) == 20_000
    missing = sent - m.recorded()
    assert not missing, f"{len(missing)} acknowledged events were never processed"
    assert victim not in m.workers()
