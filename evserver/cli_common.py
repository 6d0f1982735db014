"""What every ``evserver`` command shares: one line on stderr with an exit code, and JSON out.

Exit codes are a contract (click's): 0 success, 1 runtime failure (server unreachable,
remote error), 2 usage or configuration error.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

__all__ = ["fail", "print_json"]


def fail(message: str, code: int = 1) -> None:
    """Say why on stderr, in one line, and exit with ``code``."""
    click.echo(f"evserver: {message}", err=True)
    sys.exit(code)


def print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))
