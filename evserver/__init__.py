"""evserver: a greenlet-based concurrent event server.

Public API: ``App`` (register processors and listeners), ``Event`` (what handlers receive),
``Client`` (the blocking SDK) and ``RemoteError`` (a failure reported by the server).
"""

__version__ = "0.1.0"

from .app import App
from .errors import EvserverError, RemoteError
from .event import Event

__all__ = ["App", "Client", "Event", "EvserverError", "RemoteError", "__version__"]


def __getattr__(name: str):  # the client is imported lazily: servers never need it
    if name == "Client":
        from .client import Client

        return Client
    raise AttributeError(name)
