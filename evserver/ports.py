"""The master's claims on the ports its workers share: one per listener, kept across reloads.

SO_REUSEPORT lets any same-user process join the workers' port silently, so before any
worker binds: (1) an abstract unix socket named after the address is bound (an evserver
lock the kernel releases when the master dies, so no stale files), then (2) the port is
bound *without* SO_REUSEPORT, which fails if anything already listens there. On HUP the
old workers still listen; the master keeps its claims and does not probe again.

A port of 0 is resolved once, here, so every worker (and every later generation) binds the
same port: a claim made for port 0 pins the config to the port the kernel picked.
"""

from __future__ import annotations

import errno
import socket
import sys

from .config import Config
from .errors import AddressInUse

__all__ = ["CLAIMED", "Claims", "PortClaim"]

#: The config tables whose ``host``/``port`` every worker binds with SO_REUSEPORT, and how
#: a refusal names them.
CLAIMED = {"server": "", "forward": "Forward listener: "}


class PortClaim:
    """Exclusive ownership of host:port for one master (see the module docstring)."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            probe.bind((host, port))
            self.host, self.port = host, probe.getsockname()[1]  # port 0: pick one for all
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"{host}:{port} is already in use by another process") from None
            raise AddressInUse(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
        finally:
            probe.close()
        self._lock: socket.socket | None = None
        if sys.platform.startswith("linux"):
            lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                lock.bind(f"\0evserver:{self.host}:{self.port}")
            except OSError:
                lock.close()
                raise AddressInUse(
                    f"another evserver is already serving {self.host}:{self.port}") from None
            self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _enabled(cfg: Config, table: str) -> bool:
    return table == "server" or bool(cfg.forward.enabled)


class Claims:
    """The claims a master holds, by table; ``claim`` + ``adopt`` move them on a reload."""

    def __init__(self) -> None:
        self.held: dict[str, PortClaim] = {}

    def claim(self, cfg: Config) -> tuple[Config, dict[str, PortClaim]]:
        """Claim every address ``cfg`` needs that is not held yet; return ``cfg`` with each
        port pinned to its claim, and the new claims (for ``adopt`` or ``release``).

        A held claim is kept when the address is unchanged or the port is 0 (HUP with an
        ephemeral port keeps serving where the workers already listen). ``AddressInUse``
        (its message naming the listener) leaves nothing new claimed.
        """
        new: dict[str, PortClaim] = {}
        pins: dict[str, int] = {}
        for table, what in CLAIMED.items():
            if not _enabled(cfg, table):
                continue
            host, port = cfg.get(table, "host"), cfg.get(table, "port")
            held = self.held.get(table)
            if held is not None and (port == 0 or (host, port) == (held.host, held.port)):
                claim = held
            else:
                try:
                    claim = new[table] = PortClaim(host, port)
                except AddressInUse as exc:
                    release(new)
                    raise AddressInUse(f"{what}{exc}") from None
            if claim.port != port:
                pins[f"{table}.port"] = claim.port
        return (cfg.replace(**pins) if pins else cfg), new

    def adopt(self, new: dict[str, PortClaim], cfg: Config) -> None:
        """``cfg`` is now served: hold ``new``, release what it replaced or no longer needs."""
        for table in list(self.held):
            if table in new or not _enabled(cfg, table):
                self.held.pop(table).release()
        self.held.update(new)

    def address(self, table: str = "server") -> tuple[str, int]:
        claim = self.held[table]
        return claim.host, claim.port

    def release_all(self) -> None:
        release(self.held)
        self.held = {}


def release(claims: dict[str, PortClaim]) -> None:
    for claim in claims.values():
        claim.release()
