"""SSLContext builders for the event port, the admin port and the client SDK.

Contexts are always built explicitly (never ``eventlet.wrap_ssl(cert_reqs=...)``, which
silently leaves certificate verification off), with TLS 1.2 as the
floor and the ``ssl`` module's defaults for everything else (ciphers, no compression, no
renegotiation). Every context here is the stdlib's: a server on the hub wraps its listener
with ``evserver._eventlet.wrap_server_socket``, which makes the sockets green (they
trampoline instead of blocking the hub), and the master's threaded admin listener uses it as
it is. So this module imports no eventlet and the master can build its contexts too.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any

__all__ = ["client_context", "server_context", "shutdown_read"]


def server_context(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str] | None = None,
    *,
    ca: str | os.PathLike[str] | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A server context presenting ``cert``; with ``ca``, client certificates it signed are
    verified when offered, and demanded with ``require_client_cert``."""
    if require_client_cert and not ca:
        raise ValueError("require_client_cert needs a CA ([tls] ca) to verify clients with")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Graceful stop half-closes each connection (``shutdown_read``) and then still writes the
    # in-flight replies; OpenSSL 3 would treat that EOF as fatal and fail those writes. Frames
    # are self-delimiting, so a truncated stream cannot pass for a complete one anyway.
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
    if ca:
        ctx.load_verify_locations(cafile=os.fspath(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    cafile: str | os.PathLike[str] | None = None,
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A verifying client context: the server's certificate must chain to ``cafile`` (the
    system's trust store without one) and match the host name; ``certfile``/``keyfile`` are
    this client's certificate, for servers that require one."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=os.fspath(cafile) if cafile else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile:
        ctx.load_cert_chain(os.fspath(certfile), os.fspath(keyfile) if keyfile else None)
    return ctx


def context_from_config(tls: Any) -> ssl.SSLContext | None:
    """The server context for a config's ``[tls]`` table, or None when TLS is off."""
    if not tls.cert:
        return None
    return server_context(tls.cert, tls.key, ca=tls.ca,
                          require_client_cert=tls.require_client_cert)


def shutdown_read(sock: Any) -> None:
    """Stop reading from ``sock`` while still writing to it, TLS or not.

    ``SSLSocket.shutdown`` drops the TLS layer first, so anything written afterwards would go
    out *in plaintext*; for TLS sockets the shutdown goes to the file descriptor instead.
    """
    if isinstance(sock, ssl.SSLSocket):
        with socket.socket(fileno=os.dup(sock.fileno())) as raw:
            raw.shutdown(socket.SHUT_RD)
    else:
        sock.shutdown(socket.SHUT_RD)
