"""OpenTelemetry tracing, optional (``pip install evserver[otel]``): the W3C trace context of
a sender's span carried through every handler that runs its event.

- **Clients**: while a span is active, ``Client`` and ``AsyncClient`` put ``traceparent`` (and
  ``tracestate``) into the event's meta (``client_meta_hook``); a ``traceparent`` the caller
  put there already is left alone.
- **Server**: every processor and listener run gets a CONSUMER span named after the event
  type, child of the context in the event's meta (for Fluentd Forward events, of a
  ``traceparent`` in the record when the metadata has none). The span is current while the
  handler runs, so the handler's own spans nest under it. It lives across retries: each
  failed attempt is recorded on it as an exception event; the final failure sets status
  ERROR, ``evserver.attempts`` and ``evserver.dead_lettered``.

Cost. Without the package nothing is imported: ``available()`` asks importlib where the
package would be, which does not import it, and ``meta_hook``/``Dispatcher.tracing`` stay
None (one ``is None`` check per sent event; none per handled event). With the package,
evserver still imports nothing of it until the application has (no span can be active and
no provider configured before that), and the server traces only once a tracer provider is
configured (by the app module, or by ``opentelemetry-instrument``); until then no handler
is wrapped, so the dispatch path is the untraced one. ``OTEL_SDK_DISABLED=true`` turns both
sides off.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from .event import Event
from .plan import Plan

__all__ = ["DispatchTracing", "available", "client_meta_hook", "dispatch_tracing"]

MetaHook = Callable[[dict[str, Any] | None], dict[str, Any] | None]
TRACEPARENT = "traceparent"
_MAX_OPEN = 100_000  # spans kept open for a retry; a bound, in case a retry never comes


def available() -> bool:
    """True when OpenTelemetry's API is installed and not disabled by ``OTEL_SDK_DISABLED``."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    try:  # the top-level name only: finding a submodule would import its parent package
        return importlib.util.find_spec("opentelemetry") is not None
    except (ImportError, ValueError):  # a finder that refuses it, a half-imported module
        return False


def _loaded_trace_api() -> Any:
    """``opentelemetry.trace`` if this process uses OpenTelemetry already, else None.

    A span can only be active, and a provider only configured, once the application has
    imported the API; until then evserver does not import it either (it costs ~0.15 s of a
    worker's start)."""
    return sys.modules.get("opentelemetry.trace")


def client_meta_hook() -> MetaHook | None:
    """The clients' meta hook: adds the active span's context; None without OpenTelemetry."""
    if not available():
        return None
    calls: list[Any] = []  # (get_current_span, inject) once the application loaded the API

    def add_context(meta: dict[str, Any] | None) -> dict[str, Any] | None:
        if not calls:
            trace = _loaded_trace_api()
            if trace is None:
                return meta  # no OpenTelemetry in use: no span can be active
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            calls[:] = (trace.get_current_span, TraceContextTextMapPropagator().inject)
        get_current_span, inject = calls
        if not get_current_span().get_span_context().is_valid:
            return meta
        carrier = {} if meta is None else meta  # the client's own copy of the caller's meta
        if TRACEPARENT not in carrier:
            inject(carrier)
        return carrier

    return add_context


def dispatch_tracing(cancelled: type[BaseException]) -> DispatchTracing | None:
    """The server's tracing, or None (no provider configured, or no OpenTelemetry).

    ``cancelled`` is what ends a handler from outside (the hub's ``GreenletExit`` at the
    drain timeout): no retry and no failure report follow it, so its span ends at once."""
    trace = _loaded_trace_api() if available() else None
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return DispatchTracing(provider, cancelled)


class DispatchTracing:
    """Wraps handler functions in spans (``wrap``) and ends the span of a failed run
    (``failed``); the dispatcher calls nothing else."""

    def __init__(self, provider: Any, cancelled: type[BaseException]) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from .forward import ForwardEvent

        self._tracer = provider.get_tracer("evserver")
        self._extract = TraceContextTextMapPropagator().extract
        self._context = context
        self._set_span = trace.set_span_in_context
        self._consumer = SpanKind.CONSUMER
        self._error = (Status, StatusCode.ERROR)
        self._forward_event = ForwardEvent
        self._cancelled = cancelled
        # Per plan (by id): the open span of each event (by id) whose run failed an attempt.
        self._open: dict[int, dict[int, Any]] = {}

    def wrap(self, plan: Plan) -> None:
        """Make ``plan.func`` run the handler inside its event's span."""
        func = plan.func
        handler = plan.handler
        open_spans: dict[int, Any] = self._open.setdefault(id(plan), {})
        attach, detach = self._context.attach, self._context.detach
        start_span, set_span = self._tracer.start_span, self._set_span
        parent_of, kind = self._parent, self._consumer
        cancelled = self._cancelled
        static = {"messaging.system": "evserver", "messaging.operation.type": "process",
                  "evserver.handler": handler.name, "evserver.handler.kind": handler.kind}

        def traced(event: Event) -> Any:
            span = open_spans.pop(id(event), None)  # this run's, if an attempt failed
            if span is None:
                span = start_span(event.type, context=parent_of(event), kind=kind,
                                  attributes={**static, "messaging.destination.name": event.type,
                                              "messaging.message.id": event.id})
            token = attach(set_span(span))
            try:
                result = func(event)
            except BaseException as exc:
                span.record_exception(exc)
                if isinstance(exc, cancelled) or len(open_spans) >= _MAX_OPEN:
                    span.end()  # ended by a drain timeout: no retry and no failure follows
                else:
                    open_spans[id(event)] = span  # for the retry, or ``failed``
                raise
            else:
                span.end()
                return result
            finally:
                detach(token)

        traced.__wrapped__ = func  # type: ignore[attr-defined]
        plan.func = traced

    def failed(self, plan: Plan, event: Event, attempts: int, dead_lettered: bool) -> None:
        """The run of ``plan`` on ``event`` failed for good: end its span as an error."""
        span = self._open.get(id(plan), {}).pop(id(event), None)
        if span is None:
            return
        status, error = self._error
        span.set_attribute("evserver.attempts", attempts)
        span.set_attribute("evserver.dead_lettered", dead_lettered)
        if dead_lettered:
            span.add_event("dead_lettered", {"evserver.attempts": attempts})
        span.set_status(status(error, f"failed after {attempts} attempt(s)"))
        span.end()

    def _parent(self, event: Event) -> Any:
        """The sender's context: the event's meta, else a Forward record's ``traceparent``."""
        carrier = event._meta  # the raw field: reading ``meta`` would create an empty dict
        if (not carrier or TRACEPARENT not in carrier) and type(event) is self._forward_event:
            carrier = event.data if type(event.data) is dict else None
        if not carrier or type(carrier.get(TRACEPARENT)) is not str:
            return self._extract({})  # a new trace, never the worker's ambient context
        return self._extract(carrier)
