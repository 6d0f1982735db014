"""The server side of one native-protocol connection, sans-I/O: bytes in, units of work and
bytes out (h11's model; the eventlet driver is ``evserver.connection``).

Lifecycle (``TRANSITIONS``; any other transition is an error):

* ``AWAIT_HELLO``: the server's HELLO is out (with a nonce when keys are configured). The
  client may open with a HELLO of its own; with keys it must, and it must authenticate.
* ``AUTH``: the client's HELLO arrived; its proof is being checked (without keys there is
  nothing to check).
* ``OPEN``: EVENT, BATCH, REQUEST and PING frames become units of work. A HELLO now is a
  protocol error: the conversation has started.
* ``CLOSING``: an error was answered; nothing more is read.
* ``CLOSED``: the peer went away.

Until the client has authenticated it is held to ``PRE_AUTH_MAX_BYTES`` per frame, and none
of its frames becomes work; ``opening`` tells the driver to bound that phase by
``handshake_timeout``. Frames decoded before a malformed one are still returned (and
answered) before the error is raised.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from . import protocol as p
from .auth import Authenticator, new_nonce
from .errors import AuthError, NoKey, PeerError, ProtocolError, TooManyPending
from .states import Lifecycle

log = logging.getLogger("evserver.security")

AWAIT_HELLO, AUTH, OPEN, CLOSING, CLOSED = "AWAIT_HELLO", "AUTH", "OPEN", "CLOSING", "CLOSED"
TRANSITIONS: dict[tuple[str, str], str] = {
    (AWAIT_HELLO, "hello"): AUTH,  # the client's HELLO: authenticating, or the optional one
    (AWAIT_HELLO, "frame"): OPEN,  # no keys: any other first frame starts the conversation
    (AUTH, "verified"): OPEN,
    (OPEN, "frame"): OPEN,
    **{(state, "error"): CLOSING for state in (AWAIT_HELLO, AUTH, OPEN, CLOSING)},
    **{(state, "eof"): CLOSED for state in (AWAIT_HELLO, AUTH, OPEN, CLOSING)},
}

#: The largest frame (and about the most buffered input) accepted before authentication.
PRE_AUTH_MAX_BYTES = 4096
#: What a client that sent no proof at all is told. It reveals nothing the server's HELLO
#: (which announces "auth") did not, and saves a deployment a guessing game.
NO_KEY_HINT = ("authentication failed: this server requires a shared key and the client "
               "sent none (set EVSERVER_SHARED_KEY or pass --shared-key; --key-id names one "
               "of several keys)")
_NONE: frozenset[int] = frozenset()
_FIRST = frozenset({0})


class Outcome(Protocol):
    """What this module reads of a finished ``dispatch.Job``: the frames it carried
    (``context``), reply values by event index, and the first failure of a range."""

    context: Any
    values: dict[int, Any]

    def failure(self, start: int, stop: int) -> Any: ...


class NativeProtocol:
    """One connection's native-protocol state: its decoder, lifecycle and owed replies."""

    name = "native"
    #: The counters of the errors this protocol ends a connection for.
    ERROR_COUNTERS = {TooManyPending: "overloaded_closed", AuthError: "auth_failures",
                      ProtocolError: "protocol_errors"}

    __slots__ = ("_auth", "_error", "_max", "_max_pending", "_nonce", "_out", "_reader",
                 "counters", "job_events", "lifecycle", "peer", "replies_pending")

    def __init__(self, *, hello_info: dict[str, Any], max_frame_bytes: int,
                 max_pending_replies: int, auth: Authenticator | None,
                 counters: dict[str, int], job_events: int, peer: str = "") -> None:
        self.peer = peer
        self.counters = counters
        self.job_events = job_events
        self.lifecycle = Lifecycle(TRANSITIONS, AWAIT_HELLO)
        self.replies_pending = 0  # frames that still owe the peer a response
        self._auth = auth
        self._max = max_frame_bytes
        self._max_pending = max_pending_replies
        self._error: PeerError | None = None  # raised by the next ``next_jobs``
        self._nonce = new_nonce() if auth is not None else b""
        info = {**hello_info, **auth.hello_info(self._nonce)} if auth is not None else hello_info
        self._out = [p.encode_hello(info)]
        self._reader = p.FrameReader(p.SERVER_RECEIVES, max_frame_bytes=(
            PRE_AUTH_MAX_BYTES if auth is not None else max_frame_bytes))

    # ------------------------------------------------------------------ the driver's API

    @property
    def opening(self) -> bool:
        """True while the client must still authenticate (bounded by handshake_timeout)."""
        return self._auth is not None and self.lifecycle.state in (AWAIT_HELLO, AUTH)

    def data_to_send(self) -> bytes:
        """Bytes this side owes the peer now (the HELLOs), taken once."""
        out, self._out = b"".join(self._out), []
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.lifecycle.state in (CLOSING, CLOSED):
            raise ProtocolError("the connection is closing")
        self._reader.receive_data(data)

    def receive_eof(self) -> None:
        self.lifecycle.fire("eof")

    @property
    def pending_input(self) -> bool:
        """Bytes received that are not yet work."""
        return self._reader.buffered > 0

    def next_jobs(self) -> list[tuple[list[Any], frozenset[int], list[p.Frame]]]:
        """The next units of work, about ``job_events`` events each: (events, indexes of
        requests, the frames to answer); [] when more bytes are needed. While ``opening`` it
        consumes the authenticating HELLO and stops there, so the driver can end the
        handshake's deadline before any handler runs."""
        if self._error is not None:
            raise self._fail(self._error)
        if self._reader.idle:  # the common case after a job: skip the decoder's setup
            return []
        try:
            if self.opening:
                frame = self._reader.next_frame()
                if frame is not None:
                    self._authenticate(frame)
                return []
            frames = self._reader.frames(coalesce=self.job_events, max_events=self.job_events)
        except PeerError as exc:
            raise self._fail(exc) from None
        if frames and self.lifecycle.state == AWAIT_HELLO:
            if frames[0].kind == p.HELLO:
                self.lifecycle.fire("hello")  # the optional HELLO of an open server
                self.lifecycle.fire("verified")
                frames = frames[1:]
            else:
                self.lifecycle.fire("frame")
        owed = 0
        for i, frame in enumerate(frames):
            if frame.kind == p.HELLO:  # (OPEN, "hello") is not a transition
                self._error = ProtocolError("HELLO after the start of the conversation")
                frames = frames[:i]
                break
            if frame.corr:
                owed += 1
        self.replies_pending += owed
        if self.replies_pending > self._max_pending:
            raise self._fail(TooManyPending(
                f"more than max_pending_replies={self._max_pending} responses outstanding; "
                "read them before sending more"))
        return [_unit(group) for group in _split(frames, self.job_events)] if frames else []

    def job_done(self, job: Outcome) -> tuple[bytes, str | None]:
        """The responses a finished job owes, and why to close (never, for this protocol)."""
        answers = []
        start = 0
        for frame in job.context:
            stop = start + len(frame.body) if frame.kind in p.EVENT_KINDS else start
            if frame.corr or frame.kind == p.PING:
                answers.append(_answer(frame, job, start, stop))
                if frame.corr:
                    self.replies_pending -= 1
            start = stop
        return b"".join(answers) if len(answers) != 1 else answers[0], None

    def error_bytes(self, exc: PeerError) -> bytes:
        """The ERROR frame (corr 0) that ends the connection for ``exc``."""
        if isinstance(exc, AuthError):
            # The client learns no more than "no" (and whether it sent a key at all): which
            # key or field was wrong is for the log.
            message = NO_KEY_HINT if isinstance(exc, NoKey) else "authentication failed"
            return p.encode_error(0, AuthError.code, "AuthError", message)
        return p.encode_error(0, exc.code, type(exc).__name__, str(exc))

    @staticmethod
    def refusal(limit: int) -> bytes:
        """What a connection beyond ``max_connections`` is told before it is closed."""
        return p.encode_error(0, "overloaded", "TooManyConnections",
                              f"server is at max_connections={limit}")

    # ------------------------------------------------------------------ internals

    def _fail(self, exc: PeerError) -> PeerError:
        self.lifecycle.fire("error")
        return exc

    def _authenticate(self, frame: p.Frame) -> None:
        assert self._auth is not None
        if frame.kind != p.HELLO:
            raise NoKey(f"first frame is {p.KIND_NAMES.get(frame.kind, frame.kind)}, "
                        "not an authenticating HELLO")
        self.lifecycle.fire("hello")
        if not isinstance(frame.body.get("auth"), dict):
            raise NoKey("the client HELLO carries no auth map")
        key_id, reply = self._auth.verify(self._nonce, frame.body)
        self.lifecycle.fire("verified")
        self._out.append(p.encode_hello(reply))
        log.debug("%s authenticated with key id %r", self.peer, key_id)
        # What the client pipelined behind its HELLO is read with the full frame limit.
        rest = self._reader.take_buffered()
        self._reader = p.FrameReader(p.SERVER_RECEIVES, max_frame_bytes=self._max)
        if rest:
            self._reader.receive_data(rest)


