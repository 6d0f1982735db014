"""The HTTP admin listener: health, stats, metrics, handlers, tail and control.

One WSGI app (``AdminApp``) over a ``Backend`` serves both process models:

* single process: ``local_admin.LocalBackend`` reads the ``Server`` directly and the app
  runs on the server's own hub (``local_admin.serve_green``);
* ``--workers N``: the master has no hub, so ``ThreadedAdmin`` runs the same app with the
  stdlib's WSGI server in threads, over ``master_admin.MasterAdmin``, which hands every
  action to the master's main loop instead of touching workers itself.

This module imports no eventlet (a test holds it to that): the master imports it.

The admin port is bound without SO_REUSEPORT, so it always reaches this one process.
Reading endpoints are open; the ones that act or expose event payloads (POST /reload,
/stop, /workers and GET /tail) need ``Authorization: Bearer <[admin] token>`` when a token
is configured, and come from a loopback peer when none is (``check_access``).

Tail sampling (``Tap``) lives here too, because the single process and each worker run it
the same way: a callable the dispatcher offers every submitted job while a tail is open,
that keeps at most ``rate`` matching events a second in a bounded ring. Nothing is sampled
once the last tail closes; a tail whose HTTP client went away is closed by the failed write
of the next keep-alive line (one a second).
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

from .app import _matches, compile_pattern
from .errors import AdminError, RegistrationError
from .metrics import PROMETHEUS_CONTENT_TYPE, render_prometheus
from .security import is_loopback

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("evserver.admin")

PRIVILEGED = frozenset({("POST", "/reload"), ("POST", "/stop"), ("POST", "/workers"),
                        ("GET", "/tail")})
TAIL_RATE = 100  # events a second a tail may show by default
TAIL_RATE_MAX = 1000
TAIL_RING = 1000  # sampled events kept per tail until its reader takes them
TAIL_FLUSH = 0.25  # seconds between a tail's batches
KEEPALIVE = 1.0  # seconds of silence before a tail writes a blank line (detects a gone reader)


# --------------------------------------------------------------------------- access


def check_access(peer: str, token: str | None, authorization: str | None) -> AdminError | None:
    """Why a privileged request must be refused, or None to allow it.

    With a token, only the token counts (401 otherwise), wherever the peer is; without
    one, only loopback peers may act (403), since anyone who can reach the port could.
    """
    if token:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            return AdminError(401, "invalid or missing admin token")
        return None
    if not is_loopback(peer):
        return AdminError(403, f"admin actions are allowed from loopback only (peer {peer}); "
                               "set [admin] token to allow remote ones")
    return None


# --------------------------------------------------------------------------- tail sampling


def event_dict(event: Any) -> dict[str, Any]:
    """An event as plain data for tail output (msgpack- and, mostly, JSON-able)."""
    return {"type": event.type, "id": event.id, "time": event.time, "data": event.data,
            "meta": event.meta}


class Tap:
    """Sample events matching ``pattern`` into a bounded ring, at most ``rate`` a second.

    Called with each submitted job's events; the cost is a clock read per job, plus a
    cached type match per event only while this second's budget lasts.
    """

    def __init__(self, pattern: str, rate: int = TAIL_RATE, capacity: int = TAIL_RING) -> None:
        self.segments = compile_pattern(pattern)
        self.rate = rate
        self.ring: collections.deque[Any] = collections.deque(maxlen=capacity)
        self._match: dict[str, bool] = {}
        self._window_end = 0.0
        self._left = 0

    def __call__(self, events: list[Any]) -> None:
        now = time.monotonic()
        if now >= self._window_end:
            self._window_end = now + 1.0
            self._left = self.rate
        if self._left <= 0:
            return
        match = self._match
        for event in events:
            hit = match.get(event.type)
            if hit is None:
                if len(match) > 4096:
                    match.clear()
                hit = match[event.type] = _matches(self.segments, event.type.split("."))
            if hit:
                self.ring.append(event)
                self._left -= 1
                if self._left <= 0:
                    return

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while self.ring:
            out.append(event_dict(self.ring.popleft()))
        return out


class Taps:
    """The taps open on one dispatcher; sets ``dispatcher.tap`` only while there are some."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher
        self.taps: dict[Any, Tap] = {}

    def open(self, key: Any, pattern: str, rate: int) -> Tap:
        tap = self.taps[key] = Tap(pattern, rate)
        self._install()
        return tap

    def close(self, key: Any) -> None:
        self.taps.pop(key, None)
        self._install()

    def _install(self) -> None:
        taps = list(self.taps.values())
        if not taps:
            self.dispatcher.tap = None
        elif len(taps) == 1:
            self.dispatcher.tap = taps[0]
        else:
            def fan_out(events: list[Any]) -> None:
                for tap in taps:
                    tap(events)

            self.dispatcher.tap = fan_out


