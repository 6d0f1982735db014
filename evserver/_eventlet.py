"""The one door to eventlet: import it quietly and monkey-patch at the right moment.

eventlet is in maintenance mode; keeping every import of it (and of greenlet, which it runs
on) behind this module keeps a later move to another loop small. tests/test_architecture.py
checks that no other module imports eventlet or greenlet, that the sans-I/O modules do not
reach this door, and that the master does not either.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
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
import eventlet.green.ssl  # noqa: E402
import eventlet.hubs  # noqa: E402
import eventlet.hubs.epolls  # noqa: E402
import eventlet.queue  # noqa: E402
import eventlet.semaphore  # noqa: E402
import eventlet.tpool  # noqa: E402
from greenlet import GreenletExit, getcurrent  # noqa: E402

__all__ = ["GreenletExit", "ReadWait", "call_in_hub", "cooperate", "eventlet", "getcurrent",
           "monkey_patch", "on_yield", "os_socket", "use_precise_hub", "wake_hub_on_signals",
           "wrap_server_socket", "wsgi_server"]

_select = eventlet.patcher.original("select")
_PRECISE_WITHIN = 0.1  # seconds: see PreciseHub
_FD_SETSIZE = 1024


def monkey_patch() -> None:
    """Green the standard library so blocking handlers (sockets, sleep) cooperate.

    Must run before the user's app is imported, or locks and sockets it creates stay real.
    """
    eventlet.monkey_patch()


class PreciseHub(eventlet.hubs.epolls.Hub):
    """eventlet's epoll hub, with timers that fire on time instead of up to 1 ms late.

    ``epoll_wait`` takes whole milliseconds and Python rounds the hub's timeout up, so every
    green sleep and ``Timeout`` ended 0.5 ms late on average: 5 % of a 10 ms wait, paid by
    every handler waiting on a timer. When the next timer is not a whole number of
    milliseconds away, the hub waits on the epoll descriptor itself with ``select``, whose
    timeout is in microseconds, then collects the events without waiting. Only such waits
    cost the extra call: a busy hub polls with a zero timeout, and a timer further away
    than ``_PRECISE_WITHIN`` (an idle timeout, say) loses nothing to a millisecond.
    """

    is_available = staticmethod(eventlet.hubs.epolls.is_available)

    def __init__(self, clock: Any = None) -> None:
        super().__init__(clock=clock)
        # select() handles descriptors below FD_SETSIZE only; a hub created late in a
        # process with many files open keeps eventlet's millisecond waits.
        self.precise = self.poll.fileno() < _FD_SETSIZE
        self.turns = _Turns(self)

    def do_poll(self, seconds: float) -> list[tuple[int, int]]:
        if 0 < seconds < _PRECISE_WITHIN and self.precise and seconds * 1000 % 1:
            _select.select((self.poll,), (), (), seconds)
            seconds = 0
        events: list[tuple[int, int]] = self.poll.poll(seconds)
        return events


class _Turns:
    """Green threads that gave up their turn (``cooperate``), resumed in order by one hub
    callback a round, where ``eventlet.sleep(0)`` costs a timer each (an object, a heap push
    and pop, a cancel): a reader yields after every read, so this is paid per request.

    A round's callback resumes those queued before it ran; those that yield again meanwhile
    wait for the next round, after the hub has polled, as timers due now would.
    """

    __slots__ = ("cells", "hub")

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.cells: list[list[Any]] = []  # [green thread], emptied if resumed otherwise

    def wait(self) -> None:
        cell = [getcurrent()]
        if not self.cells:
            self.hub.schedule_call_global(0, self._resume)
        self.cells.append(cell)
        try:
            self.hub.switch()
        finally:
            cell[0] = None  # resumed by something else (an exception thrown in): skip it

    def _resume(self) -> None:
        cells, self.cells = self.cells, []
        for i, cell in enumerate(cells):
            if (green := cell[0]) is not None:
                try:
                    green.switch()
                except BaseException:  # ended with an error: the others still get their turn
                    if rest := cells[i + 1:]:
                        if not self.cells:
                            self.hub.schedule_call_global(0, self._resume)
                        self.cells[:0] = rest
                    raise


def cooperate() -> None:
    """Let the other green threads that are ready run, then go on: ``eventlet.sleep(0)``,
    cheaper under a ``PreciseHub`` (see ``_Turns``)."""
    turns = getattr(eventlet.hubs.get_hub(), "turns", None)
    if turns is None:
        eventlet.sleep(0)
    else:
        turns.wait()


def use_precise_hub() -> None:
    """Make the calling thread's hub a ``PreciseHub``, unless it already has a hub (which
    keeps running as it is: a hub cannot be replaced under its green threads) or
    ``EVENTLET_HUB`` names one."""
    if (PreciseHub.is_available() and not os.environ.get("EVENTLET_HUB")
            and getattr(eventlet.hubs._threadlocal, "hub", None) is None):
        eventlet.hubs.use_hub(PreciseHub)


class ReadWait:
    """A one-shot wait, in the hub, for ``fd`` to turn readable (data, EOF or error) or for
    ``timeout`` seconds to pass; then ``callback(timed_out)`` runs in the hub.

    It holds no stack, unlike a green thread blocked in ``recv``: this is how a parked
    connection waits, ~7 KiB lighter.
    """

    __slots__ = ("_callback", "_listener", "_timer")

    def __init__(self, fd: int, callback: Callable[[bool], None], timeout: float | None) -> None:
        hub = eventlet.hubs.get_hub()
        self._callback: Callable[[bool], None] | None = callback
        self._listener = hub.add(hub.READ, fd, self._readable, self._readable, None)
        self._timer = None if timeout is None else hub.schedule_call_global(
            timeout, self._end, True)

    def _readable(self, *_: Any) -> None:
        self._end(False)

    def _end(self, timed_out: bool) -> None:
        callback = self._callback
        if self.cancel() and callback is not None:
            callback(timed_out)

    def cancel(self) -> bool:
        """Stop waiting; False if the wait had ended already."""
        if self._callback is None:
            return False
        self._callback = None
        eventlet.hubs.get_hub().remove(self._listener)
        if self._timer is not None:
            self._timer.cancel()
        return True


def wrap_server_socket(context: ssl.SSLContext, sock: Any) -> Any:
    """``context.wrap_socket(sock, server_side=True)``, green whatever class ``context`` is:
    the accepted sockets trampoline instead of blocking the hub, and their TLS handshake
    waits for the first read (or an explicit ``do_handshake``) in the connection's thread."""
    return eventlet.green.ssl.GreenSSLContext.wrap_socket(context, sock, server_side=True)