def _split(frames: list[p.Frame], size: int) -> list[list[p.Frame]]:
    """Group frames into jobs of about ``size`` events (a frame is never split)."""
    if len(frames) == 1:
        return [frames]
    jobs: list[list[p.Frame]] = [[]]
    n = 0
    for frame in frames:
        if n >= size:
            jobs.append([])
            n = 0
        jobs[-1].append(frame)
        n += p.weight(frame)
    return jobs


def _unit(frames: list[p.Frame]) -> tuple[list[Any], frozenset[int], list[p.Frame]]:
    """The dispatcher's unit of work for frames: their events, flat, and which are requests
    (the frames ride along as the job's context, to answer them)."""
    if len(frames) == 1 and frames[0].kind in p.EVENT_KINDS:  # a batch, usually
        frame = frames[0]
        return frame.body, _FIRST if frame.kind == p.REQUEST else _NONE, frames
    events: list[Any] = []
    requests = []
    for frame in frames:
        if frame.kind in p.EVENT_KINDS:
            if frame.kind == p.REQUEST:
                requests.append(len(events))
            events += frame.body
    return events, frozenset(requests) if requests else _NONE, frames


def _answer(frame: p.Frame, job: Outcome, start: int, stop: int) -> bytes:
    """The response a frame owes, from the outcome of its events ``start:stop`` in the job."""
    if frame.kind == p.PING:
        return p.encode_pong(frame.corr)
    failure = job.failure(start, stop)
    if failure is not None:
        return p.encode_error(frame.corr, failure.code, failure.type, failure.message)
    if frame.kind == p.REQUEST:
        try:
            return p.encode_reply(frame.corr, job.values.get(start))
        except Exception as exc:  # msgpack raises TypeError, ValueError, BufferError...
            return p.encode_error(frame.corr, "handler_error", "TypeError",
                                  f"the processor's return value cannot be sent: {exc}")
    return p.encode_ack(frame.corr)


__all__ = ["PRE_AUTH_MAX_BYTES", "TRANSITIONS", "NativeProtocol", "Outcome"]
