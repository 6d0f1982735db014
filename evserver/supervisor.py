"""The master process for ``evserver serve --workers N``: supervises, never serves.

gunicorn's arbiter model, with uvicorn's fresh interpreters: the master imports no eventlet,
runs no hub and binds no event socket. Each worker (``evserver.worker``) is a new
``python -m evserver.worker`` process that binds its own ``SO_REUSEPORT`` listener, so the
kernel spreads connections over the workers and a worker can be replaced while the others
keep serving. See docs/workers.md for the process model and the signals.

Signal handlers only enqueue; the loop (``_tick``) dispatches ``handle_<name>``, reads the
workers' control channels (``evserver.channel``), reaps, enforces heartbeats and keeps the
worker count, one bounded ``select`` at a time.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics
from .admin import AdminApp, ThreadedAdmin, admin_unavailable
from .channel import Channel
from .config import Config, load_config
from .contract import (
    CONFIG_ENV,
    CONFIG_FROM_ENV,
    EXIT_APP_LOAD_ERROR,
    EXIT_FAILURE,
    EXIT_OK,
    NOTIFY_SOCKET_ENV,
)
from .errors import AddressInUse, ConfigError
from .logs import plural
from .master_admin import AdminDesk, MasterAdmin
from .ports import Claims, PortClaim, release
from .service import remove_pid_file, sd_notify, write_pid_file

log = logging.getLogger("evserver.supervisor")

TICK = 0.25  # longest the loop sleeps without a signal or a message
QUIT_GRACE = 2.0  # seconds a worker gets after SIGQUIT before SIGKILL
STACK_DUMP_GRACE = 0.2  # between SIGUSR1 (dump stacks) and SIGKILL for a blocked worker
CRASH_WINDOW = 2.0  # a worker that dies this soon after becoming ready counts as a crash
BACKOFF_MAX = 30.0
SIGNALS = ("HUP", "INT", "QUIT", "TERM", "TTIN", "TTOU", "CHLD")
_PKG_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(eq=False)
class WorkerProcess:
    """The master's view of one worker: its process, channel and lifecycle deadlines."""

    proc: subprocess.Popen[bytes]
    channel: Channel
    generation: int
    started: float
    last_seen: float
    ready_at: float | None = None
    retire_deadline: float | None = None  # set once asked to stop
    kill_at: float | None = None  # set once asked to dump its stacks before SIGKILL
    killed: bool = False  # SIGKILL sent: it only remains to reap it (once, and quietly)
    error: str | None = None  # a startup failure the worker reported
    stats_replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_stats: dict[str, Any] | None = None  # becomes part of the totals' base at exit
    handlers: list[dict[str, Any]] | None = None  # as reported with ``ready``

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        self.killed = self.killed or sig == signal.SIGKILL
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def __str__(self) -> str:
        return f"worker {self.pid} (gen {self.generation})"


@dataclass
class Reload:
    """A HUP in progress: the new generation boots while the old one keeps serving."""

    generation: int
    cfg: Config
    claims: dict[str, PortClaim]  # new addresses' claims, if the reload moved a port
    deadline: float


