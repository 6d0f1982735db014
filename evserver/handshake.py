"""Opening a connection on the server: TLS handshake, HELLO and shared-key authentication.

Runs in the connection's green thread before its reader loop, and only when TLS or keys are
configured (a plain server just sends its precomputed HELLO). Until the peer has proven
itself it is held to ``PRE_AUTH_MAX_BYTES`` of buffered input and one absolute
``handshake_timeout`` for everything (a slow-loris peer trickling bytes gains nothing), and
none of its frames reach the dispatcher: a failed or skipped handshake is an ERROR
``auth_failed`` (corr 0) and a close.

The protocol logic (nonces, proofs) is ``evserver.auth``; this module is its eventlet adapter.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

from . import protocol as p
from ._eventlet import eventlet
from .auth import AuthError, new_nonce

if TYPE_CHECKING:
    from .server import Connection

log = logging.getLogger("evserver.security")

#: The largest frame (and about the most buffered input) accepted before authentication.
PRE_AUTH_MAX_BYTES = 4096


class _Closed(Exception):
    """The peer went away during the handshake."""


class _NoKey(AuthError):
    """The client did not try to authenticate: most likely it was not given the key."""


#: What a client that sent no proof at all is told. It reveals nothing the server's HELLO
#: (which announces the scheme) does not, and saves its operator a trip to the server log.
NO_KEY_HINT = ("authentication failed: this server requires a shared key and the client "
               "sent none (set EVSERVER_SHARED_KEY or pass --shared-key; --key-id names one "
               "of several keys)")


def open_connection(conn: Connection) -> bytes | None:
    """Make ``conn`` ready to serve; return the bytes the client pipelined behind its HELLO
    (to be decoded as ordinary frames), or None when the connection must be closed.

    ``ProtocolError`` (a malformed first frame) propagates to the reader loop's handler.
    """
    server = conn.server
    timer = eventlet.Timeout(server.handshake_timeout)
    try:
        rest = _handshake(conn)
    except eventlet.Timeout as exc:
        if exc is not timer:
            raise
        server.counters["handshake_timeouts"] += 1
        log.info("closing %s: no handshake within %gs", _peer(conn), server.handshake_timeout)
        if server.ssl_context is not None and conn.sock.version() is None:
            return None  # no TLS session to send an ERROR frame through
        conn._error(p.encode_error(0, "handshake_timeout", "HandshakeTimeout",
                                   f"handshake not completed within "
                                   f"{server.handshake_timeout:g}s"))
        return None
    except AuthError as exc:
        timer.cancel()
        server.counters["auth_failures"] += 1
        server.auth_failures.record(_peer(conn), str(exc))
        # The client learns no more than "no" (and whether it sent a key at all): which key
        # or field was wrong is for the log.
        message = NO_KEY_HINT if isinstance(exc, _NoKey) else "authentication failed"
        conn._error(p.encode_error(0, AuthError.code, "AuthError", message))
        return None
    except ssl.SSLError as exc:
        timer.cancel()
        server.counters["tls_failures"] += 1
        log.info("TLS handshake with %s failed: %s", _peer(conn), exc.reason or exc)
        return None
    except _Closed:
        return None
    finally:
        timer.cancel()
    return rest


def _handshake(conn: Connection) -> bytes:
    server = conn.server
    sock = conn.sock
    if server.ssl_context is not None:
        sock.do_handshake()  # eventlet's accept() defers it to this green thread
    authenticator = server.auth
    if authenticator is None:
        sock.sendall(server.hello)
        return b""
    nonce = new_nonce()
    sock.sendall(p.encode_hello({**server.hello_info, **authenticator.hello_info(nonce)}))
    reader = p.FrameReader(p.SERVER_RECEIVES, max_frame_bytes=PRE_AUTH_MAX_BYTES)
    while (frame := reader.next_frame()) is None:
        data = sock.recv(PRE_AUTH_MAX_BYTES)
        if not data:
            raise _Closed
        reader.receive_data(data)
    if frame.kind != p.HELLO:
        raise _NoKey(f"first frame is {p.KIND_NAMES.get(frame.kind, frame.kind)}, "
                     "not an authenticating HELLO")
    if not isinstance(frame.body.get("auth"), dict):
        raise _NoKey("the client HELLO carries no auth map")
    key_id, reply = authenticator.verify(nonce, frame.body)
    sock.sendall(p.encode_hello(reply))
    log.debug("%s authenticated with key id %r", _peer(conn), key_id)
    return reader.take_buffered()


def _peer(conn: Connection) -> str:
    addr = conn.addr
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)
