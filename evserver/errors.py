"""Every exception evserver raises on purpose, each saying whose fault it is.

As in h11 (``LocalProtocolError`` / ``RemoteProtocolError``), an error is either a
``LocalError``, this side's setup or use is wrong (a bad setting, a handler registered
twice, a taken port: fix the deployment or the code), or a ``PeerError``, the other end
sent something this side cannot accept or reported a failure (bad bytes, a wrong key:
close the connection or answer with an error, and keep serving everyone else).

As in msgpack, every error is also the builtin category a caller would naturally catch
(``ValueError`` for bad input, ``ConnectionError`` for the network). ``code`` is the string
sent in an ERROR frame, so server and client agree on it.
"""

from __future__ import annotations


class EvserverError(Exception):
    """Base class of every error evserver raises on purpose."""

    code = "error"


class LocalError(EvserverError):
    """This side is set up or used wrongly; retrying the same thing fails the same way."""


class PeerError(EvserverError):
    """The other end sent something not acceptable, or reported a failure of its own."""


# --------------------------------------------------------------------------- local


class ConfigError(LocalError, ValueError):
    """A setting is unknown or has a bad value; the message names the key."""

    code = "config_error"


class RegistrationError(LocalError, ValueError):
    """A handler was registered twice, or with a bad pattern or option."""

    code = "registration_error"


class AppLoadError(LocalError, ImportError):
    """The app spec cannot be imported or does not name an ``App``.

    ``details`` is the traceback of the exception the app's import raised (empty when the
    spec itself is wrong): the message alone, ``KeyError: 'x'``, does not say where.
    """

    code = "app_load_error"

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class AddressInUse(LocalError, OSError):
    """Another process (evserver or not) already owns host:port."""

    code = "address_in_use"


class StateError(LocalError, RuntimeError):
    """A connection was asked for a transition its protocol's state table does not allow."""

    code = "state_error"


class TooManyConnections(LocalError):
    """A connection beyond ``max_connections``: turned away at once."""

    code = "overloaded"


class AdminError(LocalError):
    """An admin request that cannot be done; ``status`` is the HTTP status to answer."""

    code = "admin_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminFailure(LocalError):
    """A one-line reason an admin command failed (unreachable, refused, bad answer)."""

    code = "admin_failure"


class HandlerTimeout(LocalError, TimeoutError):
    """A handler ran longer than its ``timeout`` option."""

    code = "timeout"


class ClusterError(LocalError, RuntimeError):
    """Cluster mode cannot work: its Redis is unreachable, or the settings stored there
    disagree with this node's (fix the deployment)."""

    code = "cluster_unavailable"


class RoutingError(LocalError, LookupError):
    """No processor (for a request) or no handler at all exists for an event type."""

    code = "no_handler"


# --------------------------------------------------------------------------- peer


class ProtocolError(PeerError, ValueError):
    """The peer sent bytes that are not a valid frame; the connection cannot continue."""

    code = "bad_frame"


class FrameTooLarge(ProtocolError):
    """A frame is larger than the configured ``max_frame_bytes``."""

    code = "frame_too_large"


class UnsupportedVersion(ProtocolError):
    """The peer speaks a protocol version this side does not."""

    code = "unsupported_version"


class TooManyPending(PeerError):
    """The peer has more than ``max_pending_replies`` responses outstanding: it is not
    reading them."""

    code = "overloaded"


class IdleTimeout(PeerError, TimeoutError):
    """The peer sent nothing for ``idle_timeout`` seconds, with nothing of its in flight."""

    code = "idle_timeout"


class HandshakeTimeout(PeerError, TimeoutError):
    """The peer did not finish the TLS and authentication handshakes in time."""

    code = "handshake_timeout"


class AuthError(PeerError, PermissionError):
    """A handshake failed: wrong or missing key, malformed auth data, or an unproven server."""

    code = "auth_failed"


class NoKey(AuthError):
    """The client did not try to authenticate: most likely it was not given the key."""


class ForwardError(ProtocolError):
    """A Fluentd Forward Protocol request or handshake frame is malformed or not allowed."""

    code = "bad_forward_request"


class HandshakeFailed(ForwardError):
    """A Forward PING was malformed or its credentials were wrong; the PONG saying so is
    queued."""

    code = "auth_failed"


class RequestTooLarge(ForwardError, FrameTooLarge):
    """A request exceeds ``max_request_bytes``, or its entries ``max_decompressed_bytes``."""

    code = "frame_too_large"


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


class ClientConnectionError(PeerError, ConnectionError):
    """The client could not reach the server, or lost it and ran out of retries."""

    code = "connection_error"
