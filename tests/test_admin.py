"""The admin listener, its metrics and the CLI admin commands.

Live tests start ``python -m evserver serve`` (single process, or a master with two
workers) with ``--admin-port 0`` and read the admin URL from the log. Events go in over raw
protocol sockets with acks, so once the acks are back the counts are final and exact.
Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import evserver_env, launch, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families
from rawpeer import RawPeer

from evserver import protocol as p
from evserver.admin import AdminApp, Tap, ThreadedAdmin, check_access, is_loopback
from evserver.cli import main
from evserver.errors import AdminError
from evserver.metrics import BUCKETS, aggregate, empty_base, quantile, render_prometheus, retire

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "apps" / "admin_app.py"
# Known traffic: type -> count. "fail" always fails; "nobody.home" has no handler.
TRAFFIC = {"order.created": 7, "order.paid": 5, "order.item.added": 3, "fail": 2,
           "nobody.home": 1}




class Served:
    """One ``evserver serve`` process with its admin listener on an ephemeral port."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self.env = evserver_env(env)  # for the CLI subprocesses of the tests, too
        self.proc = launch("serve", f"{APP}:app", "--port", "0", "--admin-port", "0",
                           "--drain-timeout", "5", *args, cwd=tmp_path, log=self.log_path,
                           env=env)
        ready = "master ready" if "--workers" in args else "evserver ready"
        wait_for(lambda: ready in self.log and "admin listening on" in self.log, 15,
                 f"{ready!r} in the log")
        self.admin = re.findall(r"admin listening on (http://[\d.]+:\d+)", self.log)[0]
        port = re.search(r"ready: (?:\d+ workers )?serving \S+ on [\d.]+:(\d+)", self.log)
        assert port, self.log
        self.address = ("127.0.0.1", int(port[1]))

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        return http("GET", self.admin + path, token)

    def stats(self) -> dict[str, Any]:
        status, body = self.get("/stats")
        assert status == 200, body
        return json.loads(body)

    def cli(self, *args: str, token: str | None = None) -> Any:
        env = {"EVSERVER_ADMIN_TOKEN": token} if token else {}
        return CliRunner().invoke(main, [*args, "--admin", self.admin], env=env)

    def close(self) -> None:
        stop_process(self.proc, signal.SIGQUIT if "--workers" in self.proc.args else
                     signal.SIGTERM)


