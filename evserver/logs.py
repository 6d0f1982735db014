"""Log setup: readable lines for people, JSON lines for machines; never a line per event."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_TEXT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the fields log shippers index."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once per process (workers call it too)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class LogBudget:
    """At most ``per_second`` log lines per key and second, so a handler failing on every
    event of a flood cannot turn the log into the bottleneck; the next line says how many
    were suppressed."""

    def __init__(self, per_second: int = 10) -> None:
        self.per_second = per_second
        self._windows: dict[str, list[float]] = {}  # key -> [window start, lines, suppressed]

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= 1.0:
            if len(self._windows) > 1024:
                self._windows.clear()
            suppressed = window[2] if window else 0
            window = self._windows[key] = [now, 0, suppressed]
        if window[1] >= self.per_second:
            window[2] += 1
            return False
        window[1] += 1
        return True

    def suppressed_note(self, key: str) -> str:
        window = self._windows[key]
        n, window[2] = int(window[2]), 0
        return f" ({n} similar failures not logged)" if n else ""
