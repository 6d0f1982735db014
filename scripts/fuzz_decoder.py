"""Coverage-guided fuzzing of the native frame decoder with atheris, for long runs.

    pip install atheris
    python scripts/fuzz_decoder.py -max_total_time=3600 [corpus_dir]
    python scripts/fuzz_decoder.py --smoke 20000   # a quick self-check, no libFuzzer flags

The input's first byte picks the chunking (how ``recv`` splits the stream) and the decode
method; the rest is the byte stream. The same properties as tests/test_fuzz.py are checked:
only ``ProtocolError`` escapes, buffers stay within a frame plus a chunk, a failed reader
stays failed, and every frame let through has the shape the dispatcher relies on. Any other
exception is a crash that atheris saves as a reproducer. The normal test suite does not need
atheris; tests/test_fuzz.py runs the same checks with hypothesis.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evserver import protocol as p
from evserver.errors import ProtocolError
from evserver.event import Event

MAX = 1024
_CHUNK = 1 << 16


def _check(frame: p.Frame) -> None:
    if frame.kind not in p.SERVER_RECEIVES or type(frame.corr) is not int:
        raise AssertionError(f"bad frame let through: {frame!r}")
    if not 0 <= frame.corr <= p.MAX_CORR:
        raise AssertionError(f"corr out of range: {frame!r}")
    if frame.kind in (p.EVENT, p.BATCH, p.REQUEST):
        for ev in frame.body:
            if not isinstance(ev, Event) or type(ev.type) is not str or not ev.type:
                raise AssertionError(f"bad event let through: {ev!r}")
            if ev.meta is not None and type(ev.meta) is not dict:
                raise AssertionError(f"bad meta let through: {ev!r}")
            if ev.id is not None and type(ev.id) is not str:
                raise AssertionError(f"bad id let through: {ev!r}")


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, stream = data[0], data[1:]
    step = 1 + (mode & 0x3F) * 7  # 1 .. 442-byte chunks
    use_frames = bool(mode & 0x40)
    reader = p.FrameReader(p.SERVER_RECEIVES, max_frame_bytes=MAX)
    try:
        for i in range(0, len(stream), step):
            reader.receive_data(stream[i:i + step])
            if use_frames:
                frames = reader.frames(coalesce=4)
            else:
                frames = []
                while (frame := reader.next_frame()) is not None:
                    frames.append(frame)
            for frame in frames:
                _check(frame)
            if reader.buffered > MAX + _CHUNK:
                raise AssertionError(f"reader holds {reader.buffered} bytes")
    except ProtocolError:
        try:
            reader.receive_data(b"\x90")
        except ProtocolError:
            return
        raise AssertionError("a failed reader accepted more input") from None


def _smoke(n: int) -> None:
    """Random and mutated-valid inputs without atheris: a check that the harness works."""
    rng = random.Random(0)
    seeds = [p.encode_event(1, ["a.b", {"x": 1}], request=True), p.encode_batch(0, [["t", 1]]),
             p.encode_hello({"auth": {"cnonce": b"x" * 16, "proof": b"y" * 32}}),
             p.encode_ping(3)]
    for _ in range(n):
        stream = bytearray(b"".join(rng.choices(seeds, k=rng.randint(0, 4))))
        for _ in range(rng.randint(0, 4)):
            if stream:
                stream[rng.randrange(len(stream))] = rng.randrange(256)
        if rng.random() < 0.2:
            stream += rng.randbytes(rng.randint(0, 2 * MAX))
        one_input(bytes([rng.randrange(256)]) + bytes(stream))
    print(f"smoke: {n} inputs, no crash")


def main() -> None:
    if sys.argv[1:2] == ["--smoke"]:
        _smoke(int(sys.argv[2]) if len(sys.argv) > 2 else 10000)
        return
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