def http(method: str, url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def send_traffic(address: tuple[str, int], workers: int = 1) -> dict[str, int]:
    """TRAFFIC, each event acked, over connections that reach ``workers`` distinct workers.

    Connections are spread by the kernel's SO_REUSEPORT hash, so a "whoami" request tells
    which worker each one reached; returns the expected per-type counts (whoami included).
    """
    peers: dict[int, RawPeer] = {}
    asked = 0
    while len(peers) < workers:
        assert asked < 64, f"64 connections reached only {len(peers)} worker(s)"
        peer = RawPeer(address)
        asked += 1
        pid = peer.request(asked, "whoami").body
        if pid in peers:
            peer.close()
        else:
            peers[pid] = peer
    conns = list(peers.values())
    events = [t for t, n in TRAFFIC.items() for _ in range(n)]
    try:
        for i, etype in enumerate(events):
            conns[i % len(conns)].send(p.encode_event(i + 1, p.event_wire(etype, i, None)))
        for i, peer in enumerate(conns):
            peer.recv_frames(len(events[i::len(conns)]))
    finally:
        for peer in conns:
            peer.close()
    return {**TRAFFIC, "whoami": asked}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Served:
        started.append(Served(tmp_path, *args, env=env))
        return started[-1]

    yield start
    for s in started:
        s.close()


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, parsed by prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def assert_exact_counts(stats: dict[str, Any], metrics_text: str, expected: dict[str, int], *,
                        exited: bool = False) -> None:
    """``expected``, exactly, in /stats and /metrics (per worker too, unless one ``exited``)."""
    total = sum(expected.values())
    t = stats["totals"]
    assert (t["events_in"], t["events_out"]) == (total, total)
    assert t["errors"] == TRAFFIC["fail"] and t["unrouted"] == TRAFFIC["nobody.home"]
    assert {k: v["events"] for k, v in stats["types"].items()} == expected
    assert stats["types"]["fail"]["errors"] == TRAFFIC["fail"]
    m = metric_values(metrics_text)
    if not exited:
        for etype, n in expected.items():  # per worker adds up to the total
            assert sum(stats["types"][etype]["by_worker"].values()) == n
        assert sum(w["events_out"] for w in stats["workers"]) == total
        assert sum(v for (name, _), v in m.items() if name == "evserver_worker_events_total") \
            == total
    assert m["evserver_events_received_total", ()] == total
    assert m["evserver_events_processed_total", ()] == total
    assert m["evserver_unrouted_events_total", ()] == TRAFFIC["nobody.home"]
    for etype, n in expected.items():
        assert m["evserver_events_total", (("type", etype),)] == n
    assert m["evserver_handler_errors_total", (("type", "fail"),)] == TRAFFIC["fail"]


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("192.168.1.2", False), ("::ffff:10.0.0.5", False), ("", False),
    ("localhost", False), ("fe80::1%eth0", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_check_access() -> None:
    # No token: loopback only.
    assert check_access("127.0.0.1", None, None) is None
    refused = check_access("10.0.0.5", None, None)
    assert isinstance(refused, AdminError) and refused.status == 403
    # A token: only the token counts, wherever the peer is.
    assert check_access("10.0.0.5", "s3cret", "Bearer s3cret") is None
    assert check_access("10.0.0.5", "s3cret", "bearer s3cret") is None
    for header in (None, "", "Bearer wrong", "Basic s3cret", "Bearer"):
        refused = check_access("127.0.0.1", "s3cret", header)
        assert isinstance(refused, AdminError) and refused.status == 401, header


def test_quantile_interpolates_within_buckets() -> None:
    counts = [0] * (len(BUCKETS) + 1)
    assert quantile(counts, 0.5) is None
    i = BUCKETS.index(1e-3)
    counts[i] = 100  # all between 0.5 ms and 1 ms
    assert quantile(counts, 0.5) == pytest.approx(0.75e-3)
    assert quantile(counts, 1.0) == pytest.approx(1e-3)
    counts[-1] = 100  # beyond the last bound
    assert quantile(counts, 0.99) == BUCKETS[-1]


def snap(pid: int, processed: int, by_type: dict[str, int]) -> dict[str, Any]:
    return {"pid": pid, "uptime": 1.0, "connections": 1, "counters": {"connections_total": 1},
            "dispatcher": {"events_in": processed, "events_processed": processed,
                           "handler_errors": 0, "dead_letters": 0, "unrouted": 0,
                           "by_type": by_type, "errors_by_type": {}, "latency": {},
                           "busy": 0, "queued": 0, "pool_size": 4}}


def test_every_published_number_has_its_declared_help_text() -> None:
    from evserver.metrics import SERVER_COUNTERS, new_counters

    one = snap(7, 3, {"a.b": 3})
    one["counters"] = {**new_counters("server", "forward"), "connections_total": 5}
    text = render_prometheus(aggregate([one], mode="single", uptime=1.0)).decode()
    helps = dict(line[len("# HELP "):].split(" ", 1) for line in text.splitlines()
                 if line.startswith("# HELP "))
    declared = {f"evserver_{m.name}_total": m.help for group in SERVER_COUNTERS.values()
                for m in group}
    assert {name: helps.get(name) for name in declared} == declared
    assert not [name for name, help in helps.items() if "Server counter" in help]
    assert metric_values(text)["evserver_connections_total", ()] == 5
    with pytest.raises(KeyError):  # an undeclared counter cannot be counted
        new_counters("server")["not_declared"] += 1


def test_metric_declarations_take_group_defaults_and_refuse_typos() -> None:
    from evserver.metrics import Metric, declare

    groups = {"g": {"prefix": "g_", "kind": "counter", "labels": ["worker"],
                    "a": {"help": "A."}, "b": {"kind": "gauge", "key": "bee", "help": "B."}}}
    assert declare(groups) == {"g": (Metric("g_a", "counter", "A.", "a", ("worker",)),
                                     Metric("g_b", "gauge", "B.", "bee", ("worker",)))}
    for bad in ({"help": "A.", "lables": ["x"]}, {"help": "A.", "kind": "summary"}, {}):
        with pytest.raises(ValueError, match=r"\[g\] a:"):
            declare({"g": {"kind": "counter", "a": bad}})


def test_totals_keep_exited_workers() -> None:
    """A replaced worker's counts stay in the totals: counters never go backwards."""
    base = empty_base()
    before = aggregate([snap(1, 5, {"a": 5}), snap(2, 3, {"a": 1, "b": 2})], mode="master",
                       uptime=1, base=base)
    retire(base, snap(1, 6, {"a": 6}))  # worker 1 exits after one more event
    after = aggregate([snap(2, 3, {"a": 1, "b": 2}), snap(3, 0, {})], mode="master",
                      uptime=2, base=base)
    assert before["totals"]["events_out"] == 8 and after["totals"]["events_out"] == 9
    assert after["types"]["a"]["events"] == 7 and after["retired_workers"] == 1
    m = metric_values(render_prometheus(after).decode())
    assert m["evserver_events_processed_total", ()] == 9
    assert m["evserver_events_total", (("type", "a"),)] == 7
    assert m["evserver_worker_exits_total", ()] == 1


def test_tap_samples_matching_events_within_its_rate() -> None:
    from evserver.event import Event

    tap = Tap("order.*", rate=3)
    events = [Event("order.a", i) for i in range(5)] + [Event("x.y", 9)]
    tap(events)
    assert [e["data"] for e in tap.drain()] == [0, 1, 2]  # the rate cut it off
    tap(events)
    assert tap.drain() == []  # same second: no budget left


# --------------------------------------------------------------------------- HTTP: peer seam


class FakeBackend:
    mode = "fake"

    def __init__(self) -> None:
        self.stopped: list[bool] = []

    def stats(self) -> dict[str, Any]:
        return aggregate([], mode="fake", uptime=0)

    def ready(self) -> tuple[bool, str]:
        return True, "yes"

    def stop(self, now: bool) -> dict[str, Any]:
        self.stopped.append(now)
        return {"stopping": "graceful", "pid": 0}


class RemotePeerApp(AdminApp):
    """The seam: every request looks as if it came from a non-loopback address."""

    def peer(self, environ: dict[str, Any]) -> str:
        return "203.0.113.7"


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_http_access_from_a_remote_peer(token: str | None) -> None:
    backend = FakeBackend()
    admin = ThreadedAdmin(RemotePeerApp(backend, token=token), "127.0.0.1", 0)  # type: ignore[arg-type]
    url = f"http://127.0.0.1:{admin.address[1]}"
    try:
        assert http("GET", url + "/healthz")[0] == 200  # reading is open
        assert http("GET", url + "/readyz")[0] == 200
        status, body = http("POST", url + "/stop")
        assert status == (401 if token else 403), body
        if token:
            assert http("POST", url + "/stop", token="wrong")[0] == 401
            assert http("POST", url + "/stop", token=token)[0] == 202
            assert backend.stopped == [False]
        else:
            assert b"loopback only" in body and backend.stopped == []
        assert http("GET", url + "/tail")[0] == (401 if token else 403)  # payloads: privileged
        assert http("GET", url + "/nope")[0] == 404
        assert http("GET", url + "/stop")[0] == 405
    finally:
        admin.close()


# --------------------------------------------------------------------------- live servers


def test_two_workers_report_exact_counts(serve) -> None:
    s = serve("--workers", "2")
    expected = send_traffic(s.address, workers=2)
    stats = s.stats()
    assert len(stats["workers"]) == 2
    assert all(w["events_out"] for w in stats["workers"]), "expected both workers to serve"
    status, text = s.get("/metrics")
    assert status == 200
    assert_exact_counts(stats, text.decode(), expected)
    result = s.cli("stats", "--json")
    assert result.exit_code == 0, result.output
    # Counters only: gauges (open connections, busy and queued jobs) may move between the
    # two snapshots, since connections of send_traffic may still be closing.
    totals = json.loads(result.output)["totals"]
    gauges = {"connections", "busy", "queued"}
    assert {k: v for k, v in totals.items() if k not in gauges} == \
        {k: v for k, v in stats["totals"].items() if k not in gauges}
    assert json.loads(result.output)["types"].keys() == stats["types"].keys()

    # Scale down to one: the retiring worker's counts stay in the totals.
    assert s.cli("scale", "1").output.strip() == "workers: 2 -> 1"
    wait_for(lambda: "admin: now 1 worker (was 2)" in s.log, 10, "the scale in the log")
    wait_for(lambda: len(s.stats()["workers"]) == 1 and s.stats()["retired_workers"] == 1,
             15, "one worker left")
    assert_exact_counts(s.stats(), s.get("/metrics")[1].decode(), expected, exited=True)


def test_single_process_stats_metrics_and_readiness(serve) -> None:
    s = serve()
    assert s.get("/readyz")[0] == 200
    expected = send_traffic(s.address)
    stats = s.stats()
    assert stats["mode"] == "single" and len(stats["workers"]) == 1
    assert_exact_counts(stats, s.get("/metrics")[1].decode(), expected)
    lat = stats["types"]["order.created"]["latency"]
    assert set(lat) >= {"samples", "p50", "p90", "p99", "mean"}


def test_token_is_enforced_live(serve) -> None:
    s = serve("--workers", "2", env={"EVSERVER_ADMIN_TOKEN": "s3cret"})
    result = s.cli("scale", "3")
    assert result.exit_code == 1
    assert "refused POST /workers (401): invalid or missing admin token" in result.output
    assert result.output.count("\n") == 1  # one clear line
    result = s.cli("scale", "3", token="wrong")
    assert result.exit_code == 1 and "(401)" in result.output
    result = s.cli("scale", "3", token="s3cret")
    assert result.exit_code == 0 and result.output.strip() == "workers: 2 -> 3"
    assert s.cli("stats", "--json").exit_code == 0  # reading needs no token


def test_cli_admin_commands(serve) -> None:
    s = serve("--workers", "2")
    expected = send_traffic(s.address)

    result = s.cli("stats")
    assert result.exit_code == 0, result.output
    assert "order.created" in result.output and "WORKER" in result.output

    result = s.cli("workers", "--interval", "0", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 2 and sum(r["events"] for r in rows) == sum(expected.values())
    assert "EVENTS/S" in s.cli("workers", "--interval", "0").output

    result = s.cli("handlers", "--json")
    handlers = {(h["kind"], h["pattern"]): h for h in json.loads(result.output)["handlers"]}
    assert set(handlers) == {("processor", "order.created"), ("processor", "order.*"),
                             ("processor", "fail"), ("processor", "whoami"),
                             ("listener", "order.**")}
    assert handlers["processor", "order.*"]["options"]["retries"] == 1
    assert handlers["listener", "order.**"]["options"]["timeout"] == 5
    assert handlers["processor", "order.created"]["options"]["ordered_by"] is None
    assert "ordered_by" not in handlers["listener", "order.**"]["options"]
    table = s.cli("handlers").output
    assert "admin_app.other_order" in table
    assert re.search(r"admin_app\.created +timeout=.* ordered_by=-$", table, re.M), table

    result = s.cli("reload")
    assert result.exit_code == 0 and "generation 2" in result.output, result.output
    wait_for(lambda: "HUP: 2 new workers ready" in s.log, 15, "the reload")

    result = s.cli("stop")
    assert result.exit_code == 0 and "stopping (graceful)" in result.output
    assert s.proc.wait(15) == 0


def test_cli_failures_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["stats", "--admin", "http://127.0.0.1:1"])
    assert result.exit_code == 1
    assert result.output == ("evserver: cannot reach the evserver admin at http://127.0.0.1:1:"
                             " Connection refused\n")
    assert runner.invoke(main, ["scale", "0", "--admin", "http://127.0.0.1:1"]).exit_code == 2
    assert runner.invoke(main, ["tail", "a.**.b", "--admin", "x"]).exit_code == 2


def test_single_process_refuses_reload_and_scale(serve) -> None:
    s = serve()
    result = s.cli("reload")
    assert result.exit_code == 1 and "(409)" in result.output
    result = s.cli("scale", "2")
    assert result.exit_code == 1 and "multi-worker mode" in result.output
    assert s.cli("stop", "--now").exit_code == 0
    assert s.proc.wait(15) == 0


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
def test_tail_receives_a_matching_event(serve, workers: list[str]) -> None:
    s = serve(*workers)
    cmd = [sys.executable, "-m", "evserver", "tail", "order.*", "-n", "1", "--admin", s.admin]
    tail = subprocess.Popen(cmd, env=s.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Keep sending until the tail has opened and shows one: it starts asynchronously.
        peer = RawPeer(s.address)
        i = 0
        while tail.poll() is None and i < 2000:
            i += 1
            peer.send(p.encode_event(i, p.event_wire("nope.x", i, None)))
            peer.send(p.encode_event(i + 10_000, p.event_wire("order.paid", i, None)))
            peer.recv_frames(2)
            select.select([tail.stdout], [], [], 0.02)  # paces the loop; returns on output
        out, err = tail.communicate(timeout=10)
        assert tail.returncode == 0, err
        event = json.loads(out)
        assert event["type"] == "order.paid" and isinstance(event["data"], int)
        peer.close()
        # The closed tail stops the sampling.
        wait_for(lambda: "closed after 1 event" in s.log, 10, "the tail to close")
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()


def test_top_in_a_pty_quits_on_q_and_restores_the_terminal(serve) -> None:
    s = serve("--workers", "2")
    send_traffic(s.address)
    master_fd, slave_fd = os.openpty()
    before = termios.tcgetattr(slave_fd)
    top = subprocess.Popen(
        [sys.executable, "-m", "evserver", "top", "--interval", "0.2", "--admin", s.admin],
        stdin=slave_fd, stdout=slave_fd, stderr=slave_fd, env=s.env, start_new_session=True)
    screen = b""
    try:
        deadline = time.monotonic() + 15
        while b"order.created" not in screen or screen.count(b"\x1b[2J") < 2:
            assert time.monotonic() < deadline, screen[-2000:]
            if select.select([master_fd], [], [], 0.5)[0]:
                screen += os.read(master_fd, 65536)
        os.write(master_fd, b"q")
        assert top.wait(10) == 0
        assert termios.tcgetattr(slave_fd) == before  # echo and canonical mode are back
        while select.select([master_fd], [], [], 0.2)[0]:
            try:
                screen += os.read(master_fd, 65536)
            except OSError:
                break
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        os.close(master_fd)
    assert b"\x1b[?1049h" in screen and screen.rstrip().endswith(b"\x1b[?1049l")
    assert b"EVENTS/S" in screen
    os.close(slave_fd)


def test_json_logs_have_one_line_per_lifecycle_event(serve) -> None:
    s = serve("--workers", "2", "--log-format", "json")
    send_traffic(s.address)
    assert s.cli("stop").exit_code == 0
    assert s.proc.wait(15) == 0
    lines = [json.loads(line) for line in s.log.splitlines() if line.strip()]
    messages = [r["message"] for r in lines]
    assert any(m.startswith("spawned worker") for m in messages)
    assert any(m.startswith("master ready") for m in messages)
    assert any("exited (exit code 0)" in m for m in messages)
    assert all(r["level"] != "info" or "order." not in r["message"] for r in lines)
    assert len(lines) < 40  # lifecycle only: no line per event
