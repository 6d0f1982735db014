"""``GreenLoop``: the start/stop of a node's long-running pieces (the edge's appender, the
Reader, the Acker), each one green thread that runs until the node stops it."""

from __future__ import annotations

from typing import Any

from .._eventlet import eventlet


class GreenLoop:
    """Runs ``_run`` in its own green thread from ``start`` until ``stop`` kills it."""

    glet: Any = None  # the green thread, once started

    def start(self) -> None:
        self.glet = eventlet.spawn(self._run)

    def stop(self) -> None:
        if self.glet is not None:
            self.glet.kill()

    def _run(self) -> None:
        raise NotImplementedError
