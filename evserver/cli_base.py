"""What every ``evserver`` command shares: one way to fail, one way to print JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def fail(message: str, code: int = 1) -> None:
    """One line on stderr, then exit: 1 for a runtime failure, 2 for a usage error."""
    click.echo(f"evserver: {message}", err=True)
    sys.exit(code)


def print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))