def os_socket(sock: Any) -> socket.socket | None:
    """The non-blocking OS socket under a plain green socket (None for TLS and others).

    Connections read and write it first: eventlet's ``recv_into`` and ``sendall`` cost about
    1 µs per call more than the call itself (three calls and an exception object), as much
    as a small request's decoding; the green socket serves when they must wait.
    """
    if type(sock) is eventlet.greenio.GreenSocket:
        return sock.fd
    return None


def on_yield(hook: Callable[[], None] | None) -> Callable[[], None] | None:
    """Have the hub call ``hook`` each time the calling green thread is about to block
    (``None``: stop); returns the hook it replaces, to restore when done.

    This is eventlet's ``switch_out`` attribute, which its hub calls (squelching errors)
    just before switching away from a green thread. The hook runs inside that switch, so it
    must not block. The dispatcher uses it to share a job once a handler waits.
    """
    current = getcurrent()
    previous: Callable[[], None] | None = getattr(current, "switch_out", None)
    current.switch_out = hook
    return previous


def wsgi_server(sock: Any, app: Any, **options: Any) -> Any:
    """``eventlet.wsgi.server`` in a new green thread (imported here, on first use only)."""
    import eventlet.wsgi

    return eventlet.spawn(eventlet.wsgi.server, sock, app, **options)


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
