"""What the master and its worker processes agree on: exit codes and environment names.

Both sides import this module, and it imports nothing, so the master can know a worker's
contract without importing the worker (which would bring eventlet into a process that must
run no hub). The messages they exchange over the control channel are ``evserver.channel``'s.
"""

from __future__ import annotations

#: A process ended as asked (a graceful stop, or an admin command that worked).
EXIT_OK = 0
#: A runtime failure: a port could not be bound, the master went away, an admin call failed.
EXIT_FAILURE = 1
#: The app could not be imported: the master stops the fleet instead of respawning forever
#: (gunicorn's APP_LOAD_ERROR), since every new worker would fail the same way.
EXIT_APP_LOAD_ERROR = 4

#: The environment variable that carries the master's resolved config, as JSON, to a worker
#: (the environment, unlike argv, is readable by this user only: the config holds secrets).
CONFIG_ENV = "_EVSERVER_WORKER_CONFIG"
#: The worker's CONFIG_JSON argument that says "read it from CONFIG_ENV".
CONFIG_FROM_ENV = "@env"
#: Set by systemd for Type=notify services; only the master talks to it.
NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"

__all__ = ["CONFIG_ENV", "CONFIG_FROM_ENV", "EXIT_APP_LOAD_ERROR", "EXIT_FAILURE", "EXIT_OK",
           "NOTIFY_SOCKET_ENV"]
