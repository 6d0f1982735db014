"""The Fluentd Forward handshake, sans-I/O: HELO, then PING checked and PONG answered.

Forward Protocol v1's optional authentication: the server's HELO carries a nonce (and, with
users, an auth salt); the client's PING proves the shared key (and a user's password) with
SHA-512 digests; the PONG proves the server knows the key too. ``forward.ForwardConnection``
runs it in the stream before any request is accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import msgpack

__all__ = ["ForwardHandshake", "raw_bytes"]


def raw_bytes(value: str | bytes) -> bytes:
    """The bytes a str or bin arrived as (undoing surrogateescape): Fluent Bit sends some
    strings as binary *str*, so they are compared as bytes."""
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _sha512_hex(*parts: bytes) -> bytes:
    digest = hashlib.sha512()
    for part in parts:
        digest.update(part)
    return digest.hexdigest().encode("ascii")


class ForwardHandshake:
    """Server side of HELO/PING/PONG for a shared key and, optionally, user passwords.

    ``users`` (username -> raw password) turns on user authentication; HELO then carries the
    ``auth`` salt, otherwise it is empty ("authentication not required", per the spec).
    ``nonce`` and ``auth_salt`` default to 16 random bytes; pass them only for test vectors.
    """

    __slots__ = (
        "_shared_key",
        "auth_salt",
        "authenticated",
        "failed",
        "hostname",
        "nonce",
        "reason",
        "users",
    )

    def __init__(
        self,
        shared_key: str,
        *,
        hostname: str,
        users: dict[str, str] | None = None,
        nonce: bytes | None = None,
        auth_salt: bytes | None = None,
    ) -> None:
        self._shared_key = shared_key.encode()
        self.hostname = hostname
        self.users = None if users is None else dict(users)
        self.nonce = secrets.token_bytes(16) if nonce is None else nonce
        self.auth_salt = secrets.token_bytes(16) if auth_salt is None else auth_salt
        self.authenticated = False
        self.failed = False
        self.reason = ""

    def helo_bytes(self) -> bytes:
        """HELO as Fluentd sends it: bin nonce and auth salt, keepalive allowed."""
        auth = self.auth_salt if self.users is not None else b""
        options = {"nonce": self.nonce, "auth": auth, "keepalive": True}
        return msgpack.packb(["HELO", options], use_bin_type=True)

    def verify_ping(self, ping: Any) -> bytes:
        """Check a PING and return the PONG to send; on failure set ``failed`` and ``reason``."""
        if not (type(ping) is list and len(ping) == 6 and ping[0] == "PING"):
            return self._fail("invalid ping message")
        _, client_hostname, salt, digest, username, password = ping
        if not (
            isinstance(salt, str | bytes)
            and all(type(v) is str for v in (client_hostname, digest, username, password))
        ):
            return self._fail("invalid ping message")
        salt_b = raw_bytes(salt)
        expected = _sha512_hex(salt_b, raw_bytes(client_hostname), self.nonce, self._shared_key)
        if not hmac.compare_digest(expected, raw_bytes(digest)):
            return self._fail("shared_key mismatch")
        if self.users is not None:
            stored = self.users.get(username)
            # Hash even for unknown users so timing does not reveal which usernames exist.
            secret = (stored if stored is not None else "\0unknown").encode()
            expected = _sha512_hex(self.auth_salt, raw_bytes(username), secret)
            if not hmac.compare_digest(expected, raw_bytes(password)) or stored is None:
                return self._fail("username/password mismatch")
        self.authenticated = True
        server_digest = _sha512_hex(salt_b, self.hostname.encode(), self.nonce, self._shared_key)
        return msgpack.packb(["PONG", True, "", self.hostname, server_digest.decode("ascii")])

    def _fail(self, reason: str) -> bytes:
        self.failed = True
        self.reason = reason
        return msgpack.packb(["PONG", False, reason, "", ""])
