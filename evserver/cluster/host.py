"""What the cluster's pieces need from each other, as protocols: the edge and the owners
see their node, the node sees its server, through these alone (no import cycles)."""

from __future__ import annotations

from typing import Any, Protocol

from ..app import App
from ..dispatch import Dispatcher
from .keys import Keys


class ServerView(Protocol):
    """What a node needs from the server it serves in."""

    app: App
    dispatcher: Dispatcher
    drain_timeout: float


class NodeView(Protocol):
    """What the edge and the partition owners need from their node."""

    id: str
    settings: Any  # the config's [cluster] table
    keys: Keys
    redis: Any
    redis_errors: tuple[type[BaseException], ...]
    server: ServerView
    edge: Any  # the node's Edge (its ``on_reply``)
    acker: Any  # the node's Acker
    reader: Any  # the node's Reader
    dead_letters: Any  # the node's StreamDeadLetters

    def count(self, name: str, n: int = 1) -> None: ...

    def log_error(self, kind: str, msg: str, *args: Any) -> None: ...

    def release(self, partition: int) -> None: ...

    def owner_ended(self, owner: Any) -> None: ...
