"""Settings, declared once, loaded from defaults < TOML file < environment < CLI overrides.

As with gunicorn's ``Setting`` classes, each setting is a single ``Setting`` declaration: its env
var (``EVSERVER_<TABLE>_<KEY>``), CLI flag, help text, the default ``config/evserver.toml`` and the
README table are all derived from it, so adding a setting can't leave one of them stale.
Every error is a ``ConfigError`` naming the key, the expected value and where the bad value came
from, because a config mistake is found by whoever deploys, not whoever wrote the code.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, cast

from evserver.auth import MIN_KEY_BYTES as _MIN_KEY
from evserver.errors import ConfigError

DEFAULT_PATH = Path("config", "evserver.toml")
ENV_PREFIX = "EVSERVER_"
# Read by the admin CLI (its TLS trust and client certificate), not settings of the server.
ADMIN_CLIENT_ENV = frozenset({"EVSERVER_ADMIN_CA", "EVSERVER_ADMIN_CERT", "EVSERVER_ADMIN_KEY"})
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_F = TypeVar("_F", bound=Callable[..., Any])
_NOUNS = {bool: "a boolean (true/false, 1/0, yes/no, on/off)", int: "an integer",
          float: "a number", str: "a string", dict: "a table"}


@dataclass(frozen=True)
class Check:
    """A validator that also says what it accepts, so every error message can say "expected …"."""

    expects: str
    ok: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        return self.ok(value)


def _at_least(lo: float, *, strict: bool = False, noun: str = "an integer") -> Check:
    op = ">" if strict else ">="
    return Check(f"{noun} {op} {lo}", lambda v: v > lo if strict else v >= lo)


def _number(lo: float = 0, *, strict: bool = False) -> Check:
    return _at_least(lo, strict=strict, noun="a number")


_PORT = Check("an integer 0-65535", lambda v: 0 <= v <= 65535)


def _one_of(*choices: str) -> Check:
    return Check("one of " + ", ".join(map(repr, choices)), lambda v: v in choices)


def _parse_workers(raw: Any) -> int:
    """``"auto"`` means one worker per CPU; stored as an int so consumers never see the string."""
    if raw == "auto":
        return os.cpu_count() or 1
    return _coerce(int, raw)


def parse_users(raw: Any) -> dict[str, str]:
    """``"alice:pw1,bob:pw2"`` -> ``{"alice": "pw1", "bob": "pw2"}`` (a table would not fit a
    flag or an env var); a password may contain ':' but not ','. Parsed once, when the
    setting is read: ``cfg.forward.users`` is the dict (or None)."""
    if isinstance(raw, dict):  # already parsed: a worker's copy of the master's config
        if not raw or not all(isinstance(v, str) and v for v in raw.values()):
            raise ValueError(raw)
        return {str(name): password for name, password in raw.items()}
    if not isinstance(raw, str):
        raise ValueError(raw)
    users = {}
    for pair in raw.split(","):
        name, sep, password = pair.strip().partition(":")
        if not (name and sep and password):
            raise ValueError(pair)
        users[name] = password
    return users


@dataclass(frozen=True)
class Setting:
    """One setting. ``type`` is the stored type; ``parse`` replaces the generic coercion."""

    table: str
    key: str
    type: type
    default: Any
    help: str
    validate: Callable[[Any], bool] | None = None  # a Check says what it expects
    optional: bool = False  # None allowed; "" (env, file or flag) means None
    parse: Callable[[Any], Any] | None = None
    expects: str = ""  # overrides the phrase derived from type/validate
    flag_name: str = ""  # overrides the derived flag, for the few that must be short
    env_name: str = ""  # overrides the derived env var, likewise
    cli: bool = True  # False: no flag (a table of secrets has no sane command-line form)

    @property
    def name(self) -> str:
        return f"{self.table}.{self.key}"

    @property
    def env_var(self) -> str:
        if self.env_name:
            return self.env_name
        return f"{ENV_PREFIX}{self.table}_{self.key}".upper()

    @property
    def flag(self) -> str:
        """``--port`` for [server] (the common case), ``--handlers-retries`` for other tables."""
        if self.flag_name or not self.cli:
            return self.flag_name or f"(no flag: {self.name})"
        prefix = "" if self.table == "server" else f"{self.table}-"
        return f"--{prefix}{self.key}".replace("_", "-")

    @property
    def expected(self) -> str:
        text = self.expects or getattr(self.validate, "expects", _NOUNS[self.type])
        return f"{text} or empty for none" if self.optional else text

    def cli_help(self) -> str:
        default = "none" if self.default is None else _toml_value(self.default)
        accepts = "" if self.type is bool else f" Accepts {self.expected}."  # bools are flags
        return f"{self.help}{accepts} [env {self.env_var}; default {default}]"

    def convert(self, raw: Any) -> Any:
        """Coerce and validate ``raw``; raises ValueError (the caller adds key and source)."""
        if self.optional and raw in (None, ""):
            return None
        value = self.parse(raw) if self.parse else _coerce(self.type, raw)
        if self.validate is not None and not self.validate(value):
            raise ValueError
        return value


def _shared_key(raw: Any) -> str:
    if not isinstance(raw, str) or len(raw.encode()) < _MIN_KEY:
        raise ValueError
    return raw


def _shared_keys(raw: Any) -> dict[str, str]:
    """A ``[security.shared_keys]`` table, or (from the environment) the same as JSON."""
    if isinstance(raw, str):
        raw = json.loads(raw) if raw.strip() else {}
    if not isinstance(raw, dict):
        raise ValueError
    return {str(kid): _shared_key(secret) for kid, secret in raw.items()}


def _coerce(typ: type, raw: Any) -> Any:
    """Parse strings (env, flags, even quoted TOML values, so all sources agree); check others.

    Native values must already have the stored type, except that an int is a fine float.
    """
    if isinstance(raw, str) and typ is not str:
        text = raw.strip().lower()
        if typ is bool and text in _TRUE + _FALSE:
            return text in _TRUE
        if typ is bool:
            raise ValueError
        return typ(text)  # int("x") / float("x") raise ValueError
    accepted = (int, float) if typ is float else (typ,)  # TOML `drain_timeout = 5` is fine
    if isinstance(raw, bool) != (typ is bool) or not isinstance(raw, accepted):
        raise ValueError  # bool is an int subclass: reject `port = true`
    return typ(raw)


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("server", "host", str, "127.0.0.1", "Address to listen on."),
    S("server", "port", int, 7878, "TCP port to listen on; 0 picks an ephemeral port.",
      _PORT),
    S("server", "pool_size", int, 64, "Green threads running handlers.", _at_least(1)),
    S("server", "queue_size", int, 256, "Jobs that may wait for the pool.", _at_least(1)),
    S("server", "max_frame_bytes", int, 1048576, "Largest accepted frame, in bytes.",
      _at_least(1024)),
    S("server", "drain_timeout", float, 30.0, "Seconds to finish in-flight work on shutdown.",
      _number(strict=True)),
    S("server", "monkey_patch", bool, True, "Apply eventlet monkey patching at startup."),
    S("server", "log_level", str, "info", "Log level.",
      _one_of("debug", "info", "warning", "error")),
    S("server", "log_format", str, "text", "Log line format.", _one_of("text", "json")),
    S("server", "max_connections", int, 10000, "Open connections allowed per worker.",
      _at_least(1)),
    S("server", "idle_timeout", float, 300.0,
      "Seconds before closing a silent connection; 0 = off.", _number()),
    S("server", "park_after", float, 2.0,
      "Seconds of silence before an idle connection gives up its green thread; 0 = never.",
      Check("0 or a number >= 0.05", lambda v: v == 0 or v >= 0.05)),
    S("server", "max_pending_replies", int, 1024, "Unsent replies queued per connection.",
      _at_least(1)),
    S("server", "workers", int, 1, "Worker processes; \"auto\" = one per CPU.", _at_least(1),
      parse=_parse_workers, expects="an integer >= 1 or 'auto'"),
    S("server", "worker_timeout", float, 30.0,
      "Seconds a silent worker may live before it is restarted.", _number(strict=True)),
    S("server", "gc_threshold", int, 10000,
      "Allocations between young garbage collections (Python's is 700); 0 = Python's.",
      _at_least(0)),
    S("server", "pid_file", str, None, "Write the master's PID to this file; empty = none.",
      optional=True),
    S("handlers", "timeout", float, 0.0, "Seconds a handler may run; 0 = no limit.", _number()),
    S("handlers", "retries", int, 0, "Times a failed handler is retried.", _at_least(0)),
    S("handlers", "backoff", float, 0.1, "Seconds to wait before retrying a failed handler.",
      _number()),
    S("dead_letters", "path", str, "./evserver-dead-letters",
      "Where events whose handlers failed for good are stored.",
      Check("a non-empty string", bool)),
    S("dead_letters", "fsync_interval", float, 1.0,
      "Seconds between fsyncs of dead letters; 0 = after every write.", _number()),
    S("admin", "enabled", bool, True,
      "Serve the HTTP admin listener (health, stats, metrics, control)."),
    S("admin", "host", str, "127.0.0.1", "Address of the admin listener; keep it private."),
    S("admin", "port", int, 7879, "Port of the admin listener (never shared); 0 picks one.",
      _PORT),
    S("admin", "token", str, None,
      "Bearer token for admin actions; without one they are allowed from loopback only.",
      optional=True),
    S("forward", "enabled", bool, False,
      "Also accept Fluentd Forward Protocol v1 (Fluent Bit, Fluentd, Docker, fluent-logger)."),
    S("forward", "host", str, "127.0.0.1", "Address of the Forward listener (TCP and UDP)."),
    S("forward", "port", int, 24224, "Port of the Forward listener, shared by every worker.",
      _PORT),
    S("forward", "shared_key", str, None,
      "Require the HELO/PING/PONG handshake with this shared key; empty = no handshake.",
      optional=True),
    S("forward", "users", dict, None,
      "Also require a user in the handshake: name:password pairs separated by commas.",
      optional=True, parse=parse_users, expects="name:password pairs separated by commas"),
    S("forward", "tls", bool, False,
      "Serve Forward over TLS with the [tls] certificate (Fluent Bit: tls on)."),
    S("forward", "max_request_bytes", int, 8 << 20,
      "Largest Forward request (one msgpack array), in bytes.", _at_least(1024)),
    S("forward", "max_decompressed_bytes", int, 64 << 20,
      "Largest gzip-decompressed entries of one request, in bytes.", _at_least(1024)),
    S("security", "shared_key", str, None,
      "Shared key (key id \"default\") clients must prove they know; empty = none. The env "
      "var or file is safer than the flag, which other local users can see.", optional=True,
      parse=_shared_key, expects=f"a string of at least {_MIN_KEY} bytes",
      flag_name="--shared-key", env_name="EVSERVER_SHARED_KEY"),
    S("security", "shared_keys", dict, {},
      "Named keys accepted side by side, for rotation: a [security.shared_keys] table of "
      "key_id = \"secret\" (a JSON object in the env var).", parse=_shared_keys,
      expects=f"a table of key id = secret ({_MIN_KEY}+ bytes each)", cli=False),
    S("security", "handshake_timeout", float, 10.0,
      "Seconds a new connection has to finish TLS and authentication.", _number(strict=True)),
    S("security", "insecure", bool, False,
      "Allow a non-loopback host without a shared key or client certificates.",
      flag_name="--insecure"),
    S("security", "debug", bool, False,
      "Send handler tracebacks to clients in error messages; never in production."),
    S("tls", "cert", str, None,
      "PEM certificate (chain) of the event and admin listeners; empty = no TLS.",
      optional=True),
    S("tls", "key", str, None, "PEM private key of the certificate; empty = in the cert file.",
      optional=True),
    S("tls", "ca", str, None, "PEM CA bundle that client certificates are verified against.",
      optional=True),
    S("tls", "require_client_cert", bool, False,
      "Refuse clients without a certificate signed by the CA (mutual TLS)."),
    S("cluster", "enabled", bool, False,
      "Run as one node of a cluster: events go through Redis Streams to the node that owns "
      "their partition (docs/cluster.md)."),
    S("cluster", "url", str, "redis://127.0.0.1:6379/0", "Redis URL of the cluster.",
      Check("a redis:// or rediss:// or unix:// URL",
            lambda v: v.startswith(("redis://", "rediss://", "unix://")))),
    S("cluster", "name", str, "evserver", "Prefix of every Redis key of this cluster.",
      Check("a non-empty string without braces or spaces",
            lambda v: bool(v) and not set(v) & set("{} \t\n"))),
    S("cluster", "partitions", int, 16,
      "Partition streams; stored in Redis, every node must agree.", _at_least(1)),
    S("cluster", "lease", float, 10.0,
      "Seconds a node owns its partitions without renewing; failover takes about this long.",
      _number(0.5)),
    S("cluster", "ack", str, "processed",
      "When a client's ACK is sent: once processed, or once the append is durable in Redis.",
      _one_of("processed", "stored")),
    S("cluster", "max_deliveries", int, 5,
      "Deliveries of an entry before it goes to the dead-letter stream unrun.", _at_least(1)),
)
del S
_BY_NAME: Mapping[str, Setting] = MappingProxyType({s.name: s for s in SETTINGS})
_SECRETS = frozenset({"security.shared_key", "security.shared_keys", "admin.token",
                      "forward.shared_key", "forward.users"})
TABLES: tuple[str, ...] = tuple(dict.fromkeys(s.table for s in SETTINGS))
assert len({s.flag for s in SETTINGS}) == len(SETTINGS), "two settings derive the same CLI flag"


class _Table:
    """Read-only attribute view of one table, so code reads ``cfg.server.port``."""

    __slots__ = ("_name", "_values")
    _name: str
    _values: Mapping[str, Any]

    def __init__(self, name: str, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"no setting {self._name}.{key}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Config is immutable; use Config.replace()")

    def __repr__(self) -> str:
        return f"<{self._name} {dict(self._values)}>"


class Config:
    """Immutable, validated settings; ``source`` is the TOML file used (or None).

    Equality compares values only (not source or origins), which is what tests and reloads want.
    """

    __slots__ = ("_origins", "_tables", "source")
    _origins: Mapping[str, str]
    _tables: Mapping[str, _Table]
    source: Path | None

    def __init__(self, values: Mapping[str, Any], origins: Mapping[str, str],
                 source: Path | None) -> None:
        tables = {t: _Table(t, {s.key: values[s.name] for s in SETTINGS if s.table == t})
                  for t in TABLES}
        object.__setattr__(self, "_tables", MappingProxyType(tables))
        object.__setattr__(self, "_origins", MappingProxyType(dict(origins)))
        object.__setattr__(self, "source", source)

    def __getattr__(self, table: str) -> _Table:
        if table.startswith("_"):  # slots not yet set (copy/pickle): don't recurse
            raise AttributeError(table)
        try:
            return self._tables[table]
        except KeyError:
            raise AttributeError(f"no config table {table!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Config is immutable; use Config.replace()")

    def get(self, table: str, key: str) -> Any:
        return getattr(self.__getattr__(table), key)

    def origin(self, table: str, key: str) -> str:
        """Where a value came from: "default", the file path, the env var or the flag."""
        return self._origins[f"{table}.{key}"]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {t: dict(tab._values) for t, tab in self._tables.items()}

    def replace(self, **overrides: Any) -> Config:
        """A copy with ``**{"server.port": 0}`` applied and validated like CLI overrides."""
        values = {n: self.get(*n.split(".")) for n in _BY_NAME}
        origins = dict(self._origins)
        _apply_overrides(values, origins, overrides)
        _check_together(values, origins)
        return Config(values, origins, self.source)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Config(source={self.source!r}, {self.as_dict()!r})"


assert not set(TABLES) & set(dir(Config)), "a table name would shadow a Config attribute"


def _unknown(kind: str, name: str, known: Any, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{name}: unknown {kind} (from {where}){hint}")


def _set(values: dict[str, Any], origins: dict[str, str], name: str, raw: Any, src: str) -> None:
    setting = _BY_NAME[name]
    try:
        values[name] = setting.convert(raw)
    except (ValueError, TypeError):
        msg = f"{name}: expected {setting.expected}, got {raw!r} (from {src})"
        if name in _SECRETS:
            msg = f"{name}: expected {setting.expected} (the value from {src} is not; hidden)"
        raise ConfigError(msg) from None
    origins[name] = src


def _apply_overrides(values: dict[str, Any], origins: dict[str, str],
                     overrides: Mapping[str, Any]) -> None:
    for name, raw in overrides.items():
        if name not in _BY_NAME:
            raise _unknown("setting", name, _BY_NAME, "overrides")
        if raw is not None:
            _set(values, origins, name, raw, _BY_NAME[name].flag)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


def default_config() -> Config:
    """Every setting at its default, nothing read from files or the environment."""
    values = {s.name: s.default for s in SETTINGS}
    return Config(values, dict.fromkeys(values, "default"), None)


def handler_defaults(cfg: Config) -> dict[str, Any]:
    """The ``[handlers]`` table as the options every handler starts from (its own options
    override them): the one place that turns the table into handler options."""
    h = cfg.handlers
    return {"timeout": h.timeout, "retries": h.retries, "backoff": h.backoff, "blocking": False}


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a Config: defaults < TOML file < ``EVSERVER_*`` env < ``overrides`` (None = unset).

    With no ``path``, ``config/evserver.toml`` under the cwd is used if it exists. Unknown
    tables, keys and ``EVSERVER_<TABLE>_*`` variables are errors rather than silently ignored,
    since a typo there would otherwise leave a production setting at its default.
    """
    values = {s.name: s.default for s in SETTINGS}
    origins = dict.fromkeys(values, "default")
    source = Path(path) if path is not None else None
    if source is None and DEFAULT_PATH.is_file():
        source = DEFAULT_PATH.absolute()
    for table, entries in (_read_file(source) if source else {}).items():
        if table not in TABLES:
            raise _unknown("table", table, TABLES, str(source))
        if not isinstance(entries, dict):
            raise ConfigError(f"{table}: expected a table, got {entries!r} (from {source})")
        for key, raw in entries.items():
            if f"{table}.{key}" not in _BY_NAME:
                raise _unknown("setting", f"{table}.{key}", _BY_NAME, str(source))
            _set(values, origins, f"{table}.{key}", raw, str(source))
    env_names = {s.env_var: s.name for s in SETTINGS}
    prefixes = [f"{ENV_PREFIX}{t.upper()}_" for t in TABLES]
    for var, raw in sorted((os.environ if env is None else env).items()):
        if var in env_names:
            _set(values, origins, env_names[var], raw, var)
        elif any(var.startswith(p) for p in prefixes) and var not in ADMIN_CLIENT_ENV:
            raise _unknown("environment variable", var, env_names, "environment")
    _apply_overrides(values, origins, overrides or {})
    _check_together(values, origins)
    return Config(values, origins, source)


