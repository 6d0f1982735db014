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
    """The one rate limit on log lines: at most ``per_interval`` lines per key in each
    ``interval`` seconds, so a flood (a handler failing on every event, a scanner failing
    the handshake thousands of times a second) cannot turn the log into the bottleneck.
    The next line that gets through says how many were suppressed; the counters that go
    with such lines stay exact, because they are counted elsewhere.
    """

    def __init__(self, per_interval: int = 10, interval: float = 1.0) -> None:
        self.per_interval = per_interval
        self.interval = interval
        self._windows: dict[str, list[float]] = {}  # key -> [window start, lines, suppressed]

    def allow(self, key: str) -> bool:
        """True when a line for ``key`` may be written now (it then counts against the budget)."""
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            if len(self._windows) > 1024:  # keys may come from peers: stay bounded
                self._windows.clear()
            suppressed = window[2] if window else 0
            window = self._windows[key] = [now, 0, suppressed]
        if window[1] >= self.per_interval:
            window[2] += 1
            return False
        window[1] += 1
        return True

    def suppressed_note(self, key: str) -> str:
        """" (N similar lines not logged)" for the line about to be written, once."""
        window = self._windows[key]
        n, window[2] = int(window[2]), 0
        return f" ({n} similar lines not logged)" if n else ""

    def warning(self, logger: logging.Logger, key: str, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` at WARNING if ``key``'s budget allows; True when logged."""
        if not self.allow(key):
            return False
        logger.warning(msg + "%s", *args, self.suppressed_note(key))
        return True


def plural(n: int, noun: str) -> str:
    """``1 worker``, ``2 workers``: log lines are read by people."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
