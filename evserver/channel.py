"""The master <-> worker control channel: msgpack maps over one socketpair per worker.

Every message is a map with a ``"t"`` (type) key:

=========  ==============  ==========================================================
type       direction       fields
=========  ==============  ==========================================================
``ready``  worker->master  ``pid``, ``address`` ``[host, port]``: listening now
``hb``     worker->master  (none): sent by a green thread, so it proves the hub runs
``error``  worker->master  ``code``, ``message``: startup failed (sent before exiting)
``stats``  master->worker  ``id``: a request
``stats``  worker->master  ``id``, ``stats``: the reply (see ``worker.worker_stats``);
                           ``id`` 0 is the final one, sent after draining
``tail``   master->worker  ``id``, ``pattern``, ``rate``, ``lease``: sample matching
                           events for an admin tail (again before ``lease`` s to renew)
``untail`` master->worker  ``id``: stop sampling for that tail now
``tailed`` worker->master  ``id``, ``events``: a batch of sampled events
=========  ==============  ==========================================================

The module is shared by both ends and imports no eventlet: the master passes a plain
non-blocking socket, the worker a green one. A stream socket plus a streaming unpacker
(rather than datagrams) keeps large stats replies whole.
"""

from __future__ import annotations

from typing import Any

import msgpack

MAX_MESSAGE = 16 << 20


class Channel:
    """One end of a worker's socketpair; ``sock`` may be a green or a non-blocking socket."""

    __slots__ = ("_unpacker", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._unpacker = msgpack.Unpacker(max_buffer_size=MAX_MESSAGE)

    def send(self, t: str, **fields: Any) -> None:
        """Send one message; raises OSError if the peer is gone (or, non-blocking, busy)."""
        self.sock.sendall(msgpack.packb({"t": t, **fields}, use_bin_type=True))

    def receive(self) -> list[dict[str, Any]] | None:
        """Read what is available and return the complete messages; None at EOF.

        On a non-blocking socket call it only when readable; a spurious wakeup returns [].
        """
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self._unpacker.feed(data)
        return [m for m in self._unpacker if isinstance(m, dict) and "t" in m]

    def fileno(self) -> int:
        return int(self.sock.fileno())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
