"""The ``evserver`` command line: thin click commands over the library.

Exit codes are a contract (click's): 0 success, 1 runtime failure (server unreachable,
remote error), 2 usage or configuration error.
"""

from __future__ import annotations

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


if __name__ == "__main__":
    main()
