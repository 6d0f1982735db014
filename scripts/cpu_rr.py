"""Server CPU per request/reply round trip, without the network's noise.

The server and 50 green clients share one process and hub, so ``time.process_time`` covers
both; the clients' cost is the same for every build, so two builds compare by their
difference. Run it against another checkout with ``PYTHONPATH=<checkout>``.

    python scripts/cpu_rr.py [--listener]   # µs per round trip, best of 5 x 100,000
"""

from __future__ import annotations

import sys
import time

from evserver import App
from evserver import protocol as p
from evserver._eventlet import eventlet
from evserver.server import Server

CONNECTIONS, PER_CONNECTION, ROUNDS = 50, 2000, 5


def server_for(app: App) -> Server:
    try:
        from evserver.config import default_config
    except ImportError:  # checkouts before the settings redesign took keyword arguments
        return Server(app, host="127.0.0.1", port=0)  # type: ignore[call-arg]
    return Server(app, default_config().replace(**{"server.host": "127.0.0.1",
                                                   "server.port": 0}))


def main() -> None:
    app = App()
    app.processor("bench")(lambda event: None)
    if "--listener" in sys.argv:
        app.listener("bench")(lambda event: None)
    server = server_for(app)
    server.start()
    request = p.encode_event(1, ["bench", 1], request=True)

    def client() -> None:
        sock = eventlet.green.socket.create_connection(server.address)
        sock.recv(4096)  # HELLO
        for _ in range(PER_CONNECTION):
            sock.sendall(request)
            sock.recv(4096)  # the REPLY: one small frame, one read
        sock.close()

    best = float("inf")
    for _ in range(ROUNDS):
        start = time.process_time()
        for green in [eventlet.spawn(client) for _ in range(CONNECTIONS)]:
            green.wait()
        best = min(best, (time.process_time() - start) / (CONNECTIONS * PER_CONNECTION))
    print(f"{best * 1e6:.2f} µs per round trip (server and clients, best of {ROUNDS})")


if __name__ == "__main__":
    main()
