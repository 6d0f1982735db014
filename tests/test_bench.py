"""The bench's pre-encoded payloads against the reference's frame loops and evserver's Forward
decoder: they must agree on every event and every ack, or the bench's ratios compare unlike
work. One short run checks the wiring end to end; speed is measured by scripts/bench.py."""

from __future__ import annotations

import importlib
import json
import sys
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
    last, answer, events = bench.FINALES[protocol]
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
