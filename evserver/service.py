"""The master's part in the operating system's service management: systemd's readiness
protocol (``Type=notify``) and the pid file.

Both are best effort for the service manager and never stop the master: a failed
notification is logged at debug level, a pid file that another master took over is left.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from .contract import NOTIFY_SOCKET_ENV

log = logging.getLogger("evserver.supervisor")

__all__ = ["remove_pid_file", "sd_notify", "write_pid_file"]


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about ``state`` when NOTIFY_SOCKET is set; never fails."""
    addr = os.environ.get(NOTIFY_SOCKET_ENV)
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.debug("sd_notify(%r) failed: %s", state, exc)


def write_pid_file(path: str) -> None:
    """Write atomically, so a reader never sees an empty or partial pid."""
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pid_file(path: str) -> None:
    """Remove it only if it is still ours (another master may have taken it over)."""
    try:
        if Path(path).read_text().strip() == str(os.getpid()):
            os.unlink(path)
    except OSError:
        pass
