"""The server side of one Fluentd Forward connection, sans-I/O: its decoder, its lifecycle
and the acks it owes, in request order (the eventlet driver is ``evserver.connection``).

Lifecycle (``TRANSITIONS``; any other transition is an error): ``OPEN`` from the start (the
shared-key handshake, HELO/PING/PONG, is part of the stream and ``forward.ForwardConnection``
checks it), ``CLOSING`` once an error ended it, ``CLOSED`` when the peer went away.

Requests become units of work for the same dispatcher as native events, so processors,
listeners, handler options, dead letters, ``tail`` and the stats treat them alike: the tag
is ``event.type``, the record ``event.data``, the entry time ``event.time`` and the v1.5
entry metadata ``event.meta`` (plus ``"protocol": "forward"``).

Acks: a request with a ``chunk`` option gets a number. ``{"ack": chunk}`` is written once
its events' processors and listeners completed, always in request order (a later job may
finish first, so finished acks wait for earlier ones). A failed request is never acked: the
connection is closed instead, which is the only way Forward has to tell a client to retry.
Unmatched tags are acked (and counted as ``unrouted``), as Fluentd does, because no retry
could ever route them.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import HandshakeFailed, PeerError, ProtocolError, RoutingError
from .forward import ForwardConnection as ForwardDecoder
from .forward import ForwardRequest, ack_bytes
from .native import Outcome
from .states import Lifecycle

log = logging.getLogger("evserver.forward")

OPEN, CLOSING, CLOSED = "OPEN", "CLOSING", "CLOSED"
TRANSITIONS: dict[tuple[str, str], str] = {
    (OPEN, "requests"): OPEN,
    **{(state, "error"): CLOSING for state in (OPEN, CLOSING)},
    **{(state, "eof"): CLOSED for state in (OPEN, CLOSING)},
}
_NONE: frozenset[int] = frozenset()


class ForwardProtocol:
    """One Forward client: its decoder, lifecycle, and the acks owed in request order.

    ``chunks`` maps a request number to its chunk until it is acked or dropped; ``done``
    holds finished request numbers (True = processed) until every earlier one finished.
    """

    name = "Forward"
    ERROR_COUNTERS = {HandshakeFailed: "forward_auth_failures", ProtocolError: "forward_errors"}
    opening = False  # the handshake is in the stream, not a phase before it

    __slots__ = ("chunks", "counters", "decoder", "done", "failed", "job_events", "lifecycle",
                 "next_ack", "peer", "requests")

    def __init__(self, decoder: ForwardDecoder, *, counters: dict[str, int], job_events: int,
                 peer: str = "") -> None:
        self.decoder = decoder
        self.counters = counters
        self.job_events = job_events
        self.peer = peer
        self.lifecycle = Lifecycle(TRANSITIONS, OPEN)
        self.requests = 0  # numbers handed to requests with a chunk
        self.next_ack = 1
        self.chunks: dict[int, bytes | str] = {}
        self.done: dict[int, bool] = {}
        self.failed = False
        counters["forward_connections"] += 1

    def data_to_send(self) -> bytes:
        """HELO at first (with a shared key), PONG after a PING; taken once."""
        return self.decoder.data_to_send()

    def receive_data(self, data: bytes | memoryview) -> None:
        if self.lifecycle.state != OPEN:
            raise ProtocolError("the connection is closing")
        self.decoder.receive_data(data)

    @property
    def pending_input(self) -> bool:
        """Bytes received that are not yet work."""
        return self.decoder.in_request

    def receive_eof(self) -> None:
        in_request = self.decoder.in_request
        self.lifecycle.fire("eof")
        if in_request:
            raise ProtocolError("connection closed in the middle of a request")

    def next_jobs(self) -> list[tuple[list[Any], frozenset[int], list[tuple[int, int]]]]:
        """The next units of work (events, no requests, (ack number or 0, event count) per
        request group); [] when more bytes are needed. Each acked request is a group of its
        own; the others share groups of up to a job's size."""
        try:
            requests = self.decoder.requests(max_events=self.job_events)
        except PeerError as exc:
            self.lifecycle.fire("error")
            raise exc from None
        if not requests:
            return []
        self.lifecycle.fire("requests")
        return [self._unit(requests)]

    def _unit(self, requests: list[ForwardRequest]) -> tuple[list[Any], frozenset[int],
                                                             list[tuple[int, int]]]:
        events: list[Any] = []
        groups: list[tuple[int, int]] = []  # (ack number, events); 0: nobody waits
        open_group = -1  # index in groups of the open group of requests nobody waits for
        skipped = 0
        for request in requests:
            n = len(request.events)
            if request.chunk is None:
                if open_group < 0 or groups[open_group][1] >= self.job_events:
                    open_group = len(groups)
                    groups.append((0, 0))
                groups[open_group] = (0, groups[open_group][1] + n)
            else:
                self.requests += 1
                self.chunks[self.requests] = request.chunk
                groups.append((self.requests, n))
                open_group = -1
            events += request.events
            skipped += request.skipped
        counters = self.counters
        counters["forward_requests"] += sum(r.count for r in requests)
        counters["forward_events"] += len(events)
        if skipped:
            counters["forward_skipped"] += skipped
            log.info("Forward %s: skipped %d invalid event(s)", self.peer, skipped)
        return events, _NONE, groups

    def job_done(self, job: Outcome) -> tuple[bytes, str | None]:
        """The acks a finished job makes due (in request order), and why to close the
        connection: a request failed in its handlers, so the client must retry it."""
        start = 0
        for number, n in job.context:
            stop = start + n
            if number:
                failure = job.failure(start, stop)
                self.done[number] = failure is None or failure.code == RoutingError.code
            start = stop
        acks = []
        failed_now = False
        while (ok := self.done.pop(self.next_ack, None)) is not None:
            chunk = self.chunks.pop(self.next_ack)
            self.next_ack += 1
            if ok and not self.failed:
                acks.append(ack_bytes(chunk))
            elif not self.failed:
                self.failed = failed_now = True
        if failed_now:
            self.counters["forward_unacked"] += 1
            log.warning("Forward %s: a request failed in its handlers; closing without its ack "
                        "so the client retries", self.peer)
        return b"".join(acks), "request failed" if failed_now else None

    @staticmethod
    def error_bytes(exc: PeerError) -> bytes:
        """Forward has no error message: closing the connection is the answer."""
        return b""

    @staticmethod
    def refusal(limit: int) -> bytes:
        return b""


__all__ = ["TRANSITIONS", "ForwardProtocol"]
