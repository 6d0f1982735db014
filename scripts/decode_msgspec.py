"""How much decoding would gain from msgspec: one BATCH of 100 events, three decoders.

evserver decodes with msgpack-python and then builds an ``Event`` per event (with the shape
checks untrusted input needs). msgspec decodes msgpack arrays straight into C-level Structs
(``array_like=True``), which would replace both steps, at the price of ``Event`` becoming a
``msgspec.Struct`` (a public type) and a compiled dependency. This measures the gap first.

    pip install -e '.[bench]'          # msgspec, uvloop
    python scripts/decode_msgspec.py   # ns per event, best of 5 rounds of 20,000 batches
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import msgpack

from evserver import protocol as p

try:
    import msgspec
except ImportError:
    sys.exit("decode_msgspec.py needs msgspec: pip install -e '.[bench]'")

EVENTS = [["order.created", {"i": i, "sku": "A-1", "qty": 2}] for i in range(100)]
FRAME = msgpack.packb([p.BATCH, 7, EVENTS])
ROUNDS, BATCHES = 5, 20_000


def ns_per_event(decode: Callable[[], int]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.process_time()
        for _ in range(BATCHES):
            decode()
        best = min(best, (time.process_time() - start) / BATCHES / len(EVENTS) * 1e9)
    return best


def main() -> None:
    reader = p.FrameReader()

    def evserver_frames() -> int:
        reader.receive_data(FRAME)
        return len(reader.frames(coalesce=64, max_events=1000)[0].body)

    def msgpack_only() -> int:
        return len(msgpack.unpackb(FRAME)[2])

    class Ev(msgspec.Struct, array_like=True, gc=False):
        type: str
        data: object = None

    decoder = msgspec.msgpack.Decoder(tuple[int, int, list[Ev]])

    def msgspec_structs() -> int:
        return len(decoder.decode(FRAME)[2])

    for name, decode in (("evserver FrameReader (msgpack, Events, checks)", evserver_frames),
                         ("msgpack.unpackb alone (lists, no Events)", msgpack_only),
                         ("msgspec into array_like Structs", msgspec_structs)):
        assert decode() == len(EVENTS)
        print(f"{name:48} {ns_per_event(decode):6.0f} ns/event")


if __name__ == "__main__":
    main()
