"""Helpers for testing apps against a real evserver without a subprocess.

``serve_in_thread`` runs a ``Server`` on its own hub in a native thread (eventlet hubs are
per thread), so a test can talk to it over real loopback sockets with the blocking
``Client`` or plain sockets, no monkey patching needed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from .app import App


class ThreadedServer:
    """A ``Server`` running in another thread: its attributes, plus a thread-safe ``stop``."""

    def __init__(self, server: Any, thread: threading.Thread, stop_w: socket.socket) -> None:
        self.server = server
        self._thread = thread
        self._stop_w = stop_w

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully, as SIGTERM would, and wait for the server thread to end."""
        with contextlib.suppress(OSError):
            self._stop_w.close()
        self._thread.join(timeout if timeout is not None else self.server.drain_timeout + 10)
        if self._thread.is_alive():
            raise TimeoutError("server did not stop")


@contextlib.contextmanager
def serve_in_thread(
    app: App, *, timeout: float = 10.0, settings: Mapping[str, Any] | None = None,
    dead_letters: Any = None, **server_settings: Any,
) -> Iterator[ThreadedServer]:
    """Start a server for ``app`` on 127.0.0.1 (ephemeral port unless given); yield it.

    Keyword arguments are ``[server]`` settings (``port=0``, ``idle_timeout=0.3``);
    ``settings`` takes any other by its full name (``{"security.shared_key": ...}``). Every
    value is checked as a config file's would be. On exit the server is stopped gracefully
    (``Server.stop``), exactly as SIGTERM would.
    """
    from ._eventlet import eventlet
    from .config import default_config
    from .server import Server

    overrides = {"server.host": "127.0.0.1", "server.port": 0,
                 **{f"server.{key}": value for key, value in server_settings.items()},
                 **(settings or {})}
    server = Server(app, default_config().replace(**overrides), dead_letters=dead_letters)
    ready = threading.Event()
    failure: list[BaseException] = []
    stop_r, stop_w = socket.socketpair()

    def run() -> None:
        try:
            server.start()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        green_r = eventlet.green.socket.socket(fileno=stop_r.detach())

        def wait_for_stop() -> None:
            green_r.recv(1)  # the test thread writes a byte (or closes) to stop us
            server.stop()

        eventlet.spawn_n(wait_for_stop)
        ready.set()
        server.serve_forever()
        green_r.close()

    thread = threading.Thread(target=run, name="evserver-test-server", daemon=True)
    thread.start()
    if not ready.wait(timeout):
        raise TimeoutError("server did not start")
    if failure:
        raise failure[0]
    running = ThreadedServer(server, thread, stop_w)
    try:
        yield running
    finally:
        running.stop()
