"""The ``evserver`` command line: thin click commands over the library.

Exit codes are a contract (click's): 0 success, 1 runtime failure (server unreachable,
remote error), 2 usage or configuration error.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .cli_admin import COMMANDS as ADMIN_COMMANDS
from .cli_base import fail as _fail
from .cli_base import print_json as _print_json
from .config import (
    ConfigError,
    click_options,
    describe_sources,
    effective_settings,
    load_config,
)

log = logging.getLogger("evserver")




@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="evserver")
def main() -> None:
    """evserver: a greenlet-based concurrent event server.

    Serve an app with `evserver serve module:app`; send events with `evserver send`,
    `evserver request` and `evserver ping`; watch and control a running server through its
    admin listener with `stats`, `workers`, `handlers`, `top`, `tail`, `reload`, `scale` and
    `stop`.
    """


for _command in ADMIN_COMMANDS:
    main.add_command(_command)

_serve_config_opt = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                                 help="TOML config file [default: config/evserver.toml if "
                                      "present].")


def _checked_config(config_path: str | None, overrides: dict[str, Any]) -> Any:
    """The settings ``serve`` would run with, or exit 2 saying what is wrong with them."""
    try:
        cfg = load_config(config_path, overrides=overrides)
        from .security import exposure_problem

        problem = exposure_problem(cfg)  # before anything binds: nothing is ever exposed
    except ConfigError as exc:
        _fail(str(exc), 2)
    if problem:
        _fail(problem, 2)
    try:
        from .tls import context_from_config

        context_from_config(cfg.tls)  # bad files: a clear error, not a traceback
    except (OSError, ValueError) as exc:
        _fail(f"cannot use the [tls] certificate/key: {exc}", 2)
    return cfg


def _log_startup(cfg: Any) -> None:
    """What an operator needs to know before the first event: which code, which settings
    (a ``config/evserver.toml`` in the cwd is read silently otherwise), how many workers.
    The listeners log their own bound addresses as they bind."""
    import platform

    from .logs import plural

    log.info("evserver %s (Python %s, pid %d), %s", __version__,
             platform.python_version(), os.getpid(), describe_sources(cfg))
    srv = cfg.server
    log.info("%s, pool %d and queue %d per worker; [forward] %s, [admin] %s",
             plural(srv.workers, "worker"), srv.pool_size, srv.queue_size,
             f"{cfg.forward.host}:{cfg.forward.port}" if cfg.forward.enabled else "off",
             f"{cfg.admin.host}:{cfg.admin.port}" if cfg.admin.enabled else "off")
    if cfg.security.debug:
        log.warning("[security] debug is on: clients receive handler tracebacks in error "
                    "messages; never use it in production")


@main.command()
@click.argument("app_spec", metavar="APP")
@_serve_config_opt
@click_options
def serve(app_spec: str, config_path: str | None, overrides: dict[str, Any]) -> None:
    """Serve APP (`module:attr` or `path/to/file.py:attr`) until SIGTERM/SIGINT.

    With --workers N (N > 1 or "auto") a master supervises N worker processes; see
    docs/workers.md for its signals (HUP reloads, TTIN/TTOU add/remove a worker).

    Settings come from defaults < config file < EVSERVER_<TABLE>_<KEY> environment
    variables < these flags.
    """
    cfg = _checked_config(config_path, overrides)
    from .logs import configure_logging

    configure_logging(cfg.server.log_level, cfg.server.log_format)
    _log_startup(cfg)
    if cfg.server.workers > 1:
        from .supervisor import run_supervisor

        sys.exit(run_supervisor(app_spec, cfg, config_path=config_path, overrides=overrides))
    from .runner import run_single

    sys.exit(run_single(app_spec, cfg))


@main.command()
@click.argument("app_spec", metavar="APP")
@_serve_config_opt
@click_options
def check(app_spec: str, config_path: str | None, overrides: dict[str, Any]) -> None:
    """Check what `serve APP` would run, without serving: the settings, then the app.

    Validates the config (the same layers and flags as `serve`), imports APP and lists its
    routes. Exit 0 when all is well, 2 for a bad config, 4 when the app cannot be imported.
    """
    from .admin import describe_handlers
    from .config import handler_defaults
    from .console import format_handlers
    from .contract import EXIT_APP_LOAD_ERROR
    from .loader import AppLoadError, load_app

    cfg = _checked_config(config_path, overrides)
    click.echo(f"config ok: {describe_sources(cfg)}")
    try:
        app = load_app(app_spec)
    except AppLoadError as exc:
        click.echo(f"evserver: {exc}" + (f"\n{exc.details}" if exc.details else ""), err=True)
        sys.exit(EXIT_APP_LOAD_ERROR)
    routes = describe_handlers(app, handler_defaults(cfg))
    click.echo(f"app ok: {app_spec}, {len(routes)} handler(s)")
    if routes:
        click.echo(format_handlers(routes))


@main.command("config")
@_serve_config_opt
@click.option("--json", "as_json", is_flag=True, help="One JSON object: setting -> value, "
                                                      "source.")
@click_options
def show_config(config_path: str | None, as_json: bool, overrides: dict[str, Any]) -> None:
    """Print the effective settings `serve` would use and where each comes from.

    Secrets (keys, tokens, passwords) are masked. Takes the same --config, environment and
    flags as `serve`.
    """
    try:
        cfg = load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc), 2)
    rows = effective_settings(cfg)
    if as_json:
        _print_json({name: {"value": value, "source": source} for name, value, source in rows})
        return
    from .console import table

    click.echo(table(["SETTING", "VALUE", "SOURCE"],
                     [[name, json.dumps(value), source] for name, value, source in rows]))


# ---------------------------------------------------------------------- client commands

_CLI_RETRIES = 2  # a person at a shell wants a quick answer, not a minute of backoff


class _Json(click.ParamType):
    """JSON text, or ``-`` (read it from stdin) or ``@FILE`` (read it from FILE): one
    command-line argument cannot exceed the OS limit of about 128 KiB, a frame can."""

    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        text, source = value, ""
        try:
            if value == "-":
                text, source = sys.stdin.read(), " (from stdin)"
            elif value.startswith("@"):
                text, source = Path(value[1:]).read_text(), f" (from {value[1:]})"
        except (OSError, UnicodeDecodeError) as exc:
            self.fail(f"cannot read {value[1:]}: {getattr(exc, 'strerror', None) or exc}",
                      param, ctx)
        try:
            return json.loads(text)
        except ValueError as exc:
            shown = repr(text) if len(text) <= 200 else f"{text[:200]!r}..."
            self.fail(f"not valid JSON{source} ({exc}): {shown}", param, ctx)


def _meta(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    pairs = [v.partition("=") for v in values]
    bad = [v for v, (_, eq, _) in zip(values, pairs, strict=True) if not eq]
    if bad:
        raise click.BadParameter(f"expected KEY=VALUE, got {bad[0]!r}")
    return {key: value for key, _, value in pairs}


def _connect_options(cfg: Any, host: str | None, port: int | None, shared_key: str | None,
                     key_id: str | None, tls: bool, tls_ca: str | None) -> dict[str, Any]:
    """Where and how to connect: the flags first, then the settings ``serve`` would use.

    A server told to listen on every address (``0.0.0.0``, ``::``) is reached on loopback.
    The key comes from ``[security] shared_key``, else (for rotation) the named key of
    ``--key-id``, else the last of ``[security.shared_keys]``; TLS and its CA from ``[tls]``.
    """
    srv, sec = cfg.server, cfg.security
    host = host or {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(srv.host, srv.host)
    if shared_key is None and key_id is not None and key_id in sec.shared_keys:
        shared_key = sec.shared_keys[key_id]
    elif shared_key is None and sec.shared_key:
        shared_key = sec.shared_key
    elif shared_key is None and sec.shared_keys:
        key_id, shared_key = list(sec.shared_keys.items())[-1]
    tls = tls or bool(cfg.tls.cert)
    return dict(host=host, port=srv.port if port is None else port, shared_key=shared_key,
                key_id=key_id, tls=tls, cafile=tls_ca or (cfg.tls.ca if tls else None))


def _client_command(func: Any = None, *, config_path_to_func: bool = False) -> Any:
    """The options every client command shares, and one way of reporting failures.

    Client commands read the same settings as ``serve`` (``--config`` or
    ``config/evserver.toml``, then ``EVSERVER_*`` variables, then these flags), so a server
    configured on another port or with a key is reached without repeating it on every call.
    """
    if func is None:
        return functools.partial(_client_command, config_path_to_func=config_path_to_func)
    from .errors import ClientConnectionError, RemoteError

    @functools.wraps(func)
    def command(host: str | None, port: int | None, timeout: float, shared_key: str | None,
                key_id: str | None, tls: bool, tls_ca: str | None, tls_cert: str | None,
                tls_key: str | None, config_path: str | None, **kwargs: Any) -> None:
        from .client import Client
        from .errors import AuthError

        try:
            cfg = load_config(config_path)
        except ConfigError as exc:
            _fail(str(exc), 2)
        options = _connect_options(cfg, host, port, shared_key or None, key_id, tls, tls_ca)
        if config_path_to_func:
            kwargs["config_path"] = config_path
        try:
            with Client(timeout=timeout, retries=_CLI_RETRIES, certfile=tls_cert,
                        keyfile=tls_key, **options) as client:
                func(client, **kwargs)
        except RemoteError as exc:
            _fail(f"remote error: {exc.type}: {exc.message}")
        except AuthError as exc:
            _fail(f"authentication failed: {exc}")
        except (ClientConnectionError, TimeoutError, ValueError, OSError) as exc:
            _fail(str(exc))

    for decorator in reversed((
        click.option("--host", envvar="EVSERVER_HOST", default=None,
                     help="Server address [env EVSERVER_HOST; default: [server] host of the "
                          "config, 127.0.0.1]."),
        click.option("--port", envvar="EVSERVER_PORT", type=int, default=None,
                     help="Server port [env EVSERVER_PORT; default: [server] port of the "
                          "config, 7878]."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     show_default=True, help="Seconds to wait for the server (> 0)."),
        click.option("--shared-key", envvar="EVSERVER_SHARED_KEY", default=None,
                     help="Authenticate with this shared key [env EVSERVER_SHARED_KEY; "
                          "default: [security] of the config; the env var keeps it out of "
                          "the process list]."),
        click.option("--key-id", envvar="EVSERVER_KEY_ID", default=None,
                     help="Which of the server's keys it is [env EVSERVER_KEY_ID; default: "
                          "the server tries them all]."),
        click.option("--tls", is_flag=True, help="Connect with TLS (implied by --tls-ca/"
                                                  "--tls-cert and by [tls] cert)."),
        click.option("--tls-ca", type=click.Path(dir_okay=False), default=None,
                     help="CA bundle to verify the server with [default: [tls] ca of the "
                          "config, else the system store]."),
        click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
                     help="Client certificate, for servers that require one."),
        click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
                     help="Private key of --tls-cert [default: in the cert file]."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="The config file `serve` uses [default: config/evserver.toml if "
                          "present]."),
    )):
        command = decorator(command)
    return command


def _event_type(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse a TYPE the server would refuse as a usage error (exit 2), before connecting."""
    from .event import type_problem

    if (problem := type_problem(value)) is not None:
        raise click.BadParameter(f"an event type {problem}")
    return value


