"""The asyncio client against real servers, on the default loop and on uvloop.

In-process servers (``serve_in_thread``) where a test reads the server's counters,
``evserver serve`` subprocesses (conftest.py) where it kills and restarts one.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from conftest import APPS, REPO, ServerFactory, crash_mid_stream

from evserver import App, Event, RemoteError
from evserver.aio import AsyncClient
from evserver.auth import AuthError
from evserver.errors import ClientConnectionError, FrameTooLarge
from evserver.testing import ThreadedServer, serve_in_thread

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
BASIC = f"{APPS}/basic.py:app"
KEY = "k" * 32
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine to completion on the parametrized loop."""
    def run(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(coro)
    return run


def make_app() -> App:
    app = App()
    app.seen = []  # type: ignore[attr-defined]

    @app.processor("echo")
    def echo(event: Event) -> Any:
        return event.data

    @app.processor("sleep")
    def sleep(event: Event) -> Any:
        from evserver._eventlet import eventlet

        eventlet.sleep(event.data["sleep"])  # the handler's own work: answers cross over
        return event.data

    @app.processor("fail")
    def fail(event: Event) -> None:
        raise ValueError(f"bad {event.data}")

    @app.processor("meta")
    def meta(event: Event) -> Any:
        return {"id": event.id, "meta": event.meta}

    @app.listener("tick")
    def tick(event: Event) -> None:
        app.seen.append(event.data)  # type: ignore[attr-defined]

    return app


@pytest.fixture
def server() -> Iterator[ThreadedServer]:
    with serve_in_thread(make_app()) as server:
        yield server


def seen(server: ThreadedServer) -> list[Any]:
    return server.dispatcher.app.seen  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- the API


def test_send_request_ack_ping_flush(server: ThreadedServer, run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with AsyncClient(*server.address, timeout=10) as client:
            await client.flush()  # nothing sent: no connection needed
            assert await client.request("echo", {"x": [1, b"\x00"]}) == {"x": [1, b"\x00"]}
            assert 0 < await client.ping() < 5
            for i in range(100):
                await client.send("tick", i)
            await client.flush()
            assert await client.send("tick", "acked", ack=True, id="mine") == "mine"
            reply = await client.request("meta", meta={"k": "v"})
            assert reply["meta"] == {"k": "v"} and reply["id"]
            with pytest.raises(RemoteError) as info:
                await client.request("fail", 1)
            assert (info.value.type, info.value.message) == ("ValueError", "bad 1")
            with pytest.raises(RemoteError) as info:
                await client.request("nothing.here")
            assert info.value.code == "no_handler"
            with pytest.raises(FrameTooLarge):
                await client.send("echo", b"x" * (1 << 20))
            with pytest.raises(TimeoutError, match="no answer"):
                await client.request("sleep", {"sleep": 0.5}, timeout=0.05)
            assert await client.request("echo", 2) == 2  # the late reply is ignored
            assert client.server_info["server"].startswith("evserver/")

    run(main())
    assert seen(server)[:100] == list(range(100)) and seen(server)[100] == "acked"
    assert server.counters["connections_total"] == 1


def test_send_many_fire_and_forget_and_acked(server: ThreadedServer,
                                             run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with AsyncClient(*server.address, window=4) as client:
            assert await client.send_many(("tick", i) for i in range(20_000)) == 20_000
            await client.send_many([("tick", i) for i in range(20_000, 30_000)], ack=True,
                                   batch_size=100)
            assert len(seen(server)) == 30_000  # every ack came after its events ran
            with pytest.raises(RemoteError, match="ValueError") as info:
                await client.send_many([("fail" if i % 100 == 7 else "echo", i)
                                        for i in range(1000)], ack=True, batch_size=50)
            assert info.value.__notes__ == ["10 of 20 batches failed; the others were processed"]

    run(main())
    assert sorted(seen(server)) == list(range(30_000))


def test_a_thousand_concurrent_requests_from_a_hundred_tasks_over_one_connection(
        server: ThreadedServer, run: Callable[..., Any]) -> None:
    """Every answer reaches the task that asked, although answers come back in another
    order (the first request sleeps in its handler, so the server answers it, and the
    others read with it, after requests sent later)."""
    order: list[tuple[int, int]] = []

    async def task(client: AsyncClient, t: int) -> list[Any]:
        async def one(i: int) -> Any:
            first = (t, i) == (0, 0)
            data = {"task": t, "i": i, "sleep": 0.05} if first else {"task": t, "i": i}
            reply = await client.request("sleep" if first else "echo", data)
            order.append((t, i))
            return reply
        return await asyncio.gather(*(one(i) for i in range(10)))

    async def main() -> list[list[Any]]:
        async with AsyncClient(*server.address) as client:
            # A slow request first, then the burst: its answers do not wait for each other.
            await client.request("sleep", {"task": -1, "i": -1, "sleep": 0.01})
            return await asyncio.gather(*(task(client, t) for t in range(100)))

    replies = run(main())
    for t, answers in enumerate(replies):
        for i, reply in enumerate(answers):
            assert (reply["task"], reply["i"]) == (t, i)
    assert len(order) == 1000
    assert order != sorted(order, key=lambda ti: (ti[0] * 10 + ti[1]))  # not one by one
    assert server.counters["connections_total"] == 1


def test_shared_key_handshake(run: Callable[..., Any]) -> None:
    async def main(address: tuple[str, int]) -> None:
        async with AsyncClient(*address, shared_key=KEY) as client:
            assert await client.request("echo", 1) == 1
            assert client.server_info["auth"] == "hmac-sha256"
            await client.send_many([("tick", i) for i in range(50)], ack=True)
        with pytest.raises(AuthError):
            async with AsyncClient(*address, shared_key="w" * 32, retries=0) as client:
                await client.request("echo", 1)

    with serve_in_thread(make_app(), settings={"security.shared_keys": {"default": KEY}}) as server:
        run(main(server.address))
        assert server.counters["auth_failures"] == 1
    assert seen(server) == list(range(50))


def test_refuses_a_server_that_does_not_authenticate(server: ThreadedServer,
                                                     run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with AsyncClient(*server.address, shared_key=KEY) as client:
            with pytest.raises(AuthError, match="does not offer"):
                await client.send("tick", "secret", ack=True)

    run(main())
    assert seen(server) == []


def test_tls(tmp_path: Path, run: Callable[..., Any]) -> None:
    from tlscerts import make_pki

    pki = make_pki(tmp_path)

    async def main(address: tuple[str, int]) -> None:
        async with AsyncClient(*address, tls=True, cafile=str(pki.ca)) as client:
            assert await client.request("echo", {"big": "x" * 200_000}) == {"big": "x" * 200_000}
            await client.send_many([("tick", i) for i in range(100)], ack=True)
        with pytest.raises(ClientConnectionError, match="certificate verify failed"):
            await AsyncClient(*address, tls=True).request("echo", 1)  # not the system's CA

    with serve_in_thread(make_app(), settings=pki.settings()) as server:
        run(main(server.address))
    assert seen(server) == list(range(100))


def test_connection_refused_is_a_client_connection_error(run: Callable[..., Any]) -> None:
    from conftest import free_port

    port = free_port()

    async def main() -> None:
        client = AsyncClient("127.0.0.1", port, retries=2, backoff=0.01)
        with pytest.raises(ClientConnectionError,
                           match=rf"^cannot connect to 127\.0\.0\.1:{port}: .*refused"):
            await client.connect()
        with pytest.raises(ClientConnectionError):
            await client.request("echo")

    run(main())


def test_bad_frame_is_raised_not_retried_and_the_client_recovers(
        server: ThreadedServer, run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with AsyncClient(*server.address) as client:
            assert await client.request("echo", 1) == 1
            with pytest.raises(RemoteError) as info:  # int map keys are refused by the server
                await client.request("echo", {1: "x"})
            assert info.value.code == "bad_frame"
            assert await client.request("echo", 2) == 2  # reconnected on the next call

    run(main())
    assert server.counters["connections_total"] == 2


def test_reconnects_after_an_idle_timeout(run: Callable[..., Any]) -> None:
    async def main(server: ThreadedServer) -> None:
        async with AsyncClient(*server.address) as client:
            await client.send("tick", 1, ack=True)
            conn = client._conn
            assert conn is not None
            await asyncio.wait_for(conn.closed, 10)  # the server's idle timeout closed it
            await client.send("tick", 2)  # must not vanish into the closed connection
            await client.send("tick", 3, ack=True)

    with serve_in_thread(make_app(), idle_timeout=0.3) as server:
        run(main(server))
        assert server.counters["idle_closed"] >= 1
    assert seen(server) == [1, 2, 3]


def test_close_fails_the_calls_still_waiting(run: Callable[..., Any]) -> None:
    """A call waiting for a connection (here: a peer that never greets, so the shared-key
    handshake cannot finish) gets ``ClientConnectionError`` when the client is closed."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody talks

        async def main() -> None:
            client = AsyncClient(*silent.getsockname()[:2], shared_key=KEY, timeout=30)
            call = asyncio.ensure_future(client.request("echo", 1))
            await asyncio.sleep(0)  # one step: the call starts the connection and waits
            assert client._connecting is not None and not call.done()
            await client.close()
            with pytest.raises(ClientConnectionError, match="closed"):
                await call

        run(main())


# ---------------------------------------------------------------------- reconnect and resend


def test_acked_send_many_loses_nothing_across_a_server_restart(
        server_factory: ServerFactory, tmp_path: Path) -> None:
    """SIGKILL the server while 100,000 acked events stream in batches, restart it on the
    same port: every event is processed at least once, the re-sent ones under their ids."""
    record = tmp_path / "seen"
    total = 100_000

    def stream(address: tuple[str, int], crash: Callable[[], None]) -> None:
        def events() -> Iterator[tuple[str, Any]]:
            for i in range(total):
                if i == 30_000:  # batches are in flight, their acks unread (the loop is held)
                    crash()
                yield ("rec", i)

        async def send() -> int:
            async with AsyncClient(*address, retries=100, backoff=0.01,
                                   backoff_max=0.2) as client:
                return await client.send_many(events(), ack=True, batch_size=250)

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert runner.run(send()) == total

    second = crash_mid_stream(server_factory, BASIC, {"BASIC_RECORD": str(record)}, stream)
    lines = record.read_text().splitlines()
    assert {json.loads(line.split("\t", 1)[1]) for line in lines} == set(range(total))
    assert second.proc.poll() is None


def test_never_imports_eventlet() -> None:
    """An asyncio application gets no eventlet (and no monkey patching) from the client."""
    code = ("import sys, asyncio, evserver.aio\n"
            "assert 'eventlet' not in sys.modules, 'eventlet imported'\n"
            "async def main():\n"
            "    c = evserver.aio.AsyncClient('127.0.0.1', 1, retries=0)\n"
            "    try:\n"
            "        await c.ping()\n"
            "    except ConnectionError:\n"
            "        pass\n"
            "asyncio.run(main())\n"
            "assert 'eventlet' not in sys.modules, 'eventlet imported'\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
