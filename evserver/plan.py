"""What the dispatcher knows about one handler (``Plan``) and one failed event (``Failure``).

A handler's options are resolved against the ``[handlers]`` defaults once, when the
dispatcher is built, so the per-event path reads plain attributes and a handler with no
option at all (``direct``) is called with nothing around it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .app import Handler
from .event import Event


class Failure:
    """Why an event was not processed: the exception's class name, message and error code."""

    __slots__ = ("code", "message", "type")

    def __init__(self, code: str, type: str, message: str) -> None:
        self.code = code
        self.type = type
        self.message = message

    @classmethod
    def from_exception(cls, exc: BaseException, note: str = "") -> Failure:
        code = getattr(exc, "code", None)  # ours are str; HTTPError.code is an int
        return cls(code if isinstance(code, str) else "handler_error", type(exc).__name__,
                   f"{note}{exc}")

    def __repr__(self) -> str:
        return f"Failure({self.code!r}, {self.type!r}, {self.message!r})"


class Plan:
    """A handler's options, resolved against the ``[handlers]`` defaults once."""

    __slots__ = ("backoff", "blocking", "direct", "func", "handler", "key", "retries", "timeout")

    def __init__(self, handler: Handler, defaults: dict[str, Any]) -> None:
        opts = {**defaults, **{k: v for k, v in handler.options.items() if v is not None}}
        self.handler = handler
        self.func = handler.func
        self.timeout = float(opts.get("timeout") or 0)
        self.retries = int(opts.get("retries") or 0)
        self.backoff = float(opts.get("backoff") or 0)
        self.blocking = bool(opts.get("blocking"))
        key = handler.options.get("ordered_by")
        if isinstance(key, str):
            field = key
            key = lambda event: event.data[field]  # noqa: E731
        self.key: Callable[[Event], Any] | None = key
        self.direct = not (self.timeout or self.retries or self.blocking)


# What the dispatcher resolves an event type to: its processor's plan (if any) and its
# listeners' plans, in registration order.
Entry = tuple[Plan | None, tuple[Plan, ...]]