def describe_sources(cfg: Config) -> str:
    """Where ``cfg``'s values came from, in one phrase for the startup log and ``check``."""
    origins = set(cfg._origins.values())
    env = sorted(o for o in origins if o.startswith(ENV_PREFIX))
    flags = sorted(o for o in origins if o.startswith("--"))
    parts = [f"config file {cfg.source}" if cfg.source is not None
             else f"no config file ({DEFAULT_PATH} not in {Path.cwd()})"]
    if env:
        parts.append("environment " + ", ".join(env))
    if flags:
        parts.append("flags " + ", ".join(flags))
    return "; ".join(parts)


_MASK = "********"


def effective_settings(cfg: Config) -> list[tuple[str, Any, str]]:
    """Every setting as (name, value, source), with secrets masked (a table of secrets keeps
    its key ids), for ``evserver config``."""
    rows = []
    for s in SETTINGS:
        value = cfg.get(s.table, s.key)
        if s.name in _SECRETS and value:
            value = dict.fromkeys(value, _MASK) if isinstance(value, dict) else _MASK
        rows.append((s.name, value, cfg.origin(s.table, s.key)))
    return rows


# Settings that only make sense with another one: (setting, needs, why).
_NEEDS = (
    ("forward.users", "forward.shared_key", "a user handshake needs a shared key too"),
    ("forward.tls", "tls.cert", "TLS needs a certificate"),
    ("cluster.enabled", "server.monkey_patch", "the Redis client must not block the hub"),
)


