"""Exceptions, each saying whose fault it is and which wire error code it maps to.

As in h11 and msgpack, every error is an ``EvserverError`` *and* the builtin category a caller
would naturally catch (``ValueError`` for bad input, ``ConnectionError`` for the network).
``code`` is the string sent in an ERROR frame, so server and client agree on it.
"""

from __future__ import annotations


class EvserverError(Exception):
    """Base class of every error evserver raises on purpose."""

    code = "error"


class ConfigError(EvserverError, ValueError):
    """A setting is unknown or has a bad value; the message names the key."""

    code = "config_error"


class ProtocolError(EvserverError, ValueError):
    """The peer sent bytes that are not a valid frame; the connection cannot continue."""

    code = "bad_frame"


class ForwardError(ProtocolError):
    """A Fluentd Forward Protocol request or handshake frame is malformed or not allowed."""

    code = "bad_forward_request"


class FrameTooLarge(ProtocolError):
    """A frame is larger than the configured ``max_frame_bytes``."""

    code = "frame_too_large"


class UnsupportedVersion(ProtocolError):
    """The peer speaks a protocol version this side does not."""

    code = "unsupported_version"


class RoutingError(EvserverError, LookupError):
    """No processor (for a request) or no handler at all exists for an event type."""

    code = "no_handler"


class RegistrationError(EvserverError, ValueError):
    """A handler was registered twice, or with a bad pattern or option."""

    code = "registration_error"


class RemoteError(EvserverError):
    """The server reported a failure: a handler raised, or nothing handles the event type.

    ``type`` is the remote exception's class name (or the error code for protocol-level
    failures) and ``message`` its text, so callers can branch without parsing strings.
    """

    def __init__(self, type: str, message: str, code: str = "handler_error") -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.code = code


class ClientConnectionError(EvserverError, ConnectionError):
    """The client could not reach the server, or lost it and ran out of retries."""

    code = "connection_error"


class HandlerTimeout(EvserverError, TimeoutError):
    """A handler ran longer than its ``timeout`` option."""

    code = "timeout"


class ClusterError(EvserverError):
    """Cluster mode cannot work: Redis unreachable, or its stored settings disagree with ours."""

    code = "cluster_unavailable"
