"""A worker process: the single-process server on its own SO_REUSEPORT socket, supervised.

Started by ``evserver.supervisor`` as ``python -m evserver.worker --fd N APP CONFIG_JSON`` in
a fresh interpreter (never a fork of a process with a hub: the epoll hub does not survive
fork). Everything about serving is ``runner.run_single``; this module only adds the link to
the master:

* ``ready`` once listening, ``error`` (then exit) when startup fails;
* a heartbeat from a green thread, so a hub blocked by a handler falls silent and the
  master replaces the worker;
* answers to ``stats`` requests;
* dying with the master: ``PR_SET_PDEATHSIG`` (Linux) and EOF on the channel both stop the
  server gracefully, so a SIGKILLed master leaves no orphans.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from .channel import Channel
from .config import SETTINGS, Config
from .logs import configure_logging
from .runner import EXIT_FAILURE, run_single

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("evserver.worker")

_PR_SET_PDEATHSIG = 1


def worker_stats(server: Server) -> dict[str, Any]:
    """What the master gathers per worker (for the admin views): plain msgpack-able data."""
    d = server.dispatcher
    s = d.stats
    return {
        "pid": os.getpid(),
        "uptime": time.time() - server.started_at,
        "connections": len(server.connections),
        "counters": dict(server.counters),
        "dispatcher": {
            "events_in": s.events_in, "events_processed": s.events_processed,
            "handler_errors": s.handler_errors, "unrouted": s.unrouted,
            "by_type": dict(s.by_type), "busy": d.busy, "queued": d.queue.qsize(),
        },
    }


class MasterLink:
    """The worker's end of the control channel."""

    def __init__(self, sock: socket.socket, heartbeat_interval: float) -> None:
        self.channel = Channel(sock)  # blocking until the hub exists (see ``ready``)
        self.interval = heartbeat_interval
        self.server: Server | None = None
        self._send_lock: Any = None

    def failed(self, code: int, message: str) -> None:
        """Startup failed: tell the master why, so it can report it and not respawn blindly."""
        try:
            self.channel.send("error", code=code, message=message)
        except OSError:
            pass

    def ready(self, server: Server) -> None:
        """Called by ``run_single`` once listening: go green, say ready, start the link threads."""
        from ._eventlet import eventlet

        self.server = server
        self.channel.sock = eventlet.greenio.GreenSocket(self.channel.sock)
        self._send_lock = eventlet.semaphore.Semaphore()  # one writer per socket (eventlet)
        self._send("ready", pid=os.getpid(), address=list(server.address))
        eventlet.spawn_n(self._heartbeat)
        eventlet.spawn_n(self._listen)

    def _send(self, t: str, **fields: Any) -> bool:
        with self._send_lock:
            try:
                self.channel.send(t, **fields)
                return True
            except OSError:
                return False

    def _heartbeat(self) -> None:
        from ._eventlet import eventlet

        while self._send("hb"):
            eventlet.sleep(self.interval)
        self._master_gone()

    def _listen(self) -> None:
        assert self.server is not None
        while (messages := self.channel.receive()) is not None:
            for msg in messages:
                if msg["t"] == "stats":
                    self._send("stats", id=msg.get("id"), stats=worker_stats(self.server))
        self._master_gone()

    def _master_gone(self) -> None:
        from ._eventlet import eventlet

        if self.server is not None and not self.server.stopping:
            log.warning("master went away (control channel closed); stopping")
            eventlet.spawn_n(self.server.stop)


def _die_with_master(master_pid: int) -> None:
    """Ask Linux for SIGTERM when the master dies; exit now if it already has (the race)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the channel's EOF still stops us
    if os.getppid() != master_pid:
        sys.exit(EXIT_FAILURE)


def _install_worker_signals() -> None:
    """Signals meant for the master (HUP, TTIN, TTOU) must not stop a worker that shares
    its terminal's process group; QUIT is the immediate stop; USR1 dumps every stack
    (the master sends it before killing a worker whose hub is blocked)."""
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, lambda signum, frame: os._exit(0))
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def config_from_json(text: str) -> Config:
    """Rebuild the master's resolved Config; workers never re-read files or the environment."""
    tables = json.loads(text)
    values = {s.name: tables[s.table][s.key] for s in SETTINGS}
    return Config(values, dict.fromkeys(values, "master"), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evserver.worker")
    parser.add_argument("--fd", type=int, required=True, help="control channel file descriptor")
    parser.add_argument("--master", type=int, required=True, help="the master's pid")
    parser.add_argument("app_spec")
    parser.add_argument("config_json")
    args = parser.parse_args(argv)
    _die_with_master(args.master)
    sock = socket.socket(fileno=args.fd)  # a real socket: created before monkey-patching
    cfg = config_from_json(args.config_json)
    configure_logging(cfg.server.log_level, cfg.server.log_format)
    _install_worker_signals()
    link = MasterLink(sock, cfg.server.worker_timeout / 4)
    return run_single(args.app_spec, cfg, on_ready=link.ready, on_error=link.failed,
                      reuse_port=True)


if __name__ == "__main__":
    sys.exit(main())
