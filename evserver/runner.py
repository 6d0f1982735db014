"""Running a server process: monkey-patch, import the app, bind, serve, drain, exit.

The order matters: eventlet must green the standard library *before* the user's app (and
anything it imports) creates locks or sockets.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .contract import EXIT_APP_LOAD_ERROR, EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("evserver")


def run_single(
    app_spec: str,
    cfg: Any,
    *,
    on_ready: Callable[[Server], None] | None = None,
    on_error: Callable[[int, str], None] | None = None,
    serve_admin: bool = True,
    **server_overrides: Any,
) -> int:
    """Serve ``app_spec`` in this process until a stop signal; return the exit code.

    A worker process passes ``on_ready`` (called once listening, with signals installed) and
    ``on_error`` (called with the exit code and message of a startup failure) to report to
    its supervisor; everything else is the same code path as single-process mode. Workers
    pass ``serve_admin=False``: their master serves the admin listener for all of them.
    """
    from ._eventlet import monkey_patch, use_precise_hub

    use_precise_hub()  # first: monkey patching starts the hub
    if cfg.server.monkey_patch:
        monkey_patch()
    from .admin import admin_unavailable
    from .errors import ClusterError
    from .loader import AppLoadError, load_app
    from .server import Server

    def fail(code: int, message: str, details: str = "") -> int:
        log.error("%s", f"{message}\n{details}" if details else message)
        if on_error is not None:
            on_error(code, message)
        return code

    try:
        app = load_app(app_spec)
    except AppLoadError as exc:
        return fail(EXIT_APP_LOAD_ERROR, str(exc), exc.details)
    server = Server.from_config(app, cfg, **server_overrides)
    admin = None
    if serve_admin and cfg.admin.enabled:  # first: a busy admin port refuses the start
        try:
            admin = start_admin(server, cfg)
        except OSError as exc:
            return fail(EXIT_FAILURE, admin_unavailable(cfg, exc))
    try:
        server.start()
    except (OSError, ClusterError) as exc:
        if admin is not None:
            admin.kill()
        if isinstance(exc, ClusterError):  # Redis unreachable, or another partition count
            return fail(EXIT_FAILURE, str(exc))
        return fail(EXIT_FAILURE, f"cannot listen on {cfg.server.host}:{cfg.server.port}: "
                                  f"{exc.strerror or exc}")
    server.install_signals()
    tune_gc(cfg.server.gc_threshold)
    log.info("evserver ready: serving %s on %s:%d", app_spec, *server.address)
    if on_ready is not None:
        on_ready(server)
    else:  # a service of its own, not a master's worker
        _serve_as_service()
    server.serve_forever()
    if admin is not None:
        admin.kill()
    return EXIT_OK


def _serve_as_service() -> None:
    """A single process does for its service manager what a master does: systemd's
    ``READY=1`` (``Type=notify`` units), and HUP, the reload signal, answered with a warning:
    it has no workers to replace, and the signal's default action (exit) would turn
    ``systemctl reload`` into an outage. The handler only schedules the log line."""
    import signal

    from ._eventlet import eventlet
    from .service import sd_notify

    def reload(signum: int, frame: Any) -> None:
        eventlet.spawn_n(log.warning, "HUP ignored: a single process has no workers to reload "
                                      "(serve with --workers 2 or more to reload on HUP)")

    signal.signal(signal.SIGHUP, reload)
    sd_notify("READY=1")


def tune_gc(threshold: int) -> None:
    """Collect young garbage every ``threshold`` allocations, and exempt startup objects.

    Decoded events stay alive until their job has run, which under load means waiting in
    the queue. At Python's threshold of 700 allocations collections keep finding them alive
    and promote them, so the older generations fill with soon-dead objects and are rescanned:
    with 8 connections sending acked batches that cost a third of the per-event time and
    raised p99 eightfold (docs/performance.md). Freezing moves the modules, the app and the
    server out of every later collection.
    """
    if threshold:
        gc.freeze()
        gc.set_threshold(threshold, *gc.get_threshold()[1:])


def start_admin(server: Server, cfg: Any) -> Any:
    """The admin listener on the server's hub (its green thread); OSError if it cannot bind."""
    from .admin import AdminApp
    from .config import handler_defaults
    from .local_admin import LocalBackend, serve_green

    app = AdminApp(LocalBackend(server, handler_defaults(cfg)), token=cfg.admin.token)
    gt, address = serve_green(app, cfg.admin.host, cfg.admin.port, server.ssl_context)
    log.info("admin listening on %s://%s:%d", "https" if server.ssl_context else "http",
             *address)
    return gt
