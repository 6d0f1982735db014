"""evserver: a greenlet-based concurrent event server."""

__version__ = "0.1.0"
