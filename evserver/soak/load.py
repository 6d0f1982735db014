"""The soak's clients: native and Forward; fire-and-forget, acked batches, request/reply,
ordered keys, failing events, and a connection churner.

Each is a thread with its own connection(s) and ``ledger.Stream``; the data of every event
comes from the thread's seeded ``random.Random``. A thread counts the calls that failed
(``errors``) and goes on; what counts as acknowledged is only what the server confirmed.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from typing import Any

import msgpack

from .. import protocol as p
from ..client import Client
from ..errors import ClientConnectionError, RemoteError
from .ledger import ACKED, FAILED, Ledger, Stream

IO_TIMEOUT = 30.0


class Load(threading.Thread):
    """Calls ``step`` every ``interval`` seconds until stopped; counts failed calls."""

    interval = 0.1

    def __init__(self, name: str, ledger: Ledger, address: tuple[str, int], seed: int) -> None:
        super().__init__(daemon=True, name=f"soak-{name}")
        self.ledger = ledger
        self.address = address
        self.rng = random.Random(f"{seed}-{name}")
        self.errors: Counter[str] = Counter()
        self.halt = threading.Event()
        self.started_at = time.monotonic()

    def step(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """After the last step: settle what is outstanding, close connections."""

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.halt.is_set():
            try:
                self.step()
            except (ClientConnectionError, TimeoutError, OSError) as exc:
                self.errors[type(exc).__name__] += 1
            except RemoteError as exc:
                self.errors[f"RemoteError {exc.code}"] += 1
            next_at = max(next_at + self.interval, time.monotonic() - 1.0)
            self.halt.wait(max(0.0, next_at - time.monotonic()))
        try:
            self.finish()
        except (ClientConnectionError, TimeoutError, OSError, RemoteError) as exc:
            self.errors[f"finish: {type(exc).__name__}"] += 1

    def stop(self) -> None:
        self.halt.set()


class ClientLoad(Load):
    """A load over one native ``Client`` (``conn``), which reconnects through restarts and
    reloads and is closed after the last step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = Client(*self.address, timeout=IO_TIMEOUT, retries=60, backoff=0.02,
                           backoff_max=0.5)

    def finish(self) -> None:
        self.conn.close()


class FireLoad(ClientLoad):
    """Native fire-and-forget BATCH frames (at most once: never counted as acknowledged)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = self.ledger.stream("f0")
        self.steps = 0

    def step(self) -> None:
        ns = self.stream.new(100)
        self.conn.send_many([("soak.fire", {"i": self.stream.id(n)}) for n in ns],
                            batch_size=100)
        self.steps += 1
        if self.steps % 10 == 0:
            self.conn.flush()

    def finish(self) -> None:
        self.conn.flush()  # a barrier: everything sent was read and dispatched
        super().finish()


class BatchLoad(ClientLoad):
    """Native acked BATCH frames, several in flight; one event in 20 waits 1 ms."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = self.ledger.stream("b0")

    def step(self) -> None:
        ns = self.stream.new(100)
        events = [("soak.batch", {"i": self.stream.id(n), "w": int(self.rng.random() < 0.05)})
                  for n in ns]
        try:
            self.conn.send_many(events, ack=True, batch_size=25)
        except RemoteError:
            self.stream.mark(ns, FAILED)
            raise
        self.stream.mark(ns, ACKED)


class RequestLoad(ClientLoad):
    """Native request/reply, one at a time; keeps each round trip's latency."""

    interval = 0.005

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(name, *args, **kwargs)
        self.stream = self.ledger.stream(name)
        self.latencies: list[tuple[float, float]] = []  # (when, seconds)
        self.wrong_replies = 0

    def step(self) -> None:
        (n,) = self.stream.new(1)
        soak_id = self.stream.id(n)
        start = time.monotonic()
        reply = self.conn.request("soak.rr", {"i": soak_id, "w": self.rng.choice((0, 0, 1, 2))})
        self.latencies.append((start, time.monotonic() - start))
        if reply.get("i") != soak_id:
            self.wrong_replies += 1
        self.stream.mark([n], ACKED)


