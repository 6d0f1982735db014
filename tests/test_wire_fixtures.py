"""Wire fixtures as data (gunicorn's ``tests/requests/valid|invalid``): bytes on the wire in
``tests/wire/<protocol>/<valid|invalid>/NAME.hex`` with the expected result in ``NAME.json``.

Each fixture is fed three ways (whole, one byte at a time, and with the start of another
frame behind it), so a decoder that took one ``recv`` for one message, or lost bytes between
feeds, fails here. Add a case by adding two files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evserver import protocol as p
from evserver.errors import ProtocolError
from evserver.forward import ForwardConnection

WIRE = Path(__file__).resolve().parent / "wire"
TRAILER = {"native": p.encode_ping(1)[:1], "forward": b"\x93"}  # an incomplete next frame


def cases(validity: str) -> list[Any]:
    found = sorted(WIRE.glob(f"*/{validity}/*.hex"))
    assert {path.parent.parent.name for path in found} == set(TRAILER), found
    return [pytest.param(path, id=f"{path.parent.parent.name}-{path.stem}") for path in found]


def load(path: Path) -> tuple[str, bytes, Any]:
    text = "".join(line for line in path.read_text().splitlines() if not line.startswith("#"))
    expected = json.loads(path.with_suffix(".json").read_text())
    return path.parent.parent.name, bytes.fromhex(text), expected


def feeds(data: bytes, protocol: str) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [data]
    yield "bytewise", [data[i:i + 1] for i in range(len(data))]
    yield "trailing", [data + TRAILER[protocol]]


def native(chunks: list[bytes]) -> list[dict[str, Any]]:
    """The frames decoded, as the fixtures' JSON has them: kind, corr, events' [type, data]."""
    reader = p.FrameReader(p.SERVER_RECEIVES)
    frames: list[dict[str, Any]] = []
    for chunk in chunks:
        reader.receive_data(chunk)
        while (frame := reader.next_frame()) is not None:
            out: dict[str, Any] = {"kind": p.KIND_NAMES[frame.kind], "corr": frame.corr}
            if frame.kind in p.EVENT_KINDS:
                out["events"] = [[e.type, e.data] for e in frame.body]
            frames.append(out)
    return frames


def forward(chunks: list[bytes]) -> dict[str, Any]:
    """The requests decoded: their events' [tag, record, time] and the chunks to ack."""
    decoder = ForwardConnection()
    events: list[list[Any]] = []
    acks: list[Any] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        for request in decoder.requests():
            events += [[e.type, e.data, e.time] for e in request.events]
            if request.chunk is not None:
                acks.append(request.chunk)
    return {"events": events, "acks": acks}


DECODE = {"native": native, "forward": forward}


@pytest.mark.parametrize("path", cases("valid"))
def test_valid(path: Path) -> None:
    protocol, data, expected = load(path)
    for how, chunks in feeds(data, protocol):
        assert DECODE[protocol](chunks) == expected, how


@pytest.mark.parametrize("path", cases("invalid"))
def test_invalid(path: Path) -> None:
    protocol, data, expected = load(path)
    for how, chunks in feeds(data, protocol):
        with pytest.raises(ProtocolError, match=expected["match"]) as info:
            DECODE[protocol](chunks)
        assert info.value.code == expected["error"], how
