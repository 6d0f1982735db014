"""The smallest eventlet receiver of evserver's protocols: the yardstick for the bench.

It does only what the protocol forces (decode, look the handler up by type or tag, call it
inline, answer) the cheapest way eventlet allows: inline dispatch, a reused 64 KiB
buffer, one coalesced sendall per recv, an explicit yield every YIELD_EVERY events. Whatever
evserver costs beyond this is the price of its features. ``--protocol forward`` speaks Fluentd
Forward instead of the native protocol, with the same connection loop. ``ceiling`` runs the
same frame loop with no network at all, so (ceiling - receiver) is what the socket path costs.
"""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Callable, Iterable

import eventlet
import msgpack

HELLO, EVENT, BATCH, REQUEST, ACK, REPLY, ERROR, PING, PONG = range(9)
YIELD_EVERY = 100
HELLO_FRAME = msgpack.packb([HELLO, 1, {"server": "ref_receiver", "max_frame_bytes": 1 << 20}])
# One buffer for all connections: feed() copies it before any green switch can happen, and a
# 64 KiB buffer per connection would be 64 KiB of RSS per idle connection.
BUF = bytearray(64 * 1024)
VIEW = memoryview(BUF)


def noop(event: list) -> None:
    return None


HANDLERS: dict[str, Callable[[list], object]] = {"bench": noop}


def process(frames: Iterable[list], out: list[bytes], pause: Callable[[], None]) -> int:
    """Dispatch decoded frames, append encoded answers to ``out``; return the event count."""
    packb, handlers, n, next_pause = msgpack.packb, HANDLERS, 0, YIELD_EVERY
    for frame in frames:
        kind = frame[0]
        if kind == EVENT:
            event = frame[2]
            handlers[event[0]](event)
            n += 1
            if frame[1]:
                out.append(packb([ACK, frame[1]]))
        elif kind == BATCH:
            for event in frame[2]:
                handlers[event[0]](event)
            n += len(frame[2])
            if frame[1]:
                out.append(packb([ACK, frame[1]]))
        elif kind == REQUEST:
            event = frame[2]
            out.append(packb([REPLY, frame[1], handlers[event[0]](event)]))
            n += 1
        elif kind == PING:
            out.append(packb([PONG, frame[1]]))
        if n >= next_pause:  # recv only yields on EAGAIN: a busy peer would starve the others
            pause()
            next_pause = n + YIELD_EVERY
    return n


def process_forward(requests: Iterable[list], out: list[bytes], pause: Callable[[], None]) -> int:
    """``process`` for Forward requests: Message, Forward or PackedForward mode; chunk acked."""
    packb, handlers, n, next_pause = msgpack.packb, HANDLERS, 0, YIELD_EVERY
    for request in requests:
        handler, body, base = handlers[request[0]], request[1], 2
        if type(body) is list:  # Forward: [tag, [[time, record], ...](, option)]
            for entry in body:
                handler(entry)
            n += len(body)
        elif type(body) is bytes:  # PackedForward: [tag, bin of concatenated entries(, option)]
            unpacker = msgpack.Unpacker(max_buffer_size=len(body))
            unpacker.feed(body)
            for entry in unpacker:
                handler(entry)
                n += 1
        else:  # Message: [tag, time, record(, option)]
            handler(request)
            n, base = n + 1, 3
        if len(request) > base and "chunk" in request[base]:
            out.append(packb({"ack": request[base]["chunk"]}))
        if n >= next_pause:
            pause()
            next_pause = n + YIELD_EVERY
    return n


Processor = Callable[[Iterable[list], list[bytes], Callable[[], None]], int]
PROTOCOLS: dict[str, tuple[Processor, bytes]] = {  # frame loop, greeting sent on accept
    "native": (process, HELLO_FRAME), "forward": (process_forward, b"")}


def handle(sock: socket.socket, protocol: str) -> None:
    """One green thread per connection; the Unpacker is created lazily (41 KiB each)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf, view, unpacker = BUF, VIEW, None
    process, greeting = PROTOCOLS[protocol]
    try:
        if greeting:
            sock.sendall(greeting)
        while n := sock.recv_into(buf):
            if unpacker is None:
                unpacker = msgpack.Unpacker(max_buffer_size=8 << 20)
            unpacker.feed(view[:n])
            out: list[bytes] = []
            process(unpacker, out, eventlet.sleep)
            if out:
                sock.sendall(b"".join(out))
    except (OSError, ValueError, KeyError, msgpack.UnpackException):
        pass  # bad frame or peer gone: drop the connection, never reuse the Unpacker
    finally:
        sock.close()


def serve(host: str, port: int, protocol: str) -> None:
    server = eventlet.listen((host, port), backlog=4096)
    while True:
        sock, _ = server.accept()
        eventlet.spawn_n(handle, sock, protocol)


def ceiling(data: bytes, events_per_copy: int, duration: float, protocol: str) -> dict[str, float]:
    """Decode + dispatch pre-encoded ``data`` in 64 KiB slices, no network: the upper bound."""
    view, n, copies, process = memoryview(data), 0, 0, PROTOCOLS[protocol][0]
    start = time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - start < duration:
        unpacker = msgpack.Unpacker(max_buffer_size=8 << 20)
        for off in range(0, len(data), 64 * 1024):
            unpacker.feed(view[off : off + 64 * 1024])
            n += process(unpacker, [], lambda: None)
        copies += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    assert n == copies * events_per_copy, (n, copies, events_per_copy)
    return {"events": n, "wall": wall, "events_per_s": n / wall, "cpu_us_per_event": cpu / n * 1e6}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=24230)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="native")
    args = parser.parse_args()
    serve(args.host, args.port, args.protocol)
