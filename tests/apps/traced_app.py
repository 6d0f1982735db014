"""A test app traced with the OpenTelemetry SDK's in-memory exporter.

Configuring a tracer provider at import, as a real app (or ``opentelemetry-instrument``)
would, is what turns the server's tracing on. The ``spans`` processor returns what was
exported so far, so a test in another process can read the server's spans over the wire.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from evserver import App, Event

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("traced_app")

app = App("traced")


@app.processor("order.*")
def order(event: Event) -> dict[str, Any]:
    with tracer.start_as_current_span("db.insert"):  # the handler's own span nests inside
        return {"ok": event.data}


@app.processor("flaky", retries=2, backoff=0.001)
def flaky(event: Event) -> None:
    raise ValueError("always")


@app.listener("order.**")
def audit(event: Event) -> None:
    pass


@app.processor("spans")
def spans(event: Event) -> list[dict[str, Any]]:
    return [{
        "name": s.name,
        "kind": s.kind.name,
        "trace_id": f"{s.context.trace_id:032x}",
        "span_id": f"{s.context.span_id:016x}",
        "parent_id": f"{s.parent.span_id:016x}" if s.parent else None,
        "status": s.status.status_code.name,
        "attributes": dict(s.attributes or {}),
        "events": [e.name for e in s.events],
    } for s in exporter.get_finished_spans() if s.name != "spans"]
