"""Who may connect: the configured keys, what counts as loopback, and the protected-mode
check that refuses to expose an unauthenticated server.

Protected mode (as in Redis): an evserver runs the operator's handlers on whatever anyone
who can connect sends, so listening beyond loopback without proof of who is connecting is
refused unless the operator says ``--insecure``. A shared key or required client
certificates count as that proof. The check runs before anything binds.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from .auth import DEFAULT_KEY_ID
from .errors import ConfigError

__all__ = ["configured_keys", "exposure_problem", "is_loopback"]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything unparsable."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


def configured_keys(cfg: Any) -> dict[str, str]:
    """Every accepted key by id: ``[security.shared_keys]`` plus ``shared_key`` as "default"."""
    sec = cfg.security
    keys = dict(sec.shared_keys)
    if sec.shared_key:
        if keys.get(DEFAULT_KEY_ID, sec.shared_key) != sec.shared_key:
            raise ConfigError(f"security.shared_key and security.shared_keys.{DEFAULT_KEY_ID} "
                              "are both set, to different keys; keep one")
        keys[DEFAULT_KEY_ID] = sec.shared_key
    return keys


def loopback_only(host: str) -> bool:
    """True when every address ``host`` names is a loopback one (checked without binding)."""
    if not host:
        return False  # "" is every interface
    if is_loopback(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False  # cannot tell: assume the worst; binding would fail anyway
    return bool(infos) and all(is_loopback(str(info[4][0])) for info in infos)


def exposure_problem(cfg: Any) -> str | None:
    """Why serving ``cfg`` would expose unauthenticated handlers, or None when it would not."""
    if cfg.security.insecure:
        return None
    fwd = getattr(cfg, "forward", None)  # the Fluentd Forward listener feeds handlers too
    if fwd is not None and fwd.enabled and not fwd.shared_key and not loopback_only(fwd.host):
        return (f"refusing to listen for Fluentd Forward on {fwd.host or '*'}:{fwd.port} "
                "without authentication: anyone who can reach it could send events to your "
                "handlers. Set [forward] shared_key (EVSERVER_FORWARD_SHARED_KEY), listen on "
                "127.0.0.1, or pass --insecure if the network itself is trusted.")
    host = cfg.server.host
    if loopback_only(host):
        return None
    if configured_keys(cfg) or (cfg.tls.cert and cfg.tls.require_client_cert):
        return None
    return (f"refusing to listen on {host or '*'}:{cfg.server.port} without authentication: "
            "anyone who can reach that address could send events to your handlers. Configure "
            "a shared key (--shared-key, EVSERVER_SHARED_KEY or [security] shared_key), "
            "require TLS client certificates ([tls] require_client_cert), listen on "
            "127.0.0.1, or pass --insecure if the network itself is trusted.")