def _check_together(values: dict[str, Any], origins: dict[str, str]) -> None:
    for name, needed, why in _NEEDS:
        if values[name] and not values[needed]:
            raise ConfigError(f"{name}: {why} ({needed}); {name} came from {origins[name]}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps("" if value is None else value)  # JSON strings/numbers are valid TOML


def render_default_toml() -> str:
    """The text of ``config/evserver.toml``; a test keeps the checked-in file identical."""
    lines = ["# evserver configuration. Every key is listed, commented out, with its default.",
             "# Precedence: defaults < this file < EVSERVER_<TABLE>_<KEY> env vars < CLI flags.",
             "# Regenerate with: python -m evserver.config > config/evserver.toml"]
    for table in TABLES:
        lines += ["", f"[{table}]"]
        for s in (s for s in SETTINGS if s.table == table):
            lines += [f"# {s.help}", f"# Accepts {s.expected}; env {s.env_var}, flag {s.flag}.",
                      f"# {s.key} = {_toml_value(s.default)}", ""]
        lines.pop()
    return "\n".join(lines) + "\n"


def settings_table_markdown() -> str:
    """A Markdown table of every setting, for the README."""
    rows = ["| Setting | Env var | Default | Description |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "*none*" if s.default is None else f"`{_toml_value(s.default)}`"
        text = f"{s.help} Accepts {s.expected}.".replace("|", "\\|")
        rows.append(f"| `{s.name}` | `{s.env_var}` | {default} | {text} |")
    return "\n".join(rows) + "\n"


def click_options(func: _F) -> _F:
    """Add one click option per setting, derived from SETTINGS, to a command.

    Options default to None (= not given, so file and env still apply) and reach the command
    collected in one ``overrides`` keyword argument, ready for ``load_config(overrides=...)``.
    """
    import click  # only the CLI needs it; keeps `import evserver.config` light

    dests = {s.name: s.name.replace(".", "__") for s in SETTINGS if s.cli}

    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        overrides = {name: kwargs.pop(dest) for name, dest in dests.items()}
        return func(*args, overrides=overrides, **kwargs)

    for s in reversed(SETTINGS):
        if not s.cli:
            continue
        flag = f"{s.flag}/--no-{s.flag[2:]}" if s.type is bool else s.flag
        kind = {bool: click.BOOL, int: click.INT, float: click.FLOAT}.get(s.type)
        kind = kind if s.parse is None else None
        command = click.option(flag, dests[s.name], type=kind or click.STRING, default=None,
                               help=s.cli_help())(command)
    return cast(_F, command)


_USAGE = """usage: python -m evserver.config [--markdown]

Print the default config/evserver.toml (every setting, commented out, with its default),
or with --markdown the settings table of the README. `evserver config` prints the settings
in effect instead."""

if __name__ == "__main__":
    import sys

    if sys.argv[1:] not in ([], ["--markdown"]):
        print(_USAGE, file=sys.stdout if sys.argv[1:] in (["-h"], ["--help"]) else sys.stderr)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    print(settings_table_markdown() if sys.argv[1:] == ["--markdown"] else render_default_toml(),
          end="")
