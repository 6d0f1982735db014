"""OpenTelemetry: one trace from a client's span through the server's processor and listener
spans, over real connections to a server that exports with the SDK's in-memory exporter
(tests/apps/traced_app.py), and no trace of OpenTelemetry where it is absent or unconfigured.

This process never sets a global tracer provider (it would turn tracing on for every other
test's in-process server): the client spans come from a provider of their own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from conftest import APPS, REPO, ServerFactory, ServerProcess, free_port
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from evserver import App, Client, Event, RemoteError
from evserver.aio import AsyncClient
from evserver.testing import serve_in_thread

pytestmark = pytest.mark.timeout(60)

TRACED = f"{APPS}/traced_app.py:app"


@pytest.fixture
def tracer() -> Iterator[Any]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    yield provider.get_tracer("test-client")
    provider.shutdown()


@pytest.fixture
def forward_port() -> int:
    return free_port()


@pytest.fixture
def server(server_factory: ServerFactory, forward_port: int) -> ServerProcess:
    return server_factory(TRACED, "--forward-enabled", "--forward-port", str(forward_port))


def spans(server: ServerProcess) -> list[dict[str, Any]]:
    with Client(*server.address) as client:
        return client.request("spans")  # type: ignore[no-any-return]


def ids(span: Any) -> tuple[str, str]:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def test_one_trace_from_client_through_processor_and_listener(
        server: ServerProcess, tracer: Any) -> None:
    with tracer.start_as_current_span("checkout") as checkout, Client(*server.address) as c:
        assert c.request("order.created", 1) == {"ok": 1}
    trace_id, parent = ids(checkout)
    seen = {(s["name"], s["attributes"].get("evserver.handler.kind")): s for s in spans(server)}
    processor = seen["order.created", "processor"]
    listener = seen["order.created", "listener"]
    for span in (processor, listener):  # both children of the client's span
        assert (span["trace_id"], span["parent_id"]) == (trace_id, parent)
        assert span["kind"] == "CONSUMER" and span["status"] == "UNSET"
        assert span["attributes"]["messaging.destination.name"] == "order.created"
        assert span["attributes"]["messaging.system"] == "evserver"
    assert processor["attributes"]["evserver.handler"].endswith("traced_app.order")
    db = seen["db.insert", None]  # the handler's own span: inside the processor's
    assert (db["trace_id"], db["parent_id"]) == (trace_id, processor["span_id"])


def test_the_async_client_carries_the_context_too(server: ServerProcess, tracer: Any) -> None:
    async def main() -> None:
        async with AsyncClient(*server.address) as client:
            with tracer.start_as_current_span("handler") as span:
                await asyncio.gather(*(client.send("order.paid", i, ack=True) for i in range(3)))
            assert await client.request("order.untraced", 0) == {"ok": 0}  # no span active
            return span

    span = asyncio.run(main())
    trace_id, parent = ids(span)
    paid = [s for s in spans(server) if s["name"] == "order.paid"]
    assert len(paid) == 6  # a processor and a listener span per event
    assert {(s["trace_id"], s["parent_id"]) for s in paid} == {(trace_id, parent)}
    (untraced,) = [s for s in spans(server) if s["name"] == "order.untraced"
                   and s["attributes"]["evserver.handler.kind"] == "processor"]
    assert untraced["parent_id"] is None and untraced["trace_id"] != trace_id  # a new trace


def test_retries_failure_and_dead_lettering_are_on_the_span(
        server: ServerProcess, tracer: Any) -> None:
    with (tracer.start_as_current_span("job") as job, Client(*server.address) as client,
          pytest.raises(RemoteError, match="dead-lettered after 3 attempt")):
        client.send("flaky", 1, ack=True)
    (span,) = [s for s in spans(server) if s["name"] == "flaky"]
    assert (span["trace_id"], span["parent_id"]) == ids(job)
    assert span["status"] == "ERROR"
    assert span["events"] == ["exception", "exception", "exception", "dead_lettered"]
    assert span["attributes"]["evserver.attempts"] == 3
    assert span["attributes"]["evserver.dead_lettered"] is True


def test_forward_takes_the_traceparent_from_the_record(
        server: ServerProcess, forward_port: int) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    record = {"msg": "hi", "traceparent": f"00-{trace_id}-{parent}-01"}
    with socket.create_connection(("127.0.0.1", forward_port), timeout=10) as sock:
        sock.sendall(msgpack.packb(["order.logged", 1700000000, record, {"chunk": "c1"}]))
        unpacker = msgpack.Unpacker()
        while (ack := next(unpacker, None)) is None:
            unpacker.feed(sock.recv(4096))
    assert ack == {"ack": "c1"}
    logged = [s for s in spans(server) if s["name"] == "order.logged"]
    assert len(logged) == 2
    assert {(s["trace_id"], s["parent_id"]) for s in logged} == {(trace_id, parent)}


def test_without_a_tracer_provider_nothing_is_wrapped_or_added(tracer: Any) -> None:
    app = App()

    @app.processor("meta")
    def meta(event: Event) -> Any:
        return event.meta

    with serve_in_thread(app) as server, Client(*server.address) as client:
        assert server.dispatcher.tracing is None  # this process configured no provider
        assert all(plan.func is plan.handler.func for plan in server.dispatcher._plans.values())
        assert client.request("meta", meta={"k": "v"}) == {"k": "v"}  # no span: no context
        with tracer.start_as_current_span("s") as span:
            traceparent = client.request("meta")["traceparent"]
        trace_id, span_id = ids(span)
        flags = span.get_span_context().trace_flags
        assert traceparent == f"00-{trace_id}-{span_id}-{flags:02x}"


NOT_INSTALLED = """
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, NotInstalled())
"""


@pytest.mark.parametrize("installed", [False, True])
def test_opentelemetry_is_not_imported_unless_the_application_uses_it(installed: bool) -> None:
    """A fresh interpreter where ``opentelemetry`` cannot be found, or is installed but not
    used: clients, server and round trips work, and no module of it is ever loaded."""
    hook = "session.meta_hook is not None" if installed else "session.meta_hook is None"
    code = ("" if installed else NOT_INSTALLED) + """
import asyncio, sys
from evserver import App, Client, session
from evserver.aio import AsyncClient
from evserver.testing import serve_in_thread

app = App()
app.processor("echo")(lambda event: [event.data, event.meta])
with serve_in_thread(app) as server:
    assert server.dispatcher.tracing is None and HOOK
    with Client(*server.address) as client:
        assert client.request("echo", 1) == [1, {}]
    async def main():
        async with AsyncClient(*server.address) as client:
            return await client.request("echo", 2)
    assert asyncio.run(main()) == [2, {}]
loaded = [m for m in sys.modules if m.startswith("opentelemetry")]
assert not loaded, loaded
""".replace("HOOK", hook)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
