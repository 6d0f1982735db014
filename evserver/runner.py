"""Running a server process: monkey-patch, import the app, bind, serve, drain, exit.

The order matters: eventlet must green the standard library *before* the user's app (and
anything it imports) creates locks or sockets.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("evserver")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_APP_LOAD_ERROR = 4  # the supervisor stops the fleet instead of respawning on this


def run_single(app_spec: str, cfg: Any, **server_overrides: Any) -> int:
    """Serve ``app_spec`` in this process until a stop signal; return the exit code."""
    from ._eventlet import monkey_patch

    if cfg.server.monkey_patch:
        monkey_patch()
    from .loader import AppLoadError, load_app
    from .server import Server

    try:
        app = load_app(app_spec)
    except AppLoadError as exc:
        log.error("%s", exc)
        return EXIT_APP_LOAD_ERROR
    server = Server.from_config(app, cfg, **server_overrides)
    try:
        server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", cfg.server.host, cfg.server.port, exc.strerror
                  or exc)
        return EXIT_FAILURE
    server.install_signals()
    log.info("evserver ready: serving %s on %s:%d", app_spec, *server.address)
    server.serve_forever()
    return EXIT_OK
