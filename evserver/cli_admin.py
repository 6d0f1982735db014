"""The admin commands (``stats``, ``workers``, ``handlers``, ``top``, ``tail``, ``reload``,
``stop``, ``scale``): thin clients of a running server's admin listener.

An unreachable server or a refused token is one line on stderr and exit code 1.
"""

from __future__ import annotations

import os
from typing import Any

import click

from .cli_base import fail as _fail
from .cli_base import print_json as _print_json
from .config import ConfigError, load_config


def admin_target(func: Any) -> Any:
    """--admin URL and --token: which admin listener to talk to, for every admin command."""
    func = click.option("--token", envvar="EVSERVER_ADMIN_TOKEN", default=None,
                        help="Admin bearer token [env EVSERVER_ADMIN_TOKEN; default: "
                             "[admin] token].")(func)
    return click.option("--admin", "admin_url", metavar="URL", default=None,
                        help="Admin listener URL [default: http://<[admin] host>:<[admin] "
                             "port> from the config, http://127.0.0.1:7879].")(func)


def admin_options(func: Any) -> Any:
    """``admin_target`` and --json, for the commands that print one answer."""
    func = click.option("--json", "as_json", is_flag=True,
                        help="Print the server's JSON answer instead of a table.")(func)
    return admin_target(func)


def _client(admin_url: str | None, token: str | None) -> Any:
    from .console import AdminClient

    try:
        cfg = load_config()
    except ConfigError as exc:
        if admin_url is None or token is None:
            _fail(str(exc), 2)
        cfg = None
    if cfg is not None:
        scheme = "https" if cfg.tls.cert else "http"  # the admin port shares [tls]
        admin_url = admin_url or f"{scheme}://{cfg.admin.host}:{cfg.admin.port}"
        token = token or cfg.admin.token
    assert admin_url is not None
    context = None
    if admin_url.startswith("https://"):
        from .tls import client_context

        ca = os.environ.get("EVSERVER_ADMIN_CA") or (cfg.tls.ca if cfg is not None else None)
        # A client certificate, for a server whose [tls] require_client_cert covers admin too.
        context = client_context(ca, os.environ.get("EVSERVER_ADMIN_CERT") or None,
                                 os.environ.get("EVSERVER_ADMIN_KEY") or None)
    return AdminClient(admin_url, token, ssl_context=context)


def _admin(func: Any) -> Any:
    """Turn an AdminFailure into one line on stderr and exit code 1."""
    import functools

    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        from .errors import AdminFailure

        try:
            return func(*args, **kwargs)
        except AdminFailure as exc:
            _fail(str(exc))

    return command




@click.command()
@admin_options
@_admin
def stats(admin_url: str | None, token: str | None, as_json: bool) -> None:
    """Counters per worker and per event type, with handler latency percentiles."""
    from .console import format_stats

    doc = _client(admin_url, token).call("GET", "/stats")
    _print_json(doc) if as_json else click.echo(format_stats(doc))


@click.command()
@click.option("--interval", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds between the two samples events/s is measured over; 0 = the "
                   "lifetime average.")
@admin_options
@_admin
def workers(interval: float, admin_url: str | None, token: str | None, as_json: bool) -> None:
    """Worker processes: pid, uptime, connections, events and events/s."""
    import time

    from .console import format_workers, worker_rates

    client = _client(admin_url, token)
    before = client.call("GET", "/stats") if interval else None
    start = time.monotonic()
    if interval:
        time.sleep(interval)  # the measuring window of events/s
    after = client.call("GET", "/stats")
    rates = worker_rates(before, after, time.monotonic() - start)
    if as_json:
        _print_json([{"pid": w["pid"], "uptime": w["uptime"], "connections": w["connections"],
                      "events": w["events_out"], "events_per_second": rates[w["pid"]]}
                     for w in after["workers"]])
    else:
        click.echo(format_workers(after, rates))


@click.command()
@admin_options
@_admin
def handlers(admin_url: str | None, token: str | None, as_json: bool) -> None:
    """Registered processors and listeners with their patterns and options."""
    from .console import format_handlers

    doc = _client(admin_url, token).call("GET", "/handlers")
    _print_json(doc) if as_json else click.echo(format_handlers(doc["handlers"]))


@click.command()
@admin_options
@_admin
def reload(admin_url: str | None, token: str | None, as_json: bool) -> None:
    """Zero-downtime reload (like SIGHUP to the master): new config, app and workers."""
    doc = _client(admin_url, token).call("POST", "/reload")
    _print_json(doc) if as_json else click.echo(
        f"reloading: generation {doc['generation']} is starting")


@click.command()
@click.option("--now", is_flag=True, help="Do not drain: stop immediately (like SIGQUIT).")
@admin_options
@_admin
def stop(now: bool, admin_url: str | None, token: str | None, as_json: bool) -> None:
    """Stop the server: gracefully (drain in-flight events) unless --now."""
    doc = _client(admin_url, token).call("POST", "/stop", now=1 if now else None)
    _print_json(doc) if as_json else click.echo(f"stopping ({doc['stopping']}): "
                                                f"pid {doc['pid']}")


@click.command()
@click.argument("n", type=click.IntRange(min=1))
@admin_options
@_admin
def scale(n: int, admin_url: str | None, token: str | None, as_json: bool) -> None:
    """Run N worker processes (multi-worker mode; a reload resets it to the config's)."""
    doc = _client(admin_url, token).call("POST", "/workers", n=n)
    _print_json(doc) if as_json else click.echo(f"workers: {doc['previous']} -> {doc['workers']}")


@click.command()
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Quit after this many screens.")
@admin_target
@_admin
def top(interval: float, iterations: int | None, admin_url: str | None,
        token: str | None) -> None:
    """A live view of rates, latencies and errors; q or Ctrl-C quits."""
    from .console import run_top

    run_top(_client(admin_url, token), interval, iterations=iterations)


@click.command()
@click.argument("pattern", default="**")
@click.option("--rate", type=click.IntRange(min=1), default=100, show_default=True,
              help="Most events a second to show (the server samples; it never slows down).")
@click.option("-n", "--count", type=click.IntRange(min=1), default=None,
              help="Exit after this many events.")
@admin_target
@_admin
def tail(pattern: str, rate: int, count: int | None, admin_url: str | None,
         token: str | None) -> None:
    """Print events matching PATTERN (default: all) as JSON lines as they pass through."""
    import json

    from .app import compile_pattern
    from .errors import RegistrationError

    try:
        compile_pattern(pattern)
    except RegistrationError as exc:
        raise click.BadParameter(str(exc), param_hint="PATTERN") from None
    client = _client(admin_url, token)
    client.timeout = 30.0  # the server writes a keep-alive line every second
    try:
        for event in client.stream("/tail", pattern=pattern, rate=rate, limit=count):
            click.echo(json.dumps(event))
    except KeyboardInterrupt:
        pass


COMMANDS = [stats, workers, handlers, reload, stop, scale, top, tail]