def tail_params(query: dict[str, list[str]]) -> tuple[str, int, int | None]:
    """(pattern, rate, limit) from a /tail query string; AdminError 400 when invalid."""
    pattern = (query.get("pattern") or ["**"])[0] or "**"
    try:
        compile_pattern(pattern)
    except RegistrationError as exc:
        raise AdminError(400, f"bad pattern: {exc}") from None
    rate = _int_param(query, "rate", TAIL_RATE, 1)
    limit = _int_param(query, "limit", 0, 0) or None
    return pattern, min(rate, TAIL_RATE_MAX), limit


def _int_param(query: dict[str, list[str]], name: str, default: int, low: int) -> int:
    raw = (query.get(name) or [""])[0]
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise AdminError(400, f"{name} must be an integer, got {raw!r}") from None
    if value < low:
        raise AdminError(400, f"{name} must be >= {low}, got {value}")
    return value


# --------------------------------------------------------------------------- backends


class TailStream(Protocol):
    def next_batch(self) -> list[dict[str, Any]]:
        """Wait up to about TAIL_FLUSH seconds; return the events sampled meanwhile."""

    def close(self) -> None:
        """Stop sampling (idempotent)."""


class Backend(Protocol):
    """What the admin app needs from the process it runs in."""

    mode: str

    def stats(self) -> dict[str, Any]: ...
    def ready(self) -> tuple[bool, str]: ...
    def handlers(self) -> list[dict[str, Any]]: ...
    def reload(self) -> dict[str, Any]: ...
    def stop(self, now: bool) -> dict[str, Any]: ...
    def scale(self, n: int) -> dict[str, Any]: ...
    def tail(self, pattern: str, rate: int) -> TailStream: ...


