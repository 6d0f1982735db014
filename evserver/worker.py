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

from .admin import TAIL_FLUSH, Tap, Taps, describe_handlers
from .channel import Channel
from .config import SETTINGS, Config, handler_defaults
from .contract import CONFIG_ENV, CONFIG_FROM_ENV, EXIT_FAILURE
from .errors import RegistrationError
from .logs import configure_logging
from .metrics import snapshot
from .runner import run_single

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("evserver.worker")

_PR_SET_PDEATHSIG = 1


def worker_stats(server: Server) -> dict[str, Any]:
    """What the master gathers per worker (for the admin views): plain msgpack-able data."""
    return snapshot(server)


class MasterLink:
    """The worker's end of the control channel."""

    def __init__(self, sock: socket.socket, heartbeat_interval: float, cfg: Config) -> None:
        self.channel = Channel(sock)  # blocking until the hub exists (see ``ready``)
        self.interval = heartbeat_interval
        self.cfg = cfg
        self.server: Server | None = None
        self.taps: Taps | None = None
        self._tail_leases: dict[int, float] = {}  # tail id -> when it ends unless renewed
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
        self.taps = Taps(server.dispatcher)
        self.channel.sock = eventlet.greenio.GreenSocket(self.channel.sock)
        self._send_lock = eventlet.semaphore.Semaphore()  # one writer per socket (eventlet)
        self._send("ready", pid=os.getpid(), address=list(server.address),
                   handlers=describe_handlers(server.app, handler_defaults(self.cfg)))
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
                elif msg["t"] == "tail":
                    self._tail(msg)
                elif msg["t"] == "untail":
                    self._tail_leases[int(msg["id"])] = 0.0
        self._master_gone()

    def goodbye(self) -> None:
        """After draining: the final counters, so the master's totals include them."""
        if self.server is not None:
            self._send("stats", id=0, stats=worker_stats(self.server))

    def _tail(self, msg: dict[str, Any]) -> None:
        """Start (or renew the lease of) a tail; it stops when the lease runs out."""
        from ._eventlet import eventlet

        tid = int(msg["id"])
        fresh = tid not in self._tail_leases
        self._tail_leases[tid] = time.monotonic() + float(msg.get("lease") or 5.0)
        if fresh and self.taps is not None:
            try:
                tap = self.taps.open(tid, str(msg.get("pattern")), int(msg.get("rate") or 1))
            except (RegistrationError, ValueError) as exc:
                log.warning("tail %s refused: %s", tid, exc)
                del self._tail_leases[tid]
                return
            eventlet.spawn_n(self._pump, tid, tap)

    def _pump(self, tid: int, tap: Tap) -> None:
        """Send a tail's samples to the master in batches until its lease ends."""
        from ._eventlet import eventlet

        assert self.taps is not None
        try:
            while time.monotonic() < self._tail_leases.get(tid, 0.0):
                eventlet.sleep(TAIL_FLUSH)
                events = tap.drain()
                if events and not self._send("tailed", id=tid, events=events):
                    break
        finally:
            self.taps.close(tid)
            self._tail_leases.pop(tid, None)

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
    text = args.config_json
    if text == CONFIG_FROM_ENV:
        text = os.environ.pop(CONFIG_ENV, "")
    cfg = config_from_json(text)
    configure_logging(cfg.server.log_level, cfg.server.log_format)
    _install_worker_signals()
    link = MasterLink(sock, cfg.server.worker_timeout / 4, cfg)
    code = run_single(args.app_spec, cfg, on_ready=link.ready, on_error=link.failed,
                      serve_admin=False, reuse_port=True)
    link.goodbye()
    return code


if __name__ == "__main__":
    sys.exit(main())
