"""The ops files in config/ against the real thing: the Grafana dashboard queries only series
a live server's /metrics exports, the systemd unit passes ``systemd-analyze verify`` (when
installed) and says what the server does, and the server speaks systemd's readiness protocol
in both process models."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import APPS, REPO, ServerFactory, free_port, wait_for

from evserver import Client, RemoteError
from evserver.config import load_config

pytestmark = pytest.mark.timeout(60)

BASIC = f"{APPS}/basic.py:app"
DASHBOARD = REPO / "config" / "grafana" / "evserver-dashboard.json"
UNIT = REPO / "config" / "systemd" / "evserver.service"
SERIES = re.compile(r"\bevserver_[a-z_]+\b")


def exported_series(metrics: str) -> set[str]:
    """The sample names in a Prometheus text exposition (``name{labels} value``)."""
    return {re.split(r"[{ ]", line, maxsplit=1)[0]
            for line in metrics.splitlines() if line and not line.startswith("#")}


def queried_series(dashboard: dict) -> set[str]:
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return {name for expr in exprs for name in SERIES.findall(expr)}


def test_the_dashboard_queries_only_series_a_live_server_exports(
        server_factory: ServerFactory) -> None:
    admin = free_port()
    server = server_factory(BASIC, "--admin-port", str(admin))
    with Client(*server.address) as client:
        # Enough events for the sampled latency histogram (one event in about 128), a
        # failure, and a dead letter: every family then has samples.
        client.send_many([("tick", i) for i in range(600)], ack=True)
        with pytest.raises(RemoteError, match="dead-lettered"):
            client.send("fail", 1, ack=True)
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as resp:
        exported = exported_series(resp.read().decode())
    dashboard = json.loads(DASHBOARD.read_text())
    queried = queried_series(dashboard)
    assert queried - exported == set(), "the dashboard queries series /metrics does not export"
    # ... and it shows what operators look for first.
    assert {"evserver_events_total", "evserver_handler_latency_seconds_bucket",
            "evserver_handler_errors_total", "evserver_dead_letters_total",
            "evserver_worker_connections", "evserver_worker_queue_depth",
            "evserver_workers"} <= queried
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_matches_the_server() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["KillSignal"] == "SIGTERM"
    assert re.fullmatch(r"/bin/kill -HUP \$MAINPID", service["ExecReload"])
    drain = load_config(env={}).server.drain_timeout
    assert float(service["TimeoutStopSec"]) > drain  # else SIGKILL cuts the drain short
    assert service["ExecStart"].split()[1] == "serve"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # The unit names the install's evserver; verify checks that it exists, so point it at
    # this environment's, as an install does.
    evserver = Path(sys.executable).parent / "evserver"
    assert evserver.exists()
    text = UNIT.read_text().replace("/opt/evserver/bin/evserver", str(evserver))
    assert str(evserver) in text
    (tmp_path / "evserver.service").write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "evserver.service")],
                          capture_output=True, text=True, timeout=30)
    # Unknown keys and bad values are only warnings (exit code 0): none is allowed.
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A NOTIFY_SOCKET as systemd provides one (a short path: AF_UNIX allows 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="ev18-", dir="/tmp")
    path = f"{directory}/notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ready_is_sent_to_the_notify_socket(server_factory: ServerFactory,
                                            notify_socket: tuple[socket.socket, str],
                                            workers: str) -> None:
    sock, path = notify_socket
    server = server_factory(BASIC, "--workers", workers, "--admin-port", "0",
                            env={"NOTIFY_SOCKET": path})
    message = sock.recv(4096).decode()
    assert "READY=1" in message.split("\n")
    if workers == "2":  # the master is the main process, not a worker
        assert f"MAINPID={server.proc.pid}" in message.split("\n")
    with Client(*server.address) as client:
        assert client.request("echo", 1) == 1
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0


def test_a_single_process_survives_a_reload_signal(server_factory: ServerFactory) -> None:
    """``systemctl reload`` sends HUP: a single process has no workers to reload, and the
    signal's default action would have stopped it."""
    server = server_factory(BASIC, "--admin-port", "0")
    with Client(*server.address) as client:
        pid = client.request("pid")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "HUP ignored" in server.log(), 10, "the HUP warning")
        assert client.request("pid") == pid and server.proc.poll() is None