def describe_handlers(app: App, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Registered processors and listeners with their options, resolved against defaults."""
    out = []
    for h in app.handlers:
        opts = {k: v for k, v in h.options.items() if v is not None}
        ordered = opts.pop("ordered_by", None)
        effective = {**defaults, **opts}
        if h.kind == "processor":  # always shown: "not ordered" is worth seeing too
            effective["ordered_by"] = ordered if ordered is None or isinstance(ordered, str) \
                else getattr(ordered, "__qualname__", repr(ordered))
        out.append({"kind": h.kind, "pattern": h.pattern, "name": h.name,
                    "options": effective})
    return out


# --------------------------------------------------------------------------- the WSGI app

_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}
_ROUTES = {"/healthz": "GET", "/readyz": "GET", "/stats": "GET", "/metrics": "GET",
           "/handlers": "GET", "/tail": "GET", "/reload": "POST", "/stop": "POST",
           "/workers": "POST"}


def json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


class AdminApp:
    """The admin endpoints as a WSGI app over a ``Backend``."""

    def __init__(self, backend: Backend, token: str | None = None) -> None:
        self.backend = backend
        self.token = token

    def peer(self, environ: dict[str, Any]) -> str:
        """The client's address; a seam tests override to pretend to be a remote peer."""
        return str(environ.get("REMOTE_ADDR", ""))

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
        query = parse_qs(environ.get("QUERY_STRING", ""))
        try:
            allowed = _ROUTES.get(path)
            if allowed is None:
                raise AdminError(404, f"no such endpoint: {path}")
            if method != allowed:
                raise AdminError(405, f"{path} takes {allowed}")
            if (method, path) in PRIVILEGED:
                refused = check_access(self.peer(environ), self.token,
                                       environ.get("HTTP_AUTHORIZATION"))
                if refused is not None:
                    raise refused
            if path == "/tail":
                return self._tail(query, start_response)
            status, body, ctype = self._handle(path, query)
        except AdminError as exc:
            status, body, ctype = exc.status, _json({"error": str(exc)}), "application/json"
        except TimeoutError as exc:
            status, body, ctype = 504, _json({"error": str(exc) or "timed out"}), \
                "application/json"
        except Exception as exc:
            log.exception("admin: %s %s failed", method, path)
            status, body, ctype = 500, _json({"error": f"{type(exc).__name__}: {exc}"}), \
                "application/json"
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        if status == 401:
            headers.append(("WWW-Authenticate", "Bearer"))
        start_response(f"{status} {_REASONS.get(status, '')}", headers)
        return [body]

    def _handle(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        b = self.backend
        if path == "/healthz":
            return 200, _json({"status": "ok", "pid": os.getpid(), "mode": b.mode}), \
                "application/json"
        if path == "/readyz":
            ok, why = b.ready()
            return (200 if ok else 503), _json({"ready": ok, "detail": why}), "application/json"
        if path == "/stats":
            return 200, _json(b.stats()), "application/json"
        if path == "/metrics":
            return 200, render_prometheus(b.stats()), PROMETHEUS_CONTENT_TYPE
        if path == "/handlers":
            return 200, _json({"handlers": b.handlers()}), "application/json"
        if path == "/reload":
            return 202, _json(b.reload()), "application/json"
        if path == "/stop":
            now = (query.get("now") or ["0"])[0].lower() in ("1", "true", "yes")
            return 202, _json(b.stop(now)), "application/json"
        n = _int_param(query, "n", 0, 1)
        if "n" not in query:
            raise AdminError(400, "POST /workers needs ?n=K (K >= 1)")
        return 202, _json(b.scale(n)), "application/json"

    def _tail(self, query: dict[str, list[str]],
              start_response: Callable[..., Any]) -> Iterable[bytes]:
        pattern, rate, limit = tail_params(query)
        stream = self.backend.tail(pattern, rate)
        log.info("admin: tail %r opened (rate %d/s)", pattern, rate)
        start_response("200 OK", [("Content-Type", "application/x-ndjson"),
                                  ("Cache-Control", "no-cache")])
        return _tail_lines(stream, pattern, rate, limit)


def _tail_lines(stream: TailStream, pattern: str, rate: int,
                limit: int | None) -> Iterator[bytes]:
    """The /tail body: JSON lines, a blank line after a quiet second; closing stops sampling."""
    sent = 0
    quiet_since = time.monotonic()
    budget_end, budget = 0.0, rate
    try:
        yield b"\n"  # headers and a first write now: the client knows it is connected
        while limit is None or sent < limit:
            batch = stream.next_batch()
            now = time.monotonic()
            if now >= budget_end:  # the workers each keep ``rate``: cap their sum too
                budget_end, budget = now + 1.0, rate
            batch = batch[:budget]
            if limit is not None:
                batch = batch[:limit - sent]
            if batch:
                budget -= len(batch)
                sent += len(batch)
                quiet_since = now
                yield b"".join(json.dumps(e, default=json_default).encode() + b"\n"
                               for e in batch)
            elif now - quiet_since >= KEEPALIVE:
                quiet_since = now
                yield b"\n"
    finally:
        stream.close()
        log.info("admin: tail %r closed after %d event(s)", pattern, sent)


def _json(doc: Any) -> bytes:
    return json.dumps(doc, default=json_default).encode() + b"\n"


def admin_unavailable(cfg: Any, exc: OSError) -> str:
    """Why the server refuses to start without its admin listener.

    Serving events without it would look fine until someone runs ``evserver stop`` or
    ``stats`` for this server and reaches whichever process holds the port instead.
    """
    return (f"refusing to start: cannot listen for admin on {cfg.admin.host}:"
            f"{cfg.admin.port}: {exc.strerror or exc} (another evserver? its admin commands "
            f"would reach that one); choose another [admin] port (--admin-port) or turn the "
            f"listener off ([admin] enabled = false, --no-admin-enabled)")


# --------------------------------------------------------------------------- servers


class ThreadedAdmin:
    """The stdlib WSGI server in daemon threads, for the master (which has no hub)."""

    def __init__(self, app: AdminApp, host: str, port: int, ssl_context: Any = None) -> None:
        import socket
        import socketserver
        import threading
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

        class Handler(WSGIRequestHandler):
            timeout = 5  # seconds to read a request or write a chunk

            def log_message(self, format: str, *args: Any) -> None:  # one line per request: no
                pass

        class Server(socketserver.ThreadingMixIn, WSGIServer):
            daemon_threads = True
            block_on_close = False
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.httpd = Server((host, port), Handler)
        if ssl_context is not None:
            # The handshake happens on the first read, in the request's thread (bounded by
            # Handler.timeout), so a slow TLS client cannot stall the accept loop.
            self.httpd.socket = ssl_context.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.httpd.set_app(app)
        self.address: tuple[str, int] = self.httpd.server_address[:2]  # type: ignore[assignment]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.5,),
                                       name="evserver-admin", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