_type_arg = click.argument("type", callback=_event_type)
_data_arg = click.argument("data", type=_Json(), required=False, metavar="[JSON|-|@FILE]")
_meta_opt = click.option("--meta", multiple=True, metavar="KEY=VALUE", callback=_meta,
                         help="Event metadata; repeatable.")


@main.command()
@_type_arg
@_data_arg
@click.option("--ack", is_flag=True, help="Wait until the event was processed.")
@_meta_opt
@_client_command
def send(client: Any, type: str, data: Any, ack: bool, meta: dict[str, str]) -> None:
    """Send one event of TYPE with JSON data (default null); print its id with --ack.

    The data is JSON text, `-` to read it from stdin or `@FILE` to read it from FILE (for
    payloads beyond the ~128 KiB an argument may hold; up to the server's max_frame_bytes).
    """
    event_id = client.send(type, data, meta=meta, ack=ack)
    if ack:
        click.echo(event_id)


@main.command()
@_type_arg
@_data_arg
@_meta_opt
@_client_command
def request(client: Any, type: str, data: Any, meta: dict[str, str]) -> None:
    """Send a request of TYPE with JSON data (default null); print the reply as JSON.

    The data is JSON text, `-` to read it from stdin or `@FILE` to read it from FILE (for
    payloads beyond the ~128 KiB an argument may hold; up to the server's max_frame_bytes).
    """
    click.echo(json.dumps(client.request(type, data, meta=meta), default=_jsonable))


