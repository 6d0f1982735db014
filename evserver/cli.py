"""The ``evserver`` command line: thin click commands over the library.

Exit codes are a contract (click's): 0 success, 1 runtime failure (server unreachable,
remote error), 2 usage or configuration error.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any

import click

from . import __version__
from .config import ConfigError, click_options, load_config

log = logging.getLogger("evserver")


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"evserver: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="evserver")
def main() -> None:
    """evserver: a greenlet-based concurrent event server.

    Serve an app with `evserver serve module:app`; send events with `evserver send`,
    `evserver request` and `evserver ping`.
    """


@main.command()
@click.argument("app_spec", metavar="APP")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML config file [default: config/evserver.toml if present].")
@click_options
def serve(app_spec: str, config_path: str | None, overrides: dict[str, Any]) -> None:
    """Serve APP (`module:attr` or `path/to/file.py:attr`) until SIGTERM/SIGINT.

    With --workers N (N > 1 or "auto") a master supervises N worker processes; see
    docs/workers.md for its signals (HUP reloads, TTIN/TTOU add/remove a worker).

    Settings come from defaults < config file < EVSERVER_<TABLE>_<KEY> environment
    variables < these flags.
    """
    try:
        cfg = load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc), 2)
    from .logs import configure_logging

    configure_logging(cfg.server.log_level, cfg.server.log_format)
    if cfg.server.workers > 1:
        from .supervisor import run_supervisor

        sys.exit(run_supervisor(app_spec, cfg, config_path=config_path, overrides=overrides))
    from .runner import run_single

    sys.exit(run_single(app_spec, cfg))


# ---------------------------------------------------------------------- client commands

_CLI_RETRIES = 2  # a person at a shell wants a quick answer, not a minute of backoff


class _Json(click.ParamType):
    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError as exc:
            self.fail(f"not valid JSON ({exc}): {value!r}", param, ctx)


def _meta(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    pairs = [v.partition("=") for v in values]
    bad = [v for v, (_, eq, _) in zip(values, pairs, strict=True) if not eq]
    if bad:
        raise click.BadParameter(f"expected KEY=VALUE, got {bad[0]!r}")
    return {key: value for key, _, value in pairs}


def _client_command(func: Any) -> Any:
    """The options every client command shares, and one way of reporting failures."""
    from .errors import ClientConnectionError, RemoteError

    @functools.wraps(func)
    def command(host: str, port: int, timeout: float, **kwargs: Any) -> None:
        from .client import Client

        try:
            with Client(host, port, timeout, retries=_CLI_RETRIES) as client:
                func(client, **kwargs)
        except RemoteError as exc:
            _fail(f"remote error: {exc.type}: {exc.message}")
        except (ClientConnectionError, TimeoutError, ValueError) as exc:
            _fail(str(exc))

    for decorator in reversed((
        click.option("--host", envvar="EVSERVER_HOST", default="127.0.0.1", show_default=True,
                     help="Server address [env EVSERVER_HOST]."),
        click.option("--port", envvar="EVSERVER_PORT", type=int, default=7878,
                     show_default=True, help="Server port [env EVSERVER_PORT]."),
        click.option("--timeout", type=float, default=10.0, show_default=True,
                     help="Seconds to wait for the server."),
    )):
        command = decorator(command)
    return command


_type_arg = click.argument("type")
_data_arg = click.argument("data", type=_Json(), required=False, metavar="[JSON]")
_meta_opt = click.option("--meta", multiple=True, metavar="KEY=VALUE", callback=_meta,
                         help="Event metadata; repeatable.")


@main.command()
@_type_arg
@_data_arg
@click.option("--ack", is_flag=True, help="Wait until the event was processed.")
@_meta_opt
@_client_command
def send(client: Any, type: str, data: Any, ack: bool, meta: dict[str, str]) -> None:
    """Send one event of TYPE with JSON data (default null); print its id with --ack."""
    event_id = client.send(type, data, meta=meta, ack=ack)
    if ack:
        click.echo(event_id)


@main.command()
@_type_arg
@_data_arg
@_meta_opt
@_client_command
def request(client: Any, type: str, data: Any, meta: dict[str, str]) -> None:
    """Send a request of TYPE with JSON data (default null); print the reply as JSON."""
    click.echo(json.dumps(client.request(type, data, meta=meta), default=_jsonable))


@main.command()
@_client_command
def ping(client: Any) -> None:
    """Measure one round trip to the server."""
    rtt = client.ping()
    click.echo(f"pong from {client.address} in {rtt * 1000:.2f} ms")


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect and replay events whose handlers failed after their retries."""


def _store(config_path: str | None) -> Any:
    from .deadletters import DeadLetterStore

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc), 2)
    return DeadLetterStore(cfg.dead_letters.path, fsync_interval=cfg.dead_letters.fsync_interval)


_config_opt = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                           help="The config file `serve` uses (for [dead_letters] path).")
_pattern_opt = click.option("--type", "pattern", metavar="PATTERN",
                            help="Only event types matching PATTERN (`*`, `**` allowed).")


@dead_letters.command("list")
@_config_opt
@_pattern_opt
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dead_letters_list(config_path: str | None, pattern: str | None, as_json: bool) -> None:
    """List stored dead letters, oldest first."""
    import dataclasses
    import time

    for record in _store(config_path).read(pattern):
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(record), default=_jsonable))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.failed_at))
        click.echo(f"{when}  {record.event_type}  {record.event_id}  {record.handler}  "
                   f"{record.error_type}: {record.message} ({record.attempts} attempts)")


@dead_letters.command("replay")
@_config_opt
@_pattern_opt
@_client_command
def dead_letters_replay(client: Any, config_path: str | None, pattern: str | None) -> None:
    """Re-send dead letters with ack=True (same event ids); remove those acknowledged."""
    from .errors import RemoteError

    store = _store(config_path)
    acked: list[str] = []
    failed = 0
    try:
        for record in store.read(pattern):
            try:
                client.send(record.event_type, record.data, meta=record.meta, ack=True,
                            id=record.event_id)
                acked.append(record.event_id)
            except RemoteError:
                failed += 1
    finally:
        store.remove(acked)  # even when interrupted: what was acked must not be replayed
    click.echo(f"replayed {len(acked)}, failed {failed}")
    if failed:
        sys.exit(1)


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run scripts/bench.py (needs a source checkout); `evserver bench --help` for options."""
    import runpy
    from pathlib import Path

    candidates = [Path.cwd() / "scripts" / "bench.py",
                  Path(__file__).resolve().parent.parent / "scripts" / "bench.py"]
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        _fail("evserver bench runs scripts/bench.py from a source checkout; none found here")
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


def _jsonable(value: Any) -> Any:
    """msgpack has bin and ext types JSON lacks: show bytes as text, the rest as repr."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


if __name__ == "__main__":
    main()
