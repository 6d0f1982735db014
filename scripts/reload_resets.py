"""Count the new connections that fail while ``HUP`` reloads replace the workers under churn.

    python scripts/reload_resets.py --reloads 20 --clients 4 [--json]

Starts ``evserver serve --workers 2`` on the soak app, runs ``--clients`` threads that open
connections back to back (connect, PING, PONG, close), sends ``--reloads`` HUPs one after
another (each once the previous reload finished) and prints how many connections failed
during the reloads, by kind (a reset is a connection the kernel dropped from a closing
listener's queue). It also says how the server's listeners migrate queued connections:
``program`` (evserver's reuseport eBPF program), ``sysctl`` (net.ipv4.tcp_migrate_req=1) or
``none``. docs/workers.md has the figures and the commands that produced each case.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from evserver.reuseport import sysctl_migrates
from evserver.soak.chaos import Chaos
from evserver.soak.ledger import Ledger
from evserver.soak.load import Churn
from evserver.soak.watch import Server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = Server(Path(tempfile.mkdtemp(prefix="evserver-resets-")), args.workers)
    server.start()
    try:
        chaos = Chaos(server, [], time.monotonic(), 0)
        churn = [Churn(f"c{i}", Ledger(), server.address, 0, interval=0.0)
                 for i in range(args.clients)]
        for c in churn:
            c.start()
        t0 = time.monotonic()
        for _ in range(args.reloads):
            time.sleep(1.0)  # steady churn between reloads
            chaos.hup()
        time.sleep(1.0)
        elapsed = time.monotonic() - t0
        for c in churn:
            c.stop()
        for c in churn:
            c.join(30)
    finally:
        server.stop()
    server.poll_log()
    spans = [(w.start, w.end + 1.0) for w in chaos.log.windows]
    failures = [(t, kind) for c in churn for t, kind in c.failures]
    during = Counter(kind for t, kind in failures if any(a <= t <= b for a, b in spans))
    unavailable = server.logged("SO_REUSEPORT migration unavailable")
    doc = {
        "migration": "sysctl" if sysctl_migrates() else "none" if unavailable else "program",
        "reloads": len(chaos.log.windows), "clients": args.clients,
        "connections": sum(c.completed for c in churn) + len(failures),
        "connections_per_s": round((sum(c.completed for c in churn) + len(failures))
                                   / elapsed),
        "failed_during_reloads": sum(during.values()), "by_kind": dict(during),
        "failed_outside_reloads": len(failures) - sum(during.values()),
        "problems": chaos.log.problems,
    }
    print(json.dumps(doc) if args.json else "\n".join(f"{k}: {v}" for k, v in doc.items()))


if __name__ == "__main__":
    main()