@main.command()
@_client_command
def ping(client: Any) -> None:
    """Measure one round trip to the server."""
    rtt = client.ping()
    click.echo(f"pong from {client.address} in {rtt * 1000:.2f} ms")


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect and replay events whose handlers failed after their retries.

    Both commands read `[dead_letters] path` from the same --config (and EVSERVER_* env)
    as `serve`, so they see the files the server wrote; in cluster mode (`[cluster]
    enabled`) they use the cluster's dead-letter stream in Redis instead.
    """


def _store(config_path: str | None) -> Any:
    from .deadletters import DeadLetterStore

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc), 2)
    if cfg.cluster.enabled:  # every node's dead letters are in the cluster's stream
        from redis import RedisError

        from .cluster.deadletters import open_stream

        stream = open_stream(cfg.cluster.url, cfg.cluster.name)
        try:
            stream.count()
        except RedisError as exc:
            _fail(f"cannot reach the cluster's Redis at {cfg.cluster.url}: {exc}")
        return stream
    return DeadLetterStore(cfg.dead_letters.path, fsync_interval=cfg.dead_letters.fsync_interval)


def _pattern(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Reject a bad --type pattern as a usage error (exit 2) before touching any file."""
    from .app import compile_pattern
    from .errors import RegistrationError

    if value is not None:
        try:
            compile_pattern(value)
        except RegistrationError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