class Supervisor:
    """Start, watch and replace worker processes; see the module docstring."""

    def __init__(self, app_spec: str, cfg: Config, *, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        self.app_spec = app_spec
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides or {}
        self.num_workers = cfg.server.workers
        self.generation = 1
        self.workers: dict[int, WorkerProcess] = {}
        self.claims = Claims()
        self.reload: Reload | None = None
        self.booted = False
        self.stopping: str | None = None  # "graceful" | "quick"
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.crashes = 0  # consecutive fast deaths; drives the backoff
        self.next_spawn_at = 0.0
        self._signals: collections.deque[int] = collections.deque()
        self._selector = selectors.DefaultSelector()
        self._wakeup: tuple[int, int] | None = None
        self._stats_id = 0
        self._stats_ids: set[int] = set()  # requests whose replies are still wanted
        self.started_at = time.time()
        self.retired = metrics.empty_base()  # exited workers' last counters
        self.admin: ThreadedAdmin | None = None
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = (
            collections.deque())
        self._wakeup_lock = threading.Lock()
        self.desk = AdminDesk(self)
        env = dict(os.environ)
        env.pop(NOTIFY_SOCKET_ENV, None)  # only the master talks to systemd
        # Workers must run this very evserver, even when it is not installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PKG_ROOT, env.get("PYTHONPATH")]))
        self._worker_env = env

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        """Claim the port, boot the workers and supervise until stopped; the exit code."""
        try:
            self.cfg, claimed = self.claims.claim(self.cfg)
        except AddressInUse as exc:
            log.error("evserver: refusing to start: %s", exc)
            return EXIT_FAILURE
        self.claims.adopt(claimed, self.cfg)
        pid_file = self.cfg.server.pid_file
        try:
            if pid_file:
                write_pid_file(pid_file)
            self._install_signals()
            log.info("master %d: starting %s for %s on %s:%d", os.getpid(),
                     plural(self.num_workers, "worker"), self.app_spec, *self.claims.address())
            if not self._start_admin():
                return EXIT_FAILURE
            while not (self.stopping and not self.workers):
                self._tick()
            log.info("master %d: exiting with code %d", os.getpid(), self.exit_code)
            return self.exit_code
        finally:
            if self.admin is not None:
                self.admin.close()
            for w in list(self.workers.values()):
                w.signal(signal.SIGKILL)
                self._reaped(w)
            self._restore_signals()
            if pid_file:
                remove_pid_file(pid_file)
            self.claims.release_all()

    def _tick(self) -> None:
        for key, _ in self._selector.select(self._sleep_time()):
            if key.data is None:
                _drain(key.fd)
            else:
                self._read(key.data)
        while self._signals:
            sig = self._signals.popleft()
            name = signal.Signals(sig).name[3:].lower()
            getattr(self, f"handle_{name}")()
        self._run_calls()
        self._reap()
        now = time.monotonic()
        self.desk.tick(now)
        if self.stopping:
            if now >= self.stop_deadline:
                self._kill_all("did not stop within the drain timeout")
            return
        self._enforce_deadlines(now)
        self._progress_reload(now)
        self._manage_workers(now)
        if not self.booted and self._all_ready():
            self.booted = True
            log.info("master ready: %s serving %s on %s:%d",
                     plural(len(self.workers), "worker"), self.app_spec, self.cfg.server.host,
                     self.cfg.server.port)
            sd_notify(f"READY=1\nMAINPID={os.getpid()}")

    def _sleep_time(self) -> float:
        if self.stopping or self.crashes == 0:
            return TICK
        return min(TICK, max(0.0, self.next_spawn_at - time.monotonic()))

    # ------------------------------------------------------------------ signals

    def _install_signals(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup = (r, w)
        self._selector.register(r, selectors.EVENT_READ, None)
        signal.set_wakeup_fd(w)
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._enqueue)

    def _enqueue(self, signum: int, frame: Any) -> None:
        """No logging, no work: the loop dispatches (gunicorn's rule for handlers)."""
        self._signals.append(signum)

    def _restore_signals(self) -> None:
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_DFL)
        with self._wakeup_lock:  # call_soon (another thread) writes to it
            if self._wakeup is not None:
                signal.set_wakeup_fd(-1)
                self._selector.unregister(self._wakeup[0])
                for fd in self._wakeup:
                    os.close(fd)
                self._wakeup = None

    def handle_chld(self) -> None:
        """Reaping happens every tick; the signal only wakes the loop early."""

    def handle_term(self) -> None:
        """Graceful: workers stop accepting, finish in-flight events, write replies, exit."""
        self.stop(graceful=True)

    handle_int = handle_term

    def handle_quit(self) -> None:
        self.stop(graceful=False)

    def handle_ttin(self) -> None:
        self.num_workers += 1
        log.info("TTIN: now %s", plural(self.num_workers, "worker"))

    def handle_ttou(self) -> None:
        if self.num_workers > 1:
            self.num_workers -= 1
        log.info("TTOU: now %s", plural(self.num_workers, "worker"))

    def handle_hup(self) -> str | None:
        """Zero-downtime reload: new config, new app import, new workers; then retire the old.

        Returns why it did not start (for the admin's POST /reload), None when it did.
        """
        if self.stopping or self.reload is not None:
            why = "stopping" if self.stopping else "already reloading"
            log.warning("HUP ignored: %s", why)
            return why
        try:
            cfg = load_config(self.config_path, overrides=self.overrides)
            from .security import exposure_problem

            if problem := exposure_problem(cfg):  # a reload must not expose what serve refused
                raise ConfigError(problem)
        except ConfigError as exc:
            log.error("HUP: reload aborted, keeping the current workers: %s", exc)
            return f"reload aborted: {exc}"
        try:
            cfg, claimed = self.claims.claim(cfg)  # a port of 0 keeps the current one
        except AddressInUse as exc:
            log.error("HUP: reload aborted, keeping the current workers: %s", exc)
            return f"reload aborted: {exc}"
        generation = self.generation + 1
        self.reload = Reload(generation, cfg, claimed,
                             time.monotonic() + cfg.server.worker_timeout)
        sd_notify("RELOADING=1")
        log.info("HUP: reloading; starting %s", plural(cfg.server.workers,
                                                      f"generation-{generation} worker"))
        for _ in range(cfg.server.workers):
            self.spawn(generation, cfg)
        return None

    # ------------------------------------------------------------------ workers

    def spawn(self, generation: int, cfg: Config) -> WorkerProcess:
        """Start one worker of ``generation`` serving with ``cfg``; it reports ``ready`` later."""
        parent, child = socket.socketpair()
        cmd = [sys.executable, "-m", "evserver.worker", "--fd", str(child.fileno()),
               "--master", str(os.getpid()), self.app_spec, CONFIG_FROM_ENV]
        # The config holds secrets (keys, admin token): the environment, unlike argv, is
        # readable by this user only.
        env = {**self._worker_env, CONFIG_ENV: json.dumps(cfg.as_dict())}
        try:
            proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), env=env,
                                    stdin=subprocess.DEVNULL)
        finally:
            child.close()
        parent.setblocking(False)
        now = time.monotonic()
        worker = WorkerProcess(proc, Channel(parent), generation, now, now)
        self.workers[worker.pid] = worker
        self._selector.register(parent, selectors.EVENT_READ, worker)
        log.info("spawned %s", worker)
        return worker

    def _read(self, worker: WorkerProcess) -> bool:
        """Handle what the worker sent; False once its channel is closed (EOF)."""
        messages = worker.channel.receive()
        if messages is None:
            self._selector.unregister(worker.channel.sock)
            worker.channel.close()
            return False  # exited (or closed its end): the reaper takes it from here
        worker.last_seen = time.monotonic()
        for msg in messages:
            t = msg["t"]
            if t == "ready":
                worker.ready_at = worker.last_seen
                worker.handlers = msg.get("handlers")
                log.info("%s ready on %s", worker, ":".join(map(str, msg.get("address", ()))))
                self.desk.worker_ready(worker)
            elif t == "error":
                worker.error = str(msg.get("message"))
            elif t == "stats" and isinstance(msg.get("id"), int):
                worker.last_stats = msg.get("stats") or {}
                if msg["id"] in self._stats_ids:
                    worker.stats_replies[msg["id"]] = worker.last_stats
            elif t == "tailed":
                self.desk.tailed(msg)
        return bool(messages)

    def read_channels(self, timeout: float) -> None:
        """Wait up to ``timeout`` for worker messages and record them; signals stay queued."""
        for key, _ in self._selector.select(timeout):
            if key.data is not None:
                self._read(key.data)

    def _reap(self) -> None:
        for worker in list(self.workers.values()):
            if worker.proc.poll() is not None:
                self._reaped(worker)
                self._exited(worker)

    def _reaped(self, worker: WorkerProcess) -> None:
        self.workers.pop(worker.pid, None)
        if worker.channel.sock.fileno() != -1:
            while self._read(worker):  # its goodbye (final stats) may still be unread
                pass
            if worker.channel.sock.fileno() != -1:
                self._selector.unregister(worker.channel.sock)
                worker.channel.close()
        if worker.last_stats:
            metrics.retire(self.retired, worker.last_stats)
            worker.last_stats = None
        if worker.proc.returncode is None:
            worker.proc.wait()

    def _exited(self, worker: WorkerProcess) -> None:
        """Log why a worker ended and decide: nothing, replace, abort a reload, or halt."""
        code = worker.proc.returncode
        how = (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}")
        if self.stopping or worker.retire_deadline is not None:
            log.info("%s exited (%s)", worker, how)
            return
        reason = f": {worker.error}" if worker.error else ""
        if self.reload is not None and worker.generation == self.reload.generation:
            log.error("HUP: reload aborted, keeping the current workers: new %s failed (%s)%s",
                      worker, how, reason)
            self._abort_reload()
            return
        if code == EXIT_APP_LOAD_ERROR or (not self.booted and worker.error):
            log.error("cannot start workers: %s failed (%s)%s; stopping", worker, how, reason)
            self.exit_code = EXIT_APP_LOAD_ERROR if code == EXIT_APP_LOAD_ERROR else EXIT_FAILURE
            self.stop(graceful=True)
            return
        now = time.monotonic()
        if worker.ready_at is None or now - worker.ready_at < CRASH_WINDOW:
            self.crashes += 1
        else:
            self.crashes = 0
        delay = 0.0 if self.crashes <= 1 else min(BACKOFF_MAX, 0.5 * 2 ** (self.crashes - 2))
        self.next_spawn_at = now + delay
        if delay:
            log.error("%s died (%s)%s; crash loop: %d fast deaths in a row, next start in "
                      "%.1fs", worker, how, reason, self.crashes, delay)
        else:
            log.warning("%s died (%s)%s; replacing it", worker, how, reason)

    def _all_ready(self) -> bool:
        current = [w for w in self.workers.values() if w.generation == self.generation]
        return len(current) >= self.num_workers and all(w.ready_at for w in current)

    def _manage_workers(self, now: float) -> None:
        """Keep ``num_workers`` of the current generation: spawn the missing, retire extras."""
        current = [w for w in self.workers.values()
                   if w.generation == self.generation and w.retire_deadline is None]
        missing = self.num_workers - len(current)
        if missing > 0 and now >= self.next_spawn_at:
            for _ in range(missing if self.crashes <= 1 else 1):  # in a crash loop, one at a time
                self.spawn(self.generation, self.cfg)
        for worker in sorted(current, key=lambda w: w.started)[:max(0, -missing)]:
            self._retire(worker)

    def _retire(self, worker: WorkerProcess) -> None:
        """SIGTERM: the worker closes its listener, drains its connections and exits."""
        worker.retire_deadline = time.monotonic() + self.cfg.server.drain_timeout + 1.0
        worker.signal(signal.SIGTERM)

    def _enforce_deadlines(self, now: float) -> None:
        timeout = self.cfg.server.worker_timeout
        for worker in list(self.workers.values()):
            if worker.killed:
                continue  # reaped on a later tick: no second SIGKILL, no second warning
            if worker.kill_at is not None:
                if now >= worker.kill_at:
                    worker.signal(signal.SIGKILL)
            elif worker.retire_deadline is not None:
                if now >= worker.retire_deadline:
                    log.warning("%s did not drain within the drain timeout; killing it", worker)
                    worker.signal(signal.SIGKILL)
            elif worker.ready_at is None and now - worker.started > timeout:
                log.error("%s not ready within worker_timeout=%gs; killing it", worker, timeout)
                worker.signal(signal.SIGKILL)
            elif worker.ready_at is not None and now - worker.last_seen > timeout:
                log.error("%s silent for %.1fs (worker_timeout=%gs): its hub is blocked; "
                          "dumping its stacks, killing and replacing it", worker,
                          now - worker.last_seen, timeout)
                worker.signal(signal.SIGUSR1)  # faulthandler in the worker prints the stacks
                worker.kill_at = now + STACK_DUMP_GRACE

    # ------------------------------------------------------------------ reload

    def _progress_reload(self, now: float) -> None:
        reload = self.reload
        if reload is None:
            return
        new = [w for w in self.workers.values() if w.generation == reload.generation]
        if len(new) >= reload.cfg.server.workers and all(w.ready_at for w in new):
            old = [w for w in self.workers.values() if w.generation < reload.generation]
            log.info("HUP: %s ready; retiring %s", plural(len(new), "new worker"),
                     plural(len(old), "old one"))
            self.reload = None
            self.generation = reload.generation
            self.cfg = reload.cfg
            self.num_workers = reload.cfg.server.workers
            self.crashes = 0
            for worker in old:
                if worker.retire_deadline is None:
                    self._retire(worker)
            self.claims.adopt(reload.claims, reload.cfg)
            sd_notify("READY=1")
        elif now >= reload.deadline:
            log.error("HUP: reload aborted, keeping the current workers: new workers not "
                      "ready within worker_timeout=%gs", reload.cfg.server.worker_timeout)
            self._abort_reload()

    def _abort_reload(self) -> None:
        reload = self.reload
        if reload is None:
            return
        self.reload = None
        for worker in self.workers.values():
            if worker.generation == reload.generation and worker.retire_deadline is None:
                worker.retire_deadline = time.monotonic() + QUIT_GRACE
                worker.signal(signal.SIGQUIT)
        release(reload.claims)
        sd_notify("READY=1")

    # ------------------------------------------------------------------ stopping

    def stop(self, *, graceful: bool) -> None:
        """Stop every worker (TERM: drain; QUIT: now); a QUIT escalates a graceful stop."""
        if self.stopping == "quick" or (self.stopping and graceful):
            return
        self.stopping = "graceful" if graceful else "quick"
        sd_notify("STOPPING=1")
        sig = signal.SIGTERM if graceful else signal.SIGQUIT
        grace = self.cfg.server.drain_timeout + 1.0 if graceful else QUIT_GRACE
        self.stop_deadline = time.monotonic() + grace
        log.info("master %d: %s stop of %s", os.getpid(),
                 "graceful" if graceful else "immediate", plural(len(self.workers), "worker"))
        for worker in self.workers.values():
            worker.signal(sig)

    def _kill_all(self, why: str) -> None:
        for worker in self.workers.values():
            self.exit_code = self.exit_code or EXIT_FAILURE
            if worker.killed:
                continue
            log.warning("%s %s; killing it", worker, why)
            worker.signal(signal.SIGKILL)
        self.stop_deadline = time.monotonic() + QUIT_GRACE

    # ------------------------------------------------------------------ stats

    def request_stats(self, timeout: float = 1.0) -> dict[int, dict[str, Any]]:
        """Ask every ready worker for ``worker.worker_stats`` and wait up to ``timeout``.

        Only the control channels are read meanwhile (queued signals wait for the loop), so
        this is safe to call from a loop handler such as a future admin command.
        """
        rid, asked = self.ask_stats()
        deadline = time.monotonic() + timeout
        while (any(rid not in w.stats_replies for w in asked)
               and (left := deadline - time.monotonic()) > 0):
            self.read_channels(left)
        self.forget_stats(rid)
        return {w.pid: w.stats_replies.pop(rid) for w in asked if rid in w.stats_replies}

    def forget_stats(self, rid: int) -> None:
        """Replies to request ``rid`` that still arrive are dropped."""
        self._stats_ids.discard(rid)

    def ask_stats(self) -> tuple[int, list[WorkerProcess]]:
        """Send a stats request to every ready worker; (request id, the workers asked)."""
        self._stats_id += 1
        rid = self._stats_id
        self._stats_ids.add(rid)
        asked = []
        for worker in self.workers.values():
            if worker.ready_at is None or worker.retire_deadline is not None:
                continue
            try:
                worker.channel.send("stats", id=rid)
                asked.append(worker)
            except OSError:
                continue
        return rid, asked

    # ------------------------------------------------------------------ admin
    #
    # The admin HTTP server runs in threads; what it asks for runs on this loop, through
    # ``call_soon`` (evserver.master_admin).

    def _start_admin(self) -> bool:
        """Serve the admin listener, if enabled; False (logged) when its port is busy."""
        admin = self.cfg.admin
        if not admin.enabled:
            return True
        app = AdminApp(MasterAdmin(self, self.desk), token=admin.token)
        try:
            from .tls import context_from_config

            ssl_context = context_from_config(self.cfg.tls)
            self.admin = ThreadedAdmin(app, admin.host, admin.port, ssl_context)
        except OSError as exc:
            log.error("evserver: %s", admin_unavailable(self.cfg, exc))
            return False
        log.info("admin listening on %s://%s:%d", "https" if ssl_context else "http",
                 *self.admin.address)
        return True

    def call_soon(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the main loop (from any thread); its result arrives in the future."""
        future: Future[Any] = Future()
        self._calls.append((fn, future))
        with self._wakeup_lock:
            if self._wakeup is not None:
                try:
                    os.write(self._wakeup[1], b"\0")
                except OSError:
                    pass  # the pipe is full: the loop is awake anyway
        return future

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def run_supervisor(app_spec: str, cfg: Config, *, config_path: str | None = None,
                   overrides: dict[str, Any] | None = None) -> int:
    return Supervisor(app_spec, cfg, config_path=config_path, overrides=overrides).run()
