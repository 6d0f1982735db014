"""A connection's lifecycle as data: a table of the transitions each protocol allows.

As in h11's ``_state.py``, the rules are written down once, at the top of each protocol
module (``native.TRANSITIONS``, ``forward_session.TRANSITIONS``), and every change of state
goes through ``Lifecycle.fire``: a transition that is not in the table is an error, never a
silent no-op. Whose error depends on who caused it: ``unexpected`` is the exception for
events the peer caused (a ``ProtocolError``); anything else is a ``StateError``, a bug here.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import EvserverError, StateError

__all__ = ["Lifecycle"]


class Lifecycle:
    """The current state of one connection and the table it moves by."""

    __slots__ = ("state", "table")

    def __init__(self, table: Mapping[tuple[str, str], str], start: str) -> None:
        self.table = table
        self.state = start

    def fire(self, event: str, unexpected: type[EvserverError] = StateError) -> str:
        """Move by ``event``; raise ``unexpected`` if the table has no such transition."""
        try:
            self.state = self.table[self.state, event]
        except KeyError:
            raise unexpected(f"{event} is not allowed in state {self.state}") from None
        return self.state

    def allows(self, event: str) -> bool:
        return (self.state, event) in self.table
