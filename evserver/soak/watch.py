"""The server under test: start it, read its log, sample its processes from /proc."""

from __future__ import annotations

import calendar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import DIR_ENV

_READY = re.compile(r"worker (\d+) \(gen (\d+)\) ready on ")
APP = "evserver.soak.app:app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out.add(int(entry.name))
    return out


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class Server:
    """``evserver serve evserver.soak.app:app --workers N`` with its own ports and directory.

    Its output (master and workers, JSON lines) goes to ``serve.log``; ``ready`` maps each
    worker pid that logged "ready on" to that moment, on this process's monotonic clock.
    """

    def __init__(self, workdir: Path, workers: int) -> None:
        self.workdir = workdir
        self.workers = workers
        self.port, self.forward_port, self.admin_port = free_port(), free_port(), free_port()
        self.address = ("127.0.0.1", self.port)
        self.forward_address = ("127.0.0.1", self.forward_port)
        self.log_path = workdir / "serve.log"
        self.ready: dict[int, float] = {}
        self.generation: dict[int, int] = {}
        self.lines: list[dict[str, Any]] = []
        self._offset = 0
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        # Log times are wall-clock; this converts them to the monotonic clock.
        self._wall_to_mono = time.monotonic() - time.time()

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVSERVER_")}
        env.update({DIR_ENV: str(self.workdir), "PYTHONDONTWRITEBYTECODE": "1",
                    "EVSERVER_DEAD_LETTERS_PATH": str(self.workdir / "dead-letters")})
        cmd = [sys.executable, "-m", "evserver", "serve", APP, "--workers", str(self.workers),
               "--host", "127.0.0.1", "--port", str(self.port),
               "--admin-port", str(self.admin_port),
               "--forward-enabled", "--forward-port", str(self.forward_port),
               "--log-format", "json", "--drain-timeout", "10"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if not self.wait(lambda: self.logged("master ready"), timeout):
            self.kill()
            raise RuntimeError(f"the soak server did not start:\n{self.log_path.read_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll_log(self) -> None:
        """Read the log lines written since the last call; note worker readiness."""
        with self._lock, self.log_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            for raw in data[:end].splitlines():
                try:
                    line = json.loads(raw)
                except ValueError:
                    line = {"message": raw.decode(errors="replace"), "level": "raw"}
                self.lines.append(line)
                m = _READY.search(str(line.get("message", "")))
                if m and "time" in line:
                    pid = int(m.group(1))
                    self.ready[pid] = self._mono(line["time"])
                    self.generation[pid] = int(m.group(2))

    def _mono(self, stamp: str) -> float:
        wall = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
        return wall + float("0" + stamp[19:-1]) + self._wall_to_mono

    def logged(self, text: str) -> bool:
        self.poll_log()
        return any(text in str(line.get("message", "")) for line in self.lines)

    def worker_pids(self) -> set[int]:
        return children(self.pid)

    def settled(self, count: int) -> bool:
        """``count`` workers, every one of them ready (no reload or restart in progress)."""
        self.poll_log()
        pids = self.worker_pids()
        return len(pids) == count and all(pid in self.ready for pid in pids)

    @staticmethod
    def wait(cond: Any, timeout: float, interval: float = 0.02) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)
        return True

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stats(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin_port}/stats"
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc: dict[str, Any] = json.load(resp)
            return doc

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful stop (SIGTERM); the master's exit code, or None if it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is None:
            return
        pids = self.worker_pids() if self.proc.poll() is None else set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@dataclass
class ProcessSamples:
    """RSS (KiB) and open fds of one process over the run."""

    pid: int
    role: str
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, fds)


class Sampler(threading.Thread):
    """Every ``interval`` seconds: RSS and fd count of the master and every worker."""

    def __init__(self, server: Server, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.server = server
        self.interval = interval
        self.processes: dict[int, ProcessSamples] = {}
        self.queue_peak: dict[int, int] = {}  # worker pid -> most jobs seen queued at once
        self.halt = threading.Event()

    def sample(self) -> dict[int, int]:
        """Sample every process once; return each one's open fds."""
        now = time.monotonic()
        pids = {self.server.pid: "master", **dict.fromkeys(self.server.worker_pids(), "worker")}
        fds_now = {}
        for pid, role in pids.items():
            rss, fds = rss_kib(pid), fd_count(pid)
            if rss is not None and fds is not None:
                proc = self.processes.setdefault(pid, ProcessSamples(pid, role))
                proc.samples.append((now, rss, fds))
                fds_now[pid] = fds
        return fds_now

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.sample()
            try:  # how backed up each worker is: its RSS follows its queue
                for w in self.server.stats().get("workers", []):
                    pid = int(w["pid"])
                    self.queue_peak[pid] = max(self.queue_peak.get(pid, 0), int(w["queued"]))
            except (OSError, ValueError, KeyError):
                pass

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
