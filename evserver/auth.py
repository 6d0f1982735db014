"""The shared-key handshake, sans-I/O: nonces, proofs and their constant-time checks.

Mutual challenge-response (docs/protocol.md, "Authentication"): the server's HELLO carries a
fresh random ``nonce``; the client answers with its own ``cnonce`` and
``HMAC-SHA256(key, b"evserver-client" + nonce + cnonce)``; the server answers with
``HMAC-SHA256(key, b"evserver-server" + nonce + cnonce)``. Keys never cross the wire, a
recorded handshake is useless on another connection (the server's nonce is new each time),
and the distinct labels stop a proof from one direction being reflected as the other.

Nothing here does I/O, so the server adapter, the blocking client and other-language
implementations can be checked against the same functions.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any

from .errors import AuthError

__all__ = [
    "AUTH_SCHEME",
    "DEFAULT_KEY_ID",
    "AuthError",
    "Authenticator",
    "client_hello",
    "client_proof",
    "server_proof",
    "verify_server",
]

AUTH_SCHEME = "hmac-sha256"
DEFAULT_KEY_ID = "default"  # the id of the single ``--shared-key``
NONCE_BYTES = 16
MIN_KEY_BYTES = 16  # shorter secrets are guessable offline from one recorded handshake
_CLIENT_LABEL = b"evserver-client"
_SERVER_LABEL = b"evserver-server"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def client_proof(key: bytes, snonce: bytes, cnonce: bytes) -> bytes:
    return hmac.digest(key, _CLIENT_LABEL + snonce + cnonce, hashlib.sha256)


def server_proof(key: bytes, snonce: bytes, cnonce: bytes) -> bytes:
    return hmac.digest(key, _SERVER_LABEL + snonce + cnonce, hashlib.sha256)


def as_key(secret: str | bytes) -> bytes:
    """Secrets are configured as text; their UTF-8 bytes are the HMAC key."""
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a shared key must be at least {MIN_KEY_BYTES} bytes long")
    return key


class Authenticator:
    """The server side: the configured keys, and the check of one client HELLO.

    Holding several keys is what makes rotation possible without downtime: add the new key,
    move the clients over, remove the old key.
    """

    def __init__(self, keys: Mapping[str, str | bytes]) -> None:
        if not keys:
            raise ValueError("an Authenticator needs at least one key")
        self.keys = {str(kid): as_key(secret) for kid, secret in keys.items()}

    def hello_info(self, nonce: bytes) -> dict[str, Any]:
        """What the server adds to its HELLO info for this connection."""
        return {"auth": AUTH_SCHEME, "nonce": nonce}

    def verify(self, snonce: bytes, info: Any) -> tuple[str, dict[str, Any]]:
        """Check a client HELLO's info; return (key id, the HELLO info proving the server).

        Raises ``AuthError`` with a reason fit for the server log (the client only ever
        learns "authentication failed"). Every candidate key is tried, even after a match,
        so the time taken does not reveal which key id matched.
        """
        auth = info.get("auth") if isinstance(info, dict) else None
        if not isinstance(auth, dict):
            raise AuthError("the client HELLO carries no auth map")
        key_id, cnonce, proof = auth.get("key_id"), auth.get("cnonce"), auth.get("proof")
        if key_id is not None and not isinstance(key_id, str):
            raise AuthError("auth.key_id must be a string or nil")
        if not isinstance(cnonce, bytes) or len(cnonce) < NONCE_BYTES or len(cnonce) > 64:
            raise AuthError(f"auth.cnonce must be {NONCE_BYTES}-64 bytes of bin")
        if not isinstance(proof, bytes):
            raise AuthError("auth.proof must be bin")
        if key_id is not None:
            if key_id not in self.keys:
                raise AuthError(f"unknown key id {key_id[:64]!r}")
            candidates = [(key_id, self.keys[key_id])]
        else:
            candidates = list(self.keys.items())
        matched: str | None = None
        for kid, key in candidates:
            if hmac.compare_digest(client_proof(key, snonce, cnonce), proof) and matched is None:
                matched = kid
        if matched is None:
            raise AuthError("wrong proof" + (f" for key id {key_id!r}" if key_id else ""))
        return matched, {"proof": server_proof(self.keys[matched], snonce, cnonce)}


def client_hello(key: bytes, key_id: str | None, snonce: bytes) -> tuple[dict[str, Any], bytes]:
    """The client's HELLO info answering ``snonce``, and the cnonce to verify the reply with."""
    cnonce = new_nonce()
    auth = {"key_id": key_id, "cnonce": cnonce, "proof": client_proof(key, snonce, cnonce)}
    return {"auth": auth}, cnonce


def verify_server(key: bytes, snonce: bytes, cnonce: bytes, info: Any) -> None:
    """Raise ``AuthError`` unless the server's reply proves it holds ``key``."""
    proof = info.get("proof") if isinstance(info, dict) else None
    if not isinstance(proof, bytes) or not hmac.compare_digest(
            server_proof(key, snonce, cnonce), proof):
        raise AuthError("the server could not prove it knows the shared key")