_config_opt = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                           help="The config file `serve` uses (for [dead_letters] path).")
_pattern_opt = click.option("--type", "pattern", metavar="PATTERN", callback=_pattern,
                            help="Only event types matching PATTERN (exact, `*`, `**`).")


@dead_letters.command("list")
@_config_opt
@_pattern_opt
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dead_letters_list(config_path: str | None, pattern: str | None, as_json: bool) -> None:
    """List stored dead letters, oldest failure first."""
    import time

    from .console import table

    store = _store(config_path)
    rows = []
    for record in store.read(pattern):
        if as_json:
            click.echo(json.dumps(record.as_dict(), default=_jsonable))
            continue
        error = f"{record.error_type}: {record.message}".splitlines()[0]
        rows.append([time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.failed_at)),
                     record.event_type, record.event_id, f"{record.kind} {record.handler}",
                     record.attempts, error[:100]])
    if as_json:
        return
    if not rows:
        click.echo(f"no dead letters in {store.dir}", err=True)
        return
    click.echo(table(["TIME", "TYPE", "ID", "HANDLER", "ATTEMPTS", "ERROR"], rows))


@dead_letters.command("replay")
@_pattern_opt
@_client_command(config_path_to_func=True)
def dead_letters_replay(client: Any, config_path: str | None, pattern: str | None) -> None:
    """Re-send dead letters with ack=True under their own event ids; remove the acked ones.

    An event dead-lettered by several handlers is sent once: it runs all its handlers
    again. Exit 1 if any was not acknowledged (those stay stored).
    """
    from .errors import RemoteError

    store = _store(config_path)
    events: dict[str, Any] = {}
    for record in store.read(pattern):
        events.setdefault(record.event_id, record)
    acked: list[str] = []
    failed = 0
    try:
        for record in events.values():
            try:
                client.send(record.event_type, record.data, meta=record.meta, ack=True,
                            id=record.event_id)
                acked.append(record.event_id)
            except RemoteError as exc:
                failed += 1
                click.echo(f"{record.event_id} ({record.event_type}): {exc}", err=True)
    finally:
        store.remove(acked)  # even when interrupted: what was acked must not be replayed
    click.echo(f"replayed {len(acked)}, failed {failed}")
    if failed:
        sys.exit(1)


