"""The one door to eventlet: import it quietly and monkey-patch at the right moment.

eventlet is in maintenance mode; keeping every import of it behind this module (and the two
adapters that use it, ``server`` and ``dispatch``) keeps a later move to another loop small.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable
from typing import Any

# Since 0.40.4 eventlet warns on every import; its message starts with a newline, so the
# filter must allow leading whitespace. Users should not see it on every start.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
warnings.filterwarnings("ignore", message=r"\s*Using fork\(\) is a bad idea")
os.environ.setdefault("EVENTLET_NO_GREENDNS", "yes")  # dnspython's resolver: not needed here

import eventlet  # noqa: E402
import eventlet.green.socket  # noqa: E402
import eventlet.hubs  # noqa: E402
import eventlet.queue  # noqa: E402
import eventlet.semaphore  # noqa: E402
import eventlet.tpool  # noqa: E402

__all__ = ["call_in_hub", "eventlet", "monkey_patch", "on_readable", "wake_hub_on_signals"]


def monkey_patch() -> None:
    """Green the standard library so blocking handlers (sockets, sleep) cooperate.

    Must run before the user's app is imported, or locks and sockets it creates stay real.
    """
    eventlet.monkey_patch()


def on_readable(fd: int, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` once, in the hub, when ``fd`` turns readable (data, EOF or error) or
    eventlet declares it closed; return a function that cancels the wait.

    This is how a parked connection waits with no green thread of its own (~7 KiB less).
    """
    hub = eventlet.hubs.get_hub()
    waiting = [True]

    def fire(*_: Any) -> None:
        cancel()
        callback()

    def cancel() -> None:
        if waiting:
            waiting.clear()
            hub.remove(listener)

    listener = hub.add(hub.READ, fd, fire, fire, None)
    return cancel


def call_in_hub(fn: Callable[[], Any]) -> None:
    """Run ``fn`` in the hub on its next turn, where every green thread is suspended: the
    safe place to throw into one (when it ends, control returns to its parent, the hub)."""
    eventlet.hubs.get_hub().schedule_call_global(0, fn)


def wake_hub_on_signals() -> None:
    """Make green work scheduled by a Python signal handler run now, not at the next timer.

    The handler runs while the hub sits in ``epoll_wait``, which PEP 475 then retries with
    the same timeout: a ``spawn_n(server.stop)`` from a SIGTERM handler would wait for the
    hub's next timer (seconds, or never when idle). ``set_wakeup_fd`` makes the interrupted
    poll see a readable pipe and return. Call once, from the main thread, before serving.
    """
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)

    def drain() -> None:
        while True:
            eventlet.hubs.trampoline(r, read=True)
            try:
                while os.read(r, 4096):
                    pass
            except BlockingIOError:
                pass

    eventlet.spawn_n(drain)
