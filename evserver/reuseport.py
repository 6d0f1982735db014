"""Keep connections queued on a closing SO_REUSEPORT listener: migrate them, do not reset them.

Every worker has its own listener in one ``SO_REUSEPORT`` group. When one closes (a ``HUP``
retires the old generation, ``TTOU`` drains a worker, a worker is killed), Linux resets the
connections still in its accept queue (handshake done, not yet accepted) unless it may
*migrate* them to another listener of the group. It may when ``net.ipv4.tcp_migrate_req`` is
1 (the default is 0), or (Linux >= 5.14) when the group carries an eBPF program of type
``BPF_PROG_TYPE_SK_REUSEPORT`` attached as ``BPF_SK_REUSEPORT_SELECT_OR_MIGRATE``.

``allow_migration`` attaches the smallest such program: ``return SK_PASS`` without selecting
a socket, which tells the kernel to pick one by its usual hash for new connections and for
migrated ones alike. Balancing is unchanged; only the resets go. Loading a program needs
``CAP_BPF`` (or ``CAP_SYS_ADMIN``); without it (or on an older kernel) nothing changes and
the sysctl remains the way to get migration (docs/workers.md).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import socket
import struct
from pathlib import Path

log = logging.getLogger("evserver.reuseport")

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SK_REUSEPORT = 21
_BPF_SK_REUSEPORT_SELECT_OR_MIGRATE = 40
_SO_ATTACH_REUSEPORT_EBPF = 52
_SK_PASS = 1
# r0 = SK_PASS; exit  (struct bpf_insn: u8 code, u8 dst/src regs, s16 off, s32 imm)
_PROGRAM = struct.pack("<BBhi", 0xB7, 0, 0, _SK_PASS) + struct.pack("<BBhi", 0x95, 0, 0, 0)
_LICENSE = ctypes.create_string_buffer(b"GPL")
_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")

_warned = False


def sysctl_migrates() -> bool:
    """True when ``net.ipv4.tcp_migrate_req`` already makes Linux migrate (this netns)."""
    try:
        return _SYSCTL.read_text().strip() == "1"
    except OSError:
        return False


def _load_program() -> int:
    """The program's fd; ``OSError`` when the kernel or our privileges refuse it."""
    if _SYS_BPF is None:
        raise OSError(0, f"no bpf() syscall number known for {platform.machine()}")
    insns = ctypes.create_string_buffer(_PROGRAM, len(_PROGRAM))
    attr = bytearray(72)  # union bpf_attr, BPF_PROG_LOAD: fields up to expected_attach_type
    struct.pack_into("<IIQQ", attr, 0, _BPF_PROG_TYPE_SK_REUSEPORT, len(_PROGRAM) // 8,
                     ctypes.addressof(insns), ctypes.addressof(_LICENSE))
    struct.pack_into("<I", attr, 68, _BPF_SK_REUSEPORT_SELECT_OR_MIGRATE)
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, buf, len(attr))
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return int(fd)


def allow_migration(sock: socket.socket) -> bool:
    """Let the kernel migrate ``sock``'s queued connections when it (or a peer) closes.

    Call it after ``listen()`` (a program attached before would be dropped when the socket
    joins the group). Returns whether migration is on for the group, by the program or by
    the sysctl; logs once per process why it is not.
    """
    global _warned
    try:
        fd = _load_program()
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_EBPF, fd)
        finally:
            os.close(fd)
        return True
    except OSError as exc:
        if sysctl_migrates():
            return True
        if not _warned:
            _warned = True
            log.info("SO_REUSEPORT migration unavailable (%s): closing this listener resets "
                     "connections queued on it; net.ipv4.tcp_migrate_req=1 avoids that",
                     exc.strerror or exc)
        return False
