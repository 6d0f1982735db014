"""The one door to eventlet: import it quietly and monkey-patch at the right moment.

eventlet is in maintenance mode; keeping every import of it behind this module (and the two
adapters that use it, ``server`` and ``dispatch``) keeps a later move to another loop small.
"""

from __future__ import annotations

import os
import warnings

# Since 0.40.4 eventlet warns on every import; its message starts with a newline, so the
# filter must allow leading whitespace. Users should not see it on every start.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
warnings.filterwarnings("ignore", message=r"\s*Using fork\(\) is a bad idea")
os.environ.setdefault("EVENTLET_NO_GREENDNS", "yes")  # dnspython's resolver: not needed here

import eventlet  # noqa: E402
import eventlet.queue  # noqa: E402

__all__ = ["eventlet", "monkey_patch"]


def monkey_patch() -> None:
    """Green the standard library so blocking handlers (sockets, sleep) cooperate.

    Must run before the user's app is imported, or locks and sockets it creates stay real.
    """
    eventlet.monkey_patch()
