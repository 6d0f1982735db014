"""The bench's pre-encoded payloads against the reference's frame loops and evserver's Forward
decoder: they must agree on every event and every ack, or the bench's ratios compare unlike
work. Short runs check the wiring end to end, handler costs included (events counted, the
concurrency each server reached); speed is measured by scripts/bench.py, never here."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import msgpack
import pytest

from evserver.forward import ForwardConnection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
bench = importlib.import_module("bench")
ref = importlib.import_module("ref_receiver")

CASES = [(proto, mode) for proto, modes in bench.MODES.items() for mode in modes if mode != "idle"]


def through_reference(protocol: str, data: bytes) -> tuple[int, list]:
    """Events the reference counts in ``data`` and its decoded answers."""
    unpacker, out = msgpack.Unpacker(), []
    unpacker.feed(data)
    n = ref.PROTOCOLS[protocol][0](unpacker, out, lambda: None)
    return n, [msgpack.unpackb(a) for a in out]


@pytest.mark.parametrize(("protocol", "mode"), CASES)
def test_reference_counts_every_event_and_answers_every_corr(protocol: str, mode: str) -> None:
    p = bench.payload(protocol, mode, 10, 3)
    data, events = bench.payload_bytes(p)
    n, answers = through_reference(protocol, data)
    assert n == events
    window = [] if p["chunk"] else list(range(1, len(p["frames"]) + 1))
    assert [bench.answer_corr(a) for a in answers] == window


@pytest.mark.parametrize("protocol", bench.MODES)
def test_finale_is_answered_as_the_generator_expects(protocol: str) -> None:
    last, answer, events = bench.finale(protocol)
    assert through_reference(protocol, last) == (events, [answer])


@pytest.mark.parametrize("mode", bench.MODES["forward"])
def test_forward_payloads_decode_alike_in_evserver(mode: str) -> None:
    p = bench.payload("forward", mode, 10, 3)
    data, events = bench.payload_bytes(p)
    decoder = ForwardConnection()
    decoder.receive_data(data)
    requests = list(decoder)
    assert sum(len(r.events) for r in requests) == events
    assert not any(r.skipped for r in requests)
    assert [r.chunk for r in requests if r.chunk] == ([] if p["chunk"] else ["1", "2", "3"])


@pytest.mark.timeout(60)
def test_forward_run_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    """evserver's processed count must equal the events sent (bench.check_processed)."""
    assert bench.main(["--protocol", "forward", "--mode", "single", "--target", "evserver",
                       "--duration", "0.2", "--no-pin", "--generators", "1", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)["modes"]["fwd-single"]["evserver"]
    assert figures["events"] > 0


def keys_of(protocol: str, data: bytes) -> list[list[int]]:
    """The ``key`` of every event in ``data``, frame by frame (Forward: as evserver decodes)."""
    if protocol == "forward":
        decoder = ForwardConnection()
        decoder.receive_data(data)
        return [[e.data["key"] for e in request.events] for request in decoder]
    unpacker = msgpack.Unpacker()
    unpacker.feed(data)
    return [[e[1]["key"] for e in (f[2] if f[0] == bench.BATCH else [f[2]])] for f in unpacker]


@pytest.mark.parametrize(("protocol", "mode"), CASES)
def test_ordered_payloads_cycle_over_the_keys(protocol: str, mode: str) -> None:
    p = bench.payload(protocol, mode, 10, 2, keys=3)
    if mode == "rr":  # connection i sends key i % K
        assert [keys_of(protocol, b"".join(v)) for v in p["variants"]] == [[[0]], [[1]], [[2]]]
        return
    data, events = bench.payload_bytes(p)
    frames = keys_of(protocol, data)
    if mode == "single":
        assert [k for f in frames for k in f] == [i % 3 for i in range(events)]
    else:  # every batch cycles over the keys
        assert frames == [[i % 3 for i in range(10)]] * (events // 10)


def options(**kw: object) -> argparse.Namespace:
    return bench.parser().parse_args(
        [f"--{k.replace('_', '-')}={v}" for k, v in kw.items() if v is not True]
        + [f"--{k.replace('_', '-')}" for k, v in kw.items() if v is True])


def test_bound_is_what_the_pool_keys_and_events_in_flight_allow() -> None:
    acked = {"mode": "acked", "connections": 1, "batch": 1000, "handler_wait": 10}
    assert bench.bound("acked", options(**acked)) == pytest.approx(6400)
    assert bench.bound("acked", options(**acked, pool_size=512)) == pytest.approx(51200)
    assert bench.bound("acked", options(**acked, ordered_keys=10)) == pytest.approx(1000)
    assert bench.bound("rr", options(mode="rr", handler_wait=10)) == pytest.approx(5000)
    assert bench.bound("rr", options(mode="rr", handler_cpu=100)) == pytest.approx(10000)
    assert bench.bound("rr", options(mode="rr", handler_wait=10, handler_cpu=100,
                                     connections=2)) == pytest.approx(2 / 0.0101)


def test_suite_rows_keep_common_options_and_let_rows_win() -> None:
    rows = bench.suite_rows("issue13", ["--repeat", "3", "--suite", "issue13", "--batch", "7"])
    assert [name for name, *_ in rows][:4] == ["io-acked-64", "io-acked-512", "io-rr-50",
                                                "ordered-10"]
    parsed = {name: bench.parser().parse_args(argv) for name, _, argv in rows}
    assert all(a.repeat == 3 and a.suite is None for a in parsed.values())
    assert parsed["io-acked-512"].batch == 1000 and parsed["io-acked-512"].pool_size == 512
    assert parsed["noop-acked-listener"].listener and parsed["noop-acked"].batch == 7


def test_fire_and_forget_with_handler_costs_needs_a_rate() -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--mode", "batch", "--handler-wait", "1"])
    assert exc.value.code == 2


def run_bench(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert bench.main([*argv, "--duration", "0.2", "--no-pin", "--generators", "1",
                       "--json"]) == 0
    return json.loads(capsys.readouterr().out)["modes"]


@pytest.mark.timeout(90)
def test_handler_wait_runs_evserver_and_the_asyncio_reference(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A batch of 50 events that each wait 5 ms: asyncio's tasks all start at once, capped by
    the pool; evserver reports its own concurrency, which the pool also caps."""
    modes = run_bench(capsys, "--mode", "acked", "--connections", "1", "--batch", "50",
                      "--handler-wait", "5", "--pool-size", "40", "--target", "evserver")
    entry = modes["acked"]
    assert entry["evserver"]["events"] > 0 and entry["asyncio"]["events"] > 0
    assert entry["asyncio"]["max_in_flight"] == 40
    assert 1 <= entry["evserver"]["max_in_flight"] <= 40
    assert entry["bound"]["events_per_s"] == pytest.approx(40 / 0.005)
    assert {"evserver/asyncio ratio", "evserver/bound ratio", "asyncio/bound ratio"} <= set(entry)


@pytest.mark.timeout(90)
def test_handler_wait_over_50_request_reply_connections(
        capsys: pytest.CaptureFixture[str]) -> None:
    """50 connections with one request each in flight, a pool of 40: neither server may run
    more than the pool, and each answers every request (latency percentiles reported)."""
    modes = run_bench(capsys, "--mode", "rr", "--connections", "50", "--handler-wait", "5",
                      "--pool-size", "40", "--target", "evserver")
    entry = modes["rr"]
    for target in ("asyncio", "evserver"):
        assert entry[target]["rt_per_s"] > 0 and "p99_us" in entry[target]
        assert 1 <= entry[target]["max_in_flight"] <= 40
    assert entry["bound"]["events_per_s"] == pytest.approx(40 / 0.005)


@pytest.mark.timeout(90)
def test_ordered_keys_cap_concurrency_at_the_key_count(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Over 3 keys at most 3 handlers may run at once, whatever the pool (Forward, batches)."""
    modes = run_bench(capsys, "--protocol", "forward", "--mode", "acked", "--connections", "1",
                      "--batch", "30", "--handler-wait", "2", "--ordered-keys", "3",
                      "--target", "evserver")
    entry = modes["fwd-acked"]
    assert entry["asyncio"]["max_in_flight"] == 3
    assert 1 <= entry["evserver"]["max_in_flight"] <= 3
    assert entry["evserver"]["events"] > 0


@pytest.mark.timeout(90)
def test_cpu_spin_and_listener_over_request_reply(capsys: pytest.CaptureFixture[str]) -> None:
    """A spin never yields, so exactly one handler runs at a time; every event also runs the
    listener, and evserver's processed count still matches what was sent."""
    modes = run_bench(capsys, "--mode", "rr", "--connections", "4", "--handler-cpu", "50",
                      "--listener", "--target", "evserver")
    entry = modes["rr"]
    assert "asyncio" not in entry  # no wait: nothing for the asyncio reference to overlap
    assert entry["evserver"]["rt_per_s"] > 0 and entry["evserver"]["max_in_flight"] == 1
    assert "p99_us" in entry["evserver"]


@pytest.mark.timeout(90)
def test_paced_fire_and_forget_with_waits_counts_every_event(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The PING's answer proves dispatch, not completion: the run ends when evserver's
    /stats has counted every event sent (bench.main fails otherwise)."""
    modes = run_bench(capsys, "--mode", "batch", "--batch", "10", "--rate", "2000",
                      "--handler-wait", "2", "--target", "evserver")
    entry = modes["batch"]
    assert entry["evserver"]["events"] > 0 and entry["asyncio"]["events"] > 0
    assert entry["bound"]["events_per_s"] == 2000


def test_listener_option_gives_every_bench_event_a_listener(
        monkeypatch: pytest.MonkeyPatch) -> None:
    costs, app = importlib.import_module("bench_costs"), importlib.import_module("bench_app")
    try:
        assert not app.app.route("bench").listeners
        monkeypatch.setenv("BENCH_LISTENER", "1")
        monkeypatch.setenv("BENCH_ORDERED_KEYS", "4")
        importlib.reload(costs)
        importlib.reload(app)
        route = app.app.route("bench")
        assert len(route.listeners) == 1
        assert route.processor is not None and route.processor.options["ordered_by"] == "key"
    finally:
        monkeypatch.undo()
        importlib.reload(costs)
        importlib.reload(app)


def test_core_busy_counts_what_ran_on_that_core() -> None:
    """others% is the core's busy time minus the server's: the core's must include ours."""
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        before = bench.core_busy(0)
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
        after = bench.core_busy(0)
    finally:
        os.sched_setaffinity(0, affinity)
    assert after - before >= 0.25