@main.group("cluster")
def cluster() -> None:
    """Inspect a cluster of nodes sharing Redis Streams (docs/cluster.md)."""


@cluster.command("status")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="The config file `serve` uses (for its [cluster] table).")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@click_options
def cluster_status(config_path: str | None, as_json: bool, overrides: dict[str, Any]) -> None:
    """Live nodes, and per partition its owner, lag (not yet delivered) and pending
    (delivered, not yet acknowledged) entries. Same config rules as `serve`."""
    try:
        cfg = load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc), 2)
    if not cfg.cluster.enabled:
        _fail("cluster mode is off: set [cluster] enabled = true (or EVSERVER_CLUSTER_ENABLED)",
              2)
    import redis

    from .cluster.status import format_status, gather

    client = redis.Redis.from_url(cfg.cluster.url, socket_timeout=10, socket_connect_timeout=5)
    try:
        doc = gather(client, cfg.cluster.name, cfg.cluster.partitions)
    except redis.RedisError as exc:
        _fail(f"cannot reach the cluster's Redis at {cfg.cluster.url}: {exc}")
    _print_json(doc) if as_json else click.echo(format_status(doc))


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run scripts/bench.py (needs a source checkout); `evserver bench --help` for options.

    `evserver bench --cluster` runs scripts/bench_cluster.py instead: 1 node against 2 nodes
    of a cluster on a redis-server it starts (`evserver bench --cluster --help`)."""
    import runpy

    name = "bench_cluster.py" if "--cluster" in args else "bench.py"
    candidates = [Path.cwd() / "scripts" / name,
                  Path(__file__).resolve().parent.parent / "scripts" / name]
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        _fail(f"evserver bench runs scripts/{name} from a source checkout; none found here")
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


@main.command()
@click.option("--duration", type=click.FloatRange(min=10), default=600.0, show_default=True,
              help="Seconds of load and faults.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seeds the fault schedule and the load: the same seed, the same plan.")
@click.option("--workers", type=click.IntRange(min=2), default=2, show_default=True,
              help="Worker processes of the server under test (a master supervises them).")
@click.option("--rate-scale", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Multiply every fault rate (0: the warm-up's faults only).")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="Work in this directory and keep it (records, logs, soak.json).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, not a table.")
def soak(duration: float, seed: int, workers: int, rate_scale: float, keep: str | None,
         as_json: bool) -> None:
    """Serve a soak app with --workers N under mixed load and seeded faults; print figures.

    Exits 1 when a check fails (acknowledged events lost, order violated, RSS growth, fds,
    replacements); docs/reliability.md explains every figure.
    """
    from pathlib import Path

    from .soak.run import soak as run_soak
    from .soak.run import table

    doc = run_soak(duration, seed, workers, rate_scale=rate_scale,
                   keep=Path(keep) if keep else None)
    click.echo(json.dumps(doc) if as_json else table(doc))
    if not doc["passed"]:
        sys.exit(1)


def _jsonable(value: Any) -> Any:
    """msgpack has bin and ext types JSON lacks: show bytes as text, the rest as repr."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


if __name__ == "__main__":
    main()
