"""Soak and chaos run: ``python scripts/soak.py --duration 600 --seed 1 --workers 2 [--json]``.

The same as ``evserver soak`` (evserver/soak/): it starts ``evserver serve --workers N`` on
its own app, drives mixed native and Forward load at it, injects seeded faults, and prints
what held (docs/reliability.md).
"""

import sys

from evserver.cli import main

if __name__ == "__main__":
    main(["soak", *sys.argv[1:]], prog_name="evserver")
