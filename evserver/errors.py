"""Every exception evserver raises on purpose, each saying whose fault it is.

As in h11 (``LocalProtocolError`` / ``RemoteProtocolError``), an error is either a
``LocalError``, this side's setup or use is wrong (a bad setting, a handler registered
twice, a taken port: fix the deployment or the code), or a ``PeerError``, the other end
sent something this side cannot accept or reported a failure (bad bytes, a wrong key:
close the connection or answer with an error, and keep serving everyone else).

As in msgpack, every error is also the builtin category a caller would naturally catch
(``ValueError`` for bad input, ``ConnectionError`` for the network). ``code`` is the string
sent in an ERROR frame, so server and client agree on it. It is declared in the class line
(``class AddressInUse(LocalError, OSError, code="address_in_use")``), next to the categories,
because together they say what the error is; a class without one keeps its parent's code.
"""

from __future__ import annotations

from typing import Any


class EvserverError(Exception):
    """Base class of every error evserver raises on purpose."""

    code: str = "error"

    def __init_subclass__(cls, *, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


class LocalError(EvserverError):
    """This side is set up or used wrongly; retrying the same thing fails the same way."""


class PeerError(EvserverError):
    """The other end sent something not acceptable, or reported a failure of its own."""


# --------------------------------------------------------------------------- local


class ConfigError(LocalError, ValueError, code="config_error"):
    """A setting is unknown or has a bad value; the message names the key."""


class RegistrationError(LocalError, ValueError, code="registration_error"):
    """A handler was registered twice, or with a bad pattern or option."""


class AppLoadError(LocalError, ImportError, code="app_load_error"):
    """The app spec cannot be imported or does not name an ``App``.

    ``details`` is the traceback of the exception the app's import raised (empty when the
    spec itself is wrong): the message alone, ``KeyError: 'x'``, does not say where.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class AddressInUse(LocalError, OSError, code="address_in_use"):
    """Another process (evserver or not) already owns host:port."""


class StateError(LocalError, RuntimeError, code="state_error"):
    """A connection was asked for a transition its protocol's state table does not allow."""


class TooManyConnections(LocalError, code="overloaded"):
    """A connection beyond ``max_connections``: turned away at once."""


class AdminError(LocalError, code="admin_error"):
    """An admin request that cannot be done; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminFailure(LocalError, code="admin_failure"):
    """A one-line reason an admin command failed (unreachable, refused, bad answer)."""


class HandlerTimeout(LocalError, TimeoutError, code="timeout"):
    """A handler ran longer than its ``timeout`` option."""


class ClusterError(LocalError, RuntimeError, code="cluster_unavailable"):
    """Cluster mode cannot work: its Redis is unreachable, or the settings stored there
    disagree with this node's (fix the deployment)."""


class RoutingError(LocalError, LookupError, code="no_handler"):
    """No processor (for a request) or no handler at all exists for an event type."""


# --------------------------------------------------------------------------- peer


class ProtocolError(PeerError, ValueError, code="bad_frame"):
    """The peer sent bytes that are not a valid frame; the connection cannot continue."""


class FrameTooLarge(ProtocolError, code="frame_too_large"):
    """A frame is larger than the configured ``max_frame_bytes``."""


class UnsupportedVersion(ProtocolError, code="unsupported_version"):
    """The peer speaks a protocol version this side does not."""


class TooManyPending(PeerError, code="overloaded"):
    """The peer has more than ``max_pending_replies`` responses outstanding: it is not
    reading them."""


class IdleTimeout(PeerError, TimeoutError, code="idle_timeout"):
    """The peer sent nothing for ``idle_timeout`` seconds, with nothing of its in flight."""


class HandshakeTimeout(PeerError, TimeoutError, code="handshake_timeout"):
    """The peer did not finish the TLS and authentication handshakes in time."""


class AuthError(PeerError, PermissionError, code="auth_failed"):
    """A handshake failed: wrong or missing key, malformed auth data, or an unproven server."""


class NoKey(AuthError):
    """The client did not try to authenticate: most likely it was not given the key."""


class ForwardError(ProtocolError, code="bad_forward_request"):
    """A Fluentd Forward Protocol request or handshake frame is malformed or not allowed."""


class HandshakeFailed(ForwardError, code="auth_failed"):
    """A Forward PING was malformed or its credentials were wrong; the PONG saying so is
    queued."""


class RequestTooLarge(ForwardError, FrameTooLarge, code="frame_too_large"):
    """A request exceeds ``max_request_bytes``, or its entries ``max_decompressed_bytes``."""


class RemoteError(PeerError):
    """The server reported a failure: a handler raised, or nothing handles the event type.

    ``type`` is the remote exception's class name (or the error code for protocol-level
    failures) and ``message`` its text, so callers can branch without parsing strings.
    """

    def __init__(self, type: str, message: str, code: str = "handler_error") -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.code = code


class ClientConnectionError(PeerError, ConnectionError, code="connection_error"):
    """The client could not reach the server, or lost it and ran out of retries."""