class OrderedLoad(ClientLoad):
    """Acked events of ``ordered_by`` keys, interleaved on one connection: stream ``o<k>``
    holds key k's events in the order they were sent."""

    interval = 0.05
    keys = 8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams = [self.ledger.stream(f"o{k}") for k in range(self.keys)]

    def step(self) -> None:
        sent: list[tuple[Stream, int]] = []
        events = []
        for _ in range(20):
            k = self.rng.randrange(self.keys)
            (n,) = self.streams[k].new(1)
            sent.append((self.streams[k], n))
            events.append(("soak.ordered", {"i": self.streams[k].id(n), "k": k,
                                            "w": int(self.rng.random() < 0.2)}))
        self.conn.send_many(events, ack=True, batch_size=5)
        for stream, n in sent:
            stream.mark([n], ACKED)


class FlakyLoad(ClientLoad):
    """Acked events whose processor fails 0, 1 (then succeeds on retry) or 3 times (then
    it is dead-lettered and the sender gets a ``RemoteError``)."""

    interval = 0.05

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = self.ledger.stream("x0")
        self.doomed: set[int] = set()  # sent with fails=3
        self.dead_lettered: set[int] = set()  # answered "dead-lettered"
        self.doomed_acked = 0  # a doomed event acknowledged: must stay 0

    def step(self) -> None:
        (n,) = self.stream.new(1)
        fails = self.rng.choice((0, 0, 1, 1, 3))
        if fails == 3:
            self.doomed.add(n)
        try:
            self.conn.send("soak.flaky", {"i": self.stream.id(n), "fails": fails}, ack=True)
        except RemoteError as exc:
            self.stream.mark([n], FAILED)
            if fails == 3 and "dead-lettered" in exc.message:
                self.dead_lettered.add(n)
                return
            raise
        if fails == 3:
            self.doomed_acked += 1
        self.stream.mark([n], ACKED)


class ForwardLoad(Load):
    """Fluentd Forward mode with ``chunk``: 50 records per request, acked by the server.

    A broken connection is reopened and the same request re-sent (at least once, as
    Fluent Bit does with ``Require_ack_response``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = self.ledger.stream("w0")
        self.sock: socket.socket | None = None
        self.unpacker = msgpack.Unpacker(raw=False)
        self.chunks = 0

    def step(self) -> None:
        ns = self.stream.new(50)
        self.chunks += 1
        chunk = f"soak-{self.chunks}"
        now = int(time.time())
        request = msgpack.packb(["soak.fwd", [[now, {"i": self.stream.id(n)}] for n in ns],
                                 {"chunk": chunk}])
        for attempt in range(60):
            try:
                if self._exchange(request, chunk):
                    self.stream.mark(ns, ACKED)
                    return
            except OSError as exc:
                self.errors[f"forward {type(exc).__name__}"] += 1
            self._close()
            self.halt.wait(min(0.5, 0.02 * 2 ** attempt))
        raise ClientConnectionError("Forward: no ack after 60 attempts")

    def _exchange(self, request: bytes, chunk: str) -> bool:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=IO_TIMEOUT)
            self.unpacker = msgpack.Unpacker(raw=False)
        self.sock.sendall(request)
        while True:
            for reply in self.unpacker:
                if isinstance(reply, dict) and reply.get("ack") == chunk:
                    return True
            data = self.sock.recv(65536)
            if not data:
                return False
            self.unpacker.feed(data)

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def finish(self) -> None:
        self._close()


class Churn(Load):
    """New connections, one after another: connect, PING, PONG, close.

    Every failure (refused, reset, closed before the PONG, timeout) is kept with its time,
    so the report can tell which happened during a reload or a kill.
    """

    def __init__(self, name: str, *args: Any, interval: float = 0.005, **kwargs: Any) -> None:
        super().__init__(name, *args, **kwargs)
        self.interval = interval
        self.completed = 0
        self.failures: list[tuple[float, str]] = []

    def step(self) -> None:
        start = time.monotonic()
        try:
            ping(self.address)
            self.completed += 1
        except (OSError, EOFError) as exc:
            self.failures.append((start, type(exc).__name__))


def ping(address: tuple[str, int], timeout: float = 5.0) -> None:
    """One fresh connection, one PING, its PONG; EOFError if the server closed first."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(p.encode_ping(1))
        reader = p.FrameReader(p.CLIENT_RECEIVES)
        while True:
            data = sock.recv(65536)
            if not data:
                raise EOFError("closed before the PONG")
            reader.receive_data(data)
            for frame in reader:
                if frame.kind == p.PONG:
                    return
