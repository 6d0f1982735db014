"""What the soak's clients sent and were told: one byte per event, so a long run stays small."""

from __future__ import annotations

import threading

SENT, ACKED, FAILED = 1, 2, 3  # what a client knows of an event it sent


class Stream:
    """The events of one client (or one ordered key): ids ``<name>-<n>``, n = 0, 1, 2, ...

    Owned by one thread; ``states[n]`` is what that thread knows of event n.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.states = bytearray()

    def new(self, count: int = 1) -> range:
        """Reserve the next ``count`` ids (as numbers), marked sent."""
        start = len(self.states)
        self.states.extend(b"\x01" * count)
        return range(start, start + count)

    def id(self, n: int) -> str:
        return f"{self.name}-{n}"

    def mark(self, numbers: range | list[int], state: int) -> None:
        for n in numbers:
            self.states[n] = state

    def count(self, state: int) -> int:
        return self.states.count(state)


class Ledger:
    """Every stream of a run, by name (its first letter says which client kind sent it)."""

    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}
        self._lock = threading.Lock()

    def stream(self, name: str) -> Stream:
        with self._lock:
            return self.streams.setdefault(name, Stream(name))

    @staticmethod
    def split(soak_id: str) -> tuple[str, int] | None:
        """``"b0-17"`` -> ``("b0", 17)``; None for what no stream sent."""
        name, _, n = soak_id.rpartition("-")
        return (name, int(n)) if name and n.isdigit() else None
