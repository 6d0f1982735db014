"""An asyncio receiver of evserver's protocols with parallel handlers: the bench's yardstick
for handlers that wait.

Each event's handler runs as its own task under a semaphore of ``--pool-size`` (what a
careful asyncio server does); the handler is the bench's (scripts/bench_costs.py: a wait,
``asyncio.sleep``, then a CPU spin), events of one key run in arrival order when
``BENCH_ORDERED_KEYS`` is set, different keys in parallel. A batch (or Forward chunk) is acked
once all its events have finished, a request is answered when its handler has; a PING is
answered once every earlier event of the connection has finished. Replies go out as they
are ready; the bench matches them by corr. uvloop is used when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack
from bench_costs import KEYS, SPIN, WAIT, in_flight, spin

HELLO, EVENT, BATCH, REQUEST, ACK, REPLY, ERROR, PING, PONG = range(9)
HELLO_FRAME = msgpack.packb([HELLO, 1, {"server": "ref_asyncio", "max_frame_bytes": 1 << 20}])
READ_AHEAD = 4096  # events a connection may have pending before it stops reading


async def handler(data: Any) -> None:
    in_flight.enter()
    try:
        if WAIT:
            await asyncio.sleep(WAIT)
        if SPIN:
            spin(SPIN)
    finally:
        in_flight.leave()


class Connection:
    """One peer: its pending event tasks and the per-key tails for ordered events."""

    tails: dict[Any, asyncio.Task] = {}  # ordering keys are global, as in evserver

    def __init__(self, writer: asyncio.StreamWriter, slots: asyncio.Semaphore) -> None:
        self.writer = writer
        self.slots = slots
        self.pending: set[asyncio.Task] = set()

    def start(self, data: Any) -> asyncio.Task:
        """Run one event's handler as a task, after the previous event of its key."""
        if not KEYS:
            task = asyncio.create_task(self._run(data, None))
        else:
            key = data["key"]
            task = asyncio.create_task(self._run(data, self.tails.get(key)))
            self.tails[key] = task
            task.add_done_callback(lambda done: self._untail(key, done))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return task

    def _untail(self, key: Any, task: asyncio.Task) -> None:
        if self.tails.get(key) is task:  # nothing queued behind it: keep the dict small
            del self.tails[key]

    async def _run(self, data: Any, previous: asyncio.Task | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        async with self.slots:
            await handler(data)

    def answer_after(self, tasks: list[asyncio.Task], answer: bytes) -> None:
        """Send ``answer`` once ``tasks`` have finished."""
        left = len(tasks)

        def one_done(_: asyncio.Task) -> None:
            nonlocal left
            left -= 1
            if not left:
                self.writer.write(answer)

        if not tasks:
            self.writer.write(answer)
        for task in tasks:
            task.add_done_callback(one_done)

    def native(self, frame: list) -> None:
        kind = frame[0]
        if kind == EVENT:
            task = self.start(frame[2][1])
            if frame[1]:
                self.answer_after([task], msgpack.packb([ACK, frame[1]]))
        elif kind == REQUEST:
            self.answer_after([self.start(frame[2][1])], msgpack.packb([REPLY, frame[1], None]))
        elif kind == BATCH:
            tasks = [self.start(event[1]) for event in frame[2]]
            if frame[1]:
                self.answer_after(tasks, msgpack.packb([ACK, frame[1]]))
        elif kind == PING:
            self.answer_after(list(self.pending), msgpack.packb([PONG, frame[1]]))

    def forward(self, request: list) -> None:
        """Message, Forward or PackedForward mode; the ``chunk`` option asks for an ack."""
        body, base = request[1], 2
        if type(body) is list:
            tasks = [self.start(entry[1]) for entry in body]
        elif type(body) is bytes:
            entries = msgpack.Unpacker(max_buffer_size=len(body))
            entries.feed(body)
            tasks = [self.start(entry[1]) for entry in entries]
        else:
            tasks, base = [self.start(request[2])], 3
        if len(request) > base and "chunk" in request[base]:
            self.answer_after(tasks, msgpack.packb({"ack": request[base]["chunk"]}))


async def serve(host: str, port: int, protocol: str, pool_size: int) -> None:
    slots = asyncio.Semaphore(pool_size)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(writer, slots)
        dispatch: Callable[[list], None] = conn.native if protocol == "native" else conn.forward
        unpacker = msgpack.Unpacker(max_buffer_size=8 << 20)
        try:
            if protocol == "native":
                writer.write(HELLO_FRAME)
            while data := await reader.read(65536):
                unpacker.feed(data)
                for frame in unpacker:
                    dispatch(frame)
                while len(conn.pending) >= READ_AHEAD:  # backpressure, as evserver's queue
                    await asyncio.wait(conn.pending, return_when=asyncio.FIRST_COMPLETED)
                await writer.drain()
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
            pass  # bad frame or peer gone: drop the connection
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=24231)
    parser.add_argument("--protocol", choices=["native", "forward"], default="native")
    parser.add_argument("--pool-size", type=int, default=64, help="handlers running at once")
    args = parser.parse_args()
    run(serve(args.host, args.port, args.protocol, args.pool_size))
