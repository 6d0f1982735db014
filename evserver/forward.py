"""Sans-I/O server side of the Fluentd Forward Protocol v1 (v1.5).

The caller owns the socket; this module only turns bytes into requests and requests into
reply bytes, so the eventlet adapter, tests and benchmarks share one decoder. Usage::

    conn = ForwardConnection(handshake=ForwardHandshake(key, hostname=host))  # or no handshake
    send(conn.data_to_send())                  # HELO, when a handshake is configured
    for data in socket_reads:
        conn.receive_data(data)
        try:
            for request in conn:               # stops when more bytes are needed
                handle(request.events)         # evserver Events: type = tag
                if request.chunk is not None:  # ack only after the events are handed off
                    send(ack_bytes(request.chunk))
        finally:
            send(conn.data_to_send())          # PONG (also the failing one) must go out first
    # at EOF: conn.in_request tells a truncated request from a clean close

Design decisions, and why:

* Handshake: ``ForwardConnection(handshake=...)`` consumes the PING itself. HELO is queued at
  construction and PONG after the PING; both are fetched with ``data_to_send()``. No request is
  returned before the PING verifies. On failure ``next_request`` raises ``HandshakeFailed``
  *after* queueing ``PONG [false, reason, "", ""]``: flush ``data_to_send()``, then close, as
  the spec requires.
* Errors: every ``ProtocolError`` is terminal. msgpack cannot resynchronise a stream once
  framing is lost, so the error is remembered and raised again on every later call, and the
  Unpacker is never used again.
* A non-array request is an error (Fluent Bit closes too). The spec says "SHOULD ignore", but a
  stray scalar almost always means framing was lost. A ``nil`` heartbeat is skipped.
* Invalid single events (record not a map, time not int/float/EventTime) are skipped and counted
  in ``ForwardRequest.skipped``. The request is still returned and acked, as Fluentd does with
  ``skip_invalid_event``, because retrying could never succeed. A bad tag, option or packed
  stream fails the whole request.
* Strings are decoded with ``surrogateescape``. Fluentd sends PackedForward entries as a
  *str32* holding binary msgpack, and Fluent Bit sends a binary *str* PING salt, so strict UTF-8
  would drop real clients. The original bytes come back with
  ``s.encode("utf-8", "surrogateescape")``, and ``ack_bytes`` echoes such a chunk unchanged.
* Map keys are decoded as str or bin (msgpack ``strict_map_key``): int keys built into a dict
  by msgpack would allow hash-flooding with attacker-chosen ints. Fluentd accepts records with
  int keys, though, so the first such key switches the connection to a slower decoder that
  hands msgpack's key/value pairs to ``_text_keys``, which turns every key that is not str or
  bin into its text (``1`` -> ``"1"``) before any dict is built. The decoder is re-fed from
  the start of the request, which is why the connection keeps the bytes of the request in
  progress (``_kept``).
* EventTime (ext type 0) is decoded, wherever it appears (Fluentd's unpacker registers it
  globally too), into integer nanoseconds since the epoch: exact, where a float64 holds only
  about 0.25 us at current epochs, and a plain int, so the hot path pays no more than for the
  float it used to be. In the entry's time, an int of at least ``_NS_FLOOR`` (2**32) is such
  nanoseconds (as seconds it would be after 2106): the event gets float seconds in ``time``
  and the exact value in ``time_ns``. Other int times stay int seconds (an int is a
  valid ``float`` for type checkers). Time 0 or nil becomes "now".
* Tags follow the one rule of event types (``evserver.event.type_problem``), as native events
  do; a tag that breaks it fails the request.
* Entries come out as ``ForwardEvent``s, the ``Event`` handlers receive (type = tag, data =
  record), built once: an intermediate entry object would cost as much again per event.
* Only logs (``fluent_signal`` 0) are interpreted. Request-level ``metadata`` stays in
  ``options``. Only ``gzip`` compression is supported; other values fail the request, because
  guessing would misparse it.
"""

from __future__ import annotations

import struct
import sys
import time as _time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack

from .errors import ConfigError, ForwardError, HandshakeFailed, ProtocolError, RequestTooLarge
from .event import KNOWN_TYPES, Event, decoded, type_problem
from .forward_handshake import ForwardHandshake

__all__ = ["ForwardConnection", "ForwardEvent", "ForwardHandshake", "ForwardRequest",
           "HandshakeFailed", "RequestTooLarge", "ack_bytes", "decode_request"]

_now = _time.time  # module-level so tests can pin "now"
MAX_INVALID_ENTRIES = 1000  # per request; more fail it (see _decode_entries)
_unpack_event_time = struct.Struct(">II").unpack
_UNPACK_ERRORS = (ValueError, msgpack.UnpackException)


class ForwardEvent(Event):
    """An event that arrived over Forward: ``meta`` is the entry's v1.5 metadata plus
    ``"protocol": "forward"``; without metadata that dict is made only when first read."""

    __slots__ = ("_time_ns",)  # set only for an EventTime (``_at_ns``)
    _time_ns: int

    @property
    def time_ns(self) -> int:
        try:
            return self._time_ns
        except AttributeError:  # an int, float or missing time: derived from ``time``
            return Event.time_ns.__get__(self)

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = {"protocol": "forward"}
        return self._meta

    @meta.setter
    def meta(self, value: dict[str, Any]) -> None:
        self._meta = value


class ForwardRequest:
    """One decoded request, i.e. one msgpack array on the wire.

    ``chunk`` is the option exactly as received (str or bytes); when it is not None the client
    waits for ``ack_bytes(chunk)``. ``mode`` is "message", "forward", "packed" or "compressed".
    ``size`` is the encoded size on the wire, for metrics and limits. ``count`` is how many
    requests on the wire this one stands for: ``ForwardConnection.requests`` merges runs of
    Message-mode requests with the same tag and no options.
    """

    __slots__ = ("chunk", "count", "events", "mode", "options", "size", "skipped", "tag")

    def __init__(
        self,
        tag: str,
        events: list[Event],
        chunk: bytes | str | None,
        options: dict[str, Any],
        skipped: int,
        size: int,
        mode: str,
    ) -> None:
        self.tag = tag
        self.events = events
        self.chunk = chunk
        self.options = options
        self.skipped = skipped
        self.size = size
        self.mode = mode
        self.count = 1

    def __repr__(self) -> str:
        return (
            f"ForwardRequest(tag={self.tag!r}, mode={self.mode!r}, events={len(self.events)},"
            f" skipped={self.skipped}, chunk={self.chunk!r}, size={self.size},"
            f" count={self.count})"
        )


#: The smallest entry time read as EventTime nanoseconds: 2**32, past every uint32 of
#: seconds a Forward client sends (year 2106). Only an EventTime in the first 4.3 seconds of
#: 1970 would read as seconds.
_NS_FLOOR = 1 << 32


def _ext_hook(code: int, data: bytes) -> Any:
    """Turn EventTime (ext 0: uint32 BE seconds, uint32 BE nanoseconds) into integer
    nanoseconds since the epoch."""
    if code == 0 and len(data) == 8:
        seconds, nanoseconds = _unpack_event_time(data)
        return seconds * 1_000_000_000 + nanoseconds
    return msgpack.ExtType(code, data)


def _at_ns(tag: str, record: dict[str, Any], ns: int,
           meta: dict[str, Any] | None) -> ForwardEvent:
    """An event whose time came as EventTime: float seconds, and the exact nanoseconds."""
    event = decoded(ForwardEvent, tag, record, ns / 1_000_000_000, meta)
    event._time_ns = ns
    return event


def _text_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A map from msgpack's pairs, every key not str or bin turned into its text first, so no
    attacker-chosen int is ever hashed into a dict."""
    return {k if type(k) is str or type(k) is bytes else str(k): v for k, v in pairs}


_DECODING: dict[str, Any] = {"ext_hook": _ext_hook, "unicode_errors": "surrogateescape"}
# For a peer that sent a non-str map key: slower (a Python call per map), never refused.
_LENIENT: dict[str, Any] = {**_DECODING, "strict_map_key": False,
                            "object_pairs_hook": _text_keys}
_array_header = msgpack.Packer().pack_array_header


def _unpacker(max_buffer_size: int, lenient: bool = False) -> msgpack.Unpacker:
    return msgpack.Unpacker(None, max_buffer_size=max_buffer_size,
                            **(_LENIENT if lenient else _DECODING))


def _bad_map_key(exc: Exception) -> bool:
    """msgpack refused a map key (``strict_map_key``): decode again with ``_LENIENT``."""
    return isinstance(exc, ValueError) and "not allowed for map key" in str(exc)


def _unpack_error(exc: Exception, what: str) -> ForwardError:
    # msgpack reports a str/bin/array longer than the buffer allows as ValueError("... exceeds
    # max_..."): that is a size problem, not a syntax one, so give it the size error code.
    if "exceeds max_" in str(exc):
        return RequestTooLarge(f"{what}: {exc}")
    return ForwardError(f"{what}: malformed msgpack ({exc})")


def _decode_entries(tag: str, items: Iterable[Any]) -> tuple[list[Event], int]:
    """Validate ``[time, record]`` pairs into events; return them and the invalid count.

    More than ``MAX_INVALID_ENTRIES`` invalid ones fail the request: 64 KB of gzip can
    inflate to millions of one-byte non-entries, and skipping them one by one would hold
    the hub for seconds. This is the per-event hot path: exact type checks, no helpers.
    """
    events: list[Event] = []
    append = events.append
    skipped = 0
    for item in items:
        try:
            t, record = item
        except (TypeError, ValueError):
            t = record = None
        if type(record) is dict:
            kind = type(t)
            if kind is int and t >= _NS_FLOOR:
                append(_at_ns(tag, record, t, None))
                continue
            if kind is int or kind is float or t is None:
                append(decoded(ForwardEvent, tag, record, t or _now(), None))
                continue
            if kind is list and 1 <= len(t) <= 2:  # v1.5 [time, {metadata}]
                meta = t[1] if len(t) == 2 else {}
                t = t[0]
                kind = type(t)
                if type(meta) is dict and (kind is int or kind is float or t is None):
                    meta = {**meta, "protocol": "forward"}
                    append(_at_ns(tag, record, t, meta) if kind is int and t >= _NS_FLOOR
                           else decoded(ForwardEvent, tag, record, t or _now(), meta))
                    continue
        skipped += 1
        if skipped > MAX_INVALID_ENTRIES:
            raise ForwardError(f"more than {MAX_INVALID_ENTRIES} invalid entries in one request")
    return events, skipped


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress concatenated gzip members, never producing more than ``limit`` bytes."""
    parts: list[bytes] = []
    room = limit
    try:
        while data:
            inflater = zlib.decompressobj(wbits=31)
            out = inflater.decompress(data, room + 1)  # max_length 0 would mean unlimited
            if len(out) > room:
                raise RequestTooLarge(f"decompressed entries exceed {limit} bytes")
            if not inflater.eof:
                raise ForwardError("gzip entries are truncated")
            parts.append(out)
            room -= len(out)
            data = inflater.unused_data
    except zlib.error as exc:
        raise ForwardError(f"gzip entries are corrupt ({exc})") from exc
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _decode_packed(tag: str, data: bytes, count: Any,
                   lenient: bool = False) -> tuple[list[Event], int]:
    """Decode a MessagePackEventStream (concatenated entries).

    Fluentd and Fluent Bit send the entry count as the ``size`` option: then the stream is
    decoded as one array in one C call, a fifth of the per-event time of pulling entries
    one by one from an Unpacker, which is what a missing or wrong count falls back to.
    A map key that is not str or bin has the stream decoded again, ``lenient``ly.
    """
    if not data:
        return [], 0
    if type(count) is int and 0 < count <= len(data) // 3:  # an entry takes 3 bytes or more
        try:
            items = msgpack.unpackb(_array_header(count) + data,
                                    **(_LENIENT if lenient else _DECODING))
        except _UNPACK_ERRORS as exc:
            if _bad_map_key(exc):
                return _decode_packed(tag, data, count, lenient=True)
        else:
            return _decode_entries(tag, items)
    unpacker = _unpacker(len(data) + 1, lenient)
    unpacker.feed(data)
    try:
        result = _decode_entries(tag, unpacker)
        # tell() also counts a half-parsed trailing entry, so probe with a nil instead: it
        # comes back alone only if the stream ended on an entry boundary.
        unpacker.feed(b"\xc0")
        clean = unpacker.unpack() is None
    except msgpack.OutOfData:
        clean = False
    except _UNPACK_ERRORS as exc:
        if _bad_map_key(exc) and not lenient:
            return _decode_packed(tag, data, None, lenient=True)
        raise _unpack_error(exc, "packed entries") from exc
    if not clean:
        raise ForwardError("packed entries end in the middle of an entry")
    return result


def _options(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if type(value) is not dict:
        raise ForwardError(f"option is a {type(value).__name__}, not a map")
    return value


def decode_request(
    msg: Any, size: int = 0, *, max_decompressed_bytes: int = 64 << 20, lenient: bool = False
) -> ForwardRequest:
    """Decode one already-unpacked request array; the mode follows the second element's type.

    ``lenient``: the connection has sent a map key that is not str or bin; decode packed
    entries with ``_LENIENT`` right away instead of failing over to it.
    """
    if type(msg) is not list:
        raise ForwardError(f"request is a {type(msg).__name__}, not an array")
    n = len(msg)
    if not 2 <= n <= 4:
        raise ForwardError(f"request array has {n} elements")
    tag = msg[0]
    if (problem := type_problem(tag)) is not None:
        raise ForwardError(f"tag {problem}")
    body = msg[1]
    kind = type(body)
    if kind is list or kind is bytes or kind is str:
        if n == 4:
            raise ForwardError("Forward/PackedForward request has 4 elements")
        options = _options(msg[2] if n == 3 else None)
        if kind is list:
            mode = "forward"
            events, skipped = _decode_entries(tag, body)
        else:
            data = body if kind is bytes else body.encode("utf-8", "surrogateescape")
            compressed = options.get("compressed")
            if compressed is None or compressed == "text" or compressed == b"text":
                mode = "packed"
            elif compressed == "gzip" or compressed == b"gzip":
                mode = "compressed"
                data = _gunzip(data, max_decompressed_bytes)
            else:
                raise ForwardError(f"unsupported compression {compressed!r}")
            events, skipped = _decode_packed(tag, data, options.get("size"), lenient)
    else:
        if n == 2:
            raise ForwardError("Message request has no record")
        options = _options(msg[3] if n == 4 else None)
        mode = "message"
        events, skipped = _decode_entries(tag, ((body, msg[2]),))
    chunk = options.get("chunk")
    if chunk is not None and type(chunk) is not str and type(chunk) is not bytes:
        raise ForwardError(f"chunk option is a {type(chunk).__name__}, not a str")
    return ForwardRequest(tag, events, chunk, options, skipped, size, mode)


_ACK_PREFIX = b"\x81\xa3ack"  # fixmap(1), fixstr "ack"


def ack_bytes(chunk: bytes | str) -> bytes:
    """msgpack ``{"ack": chunk}``: str stays str and bin stays bin, byte for byte."""
    return _ACK_PREFIX + msgpack.packb(chunk, use_bin_type=True, unicode_errors="surrogateescape")


class ForwardConnection:
    """Incremental decoder for one connection: feed bytes, pull ``ForwardRequest``s.

    The Unpacker never holds more than ``max_request_bytes`` unparsed bytes, and extra
    received bytes wait in a queue. Many small requests in one large read are therefore fine,
    while a request over the limit fails as soon as its prefix crosses it, even when it
    trickles in a few bytes at a time.
    """

    __slots__ = (
        "_error",
        "_fed",
        "_handshake",
        "_kept",
        "_kept_from",
        "_lenient",
        "_max_decompressed",
        "_max_request",
        "_outgoing",
        "_pending",
        "_pending_len",
        "_start",
        "_unpacker",
    )

    def __init__(
        self,
        *,
        max_request_bytes: int = 8 << 20,
        max_decompressed_bytes: int = 64 << 20,
        handshake: ForwardHandshake | None = None,
    ) -> None:
        if max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes must be positive, got {max_request_bytes}")
        if max_decompressed_bytes < 1:
            raise ConfigError(
                f"max_decompressed_bytes must be positive, got {max_decompressed_bytes}"
            )
        self._max_request = max_request_bytes
        self._max_decompressed = max_decompressed_bytes
        self._unpacker = _unpacker(max_request_bytes)
        self._pending: deque[memoryview] = deque()
        self._pending_len = 0
        self._fed = 0  # bytes handed to the Unpacker so far
        self._start = 0  # stream offset where the current request starts
        self._error: ProtocolError | None = None
        self._lenient = False  # see _relax
        self._kept = bytearray()  # the bytes fed to the Unpacker from offset _kept_from on
        self._kept_from = 0
        self._handshake = handshake
        self._outgoing = bytearray(handshake.helo_bytes() if handshake is not None else b"")

    @property
    def authenticated(self) -> bool:
        """True once requests may flow: no handshake configured, or the PING verified."""
        return self._handshake is None or self._handshake.authenticated

    @property
    def in_request(self) -> bool:
        """True while part of a request is buffered (EOF now would truncate it)."""
        return self._fed + self._pending_len > self._start

    def data_to_send(self) -> bytes:
        """Bytes the protocol wants written (HELO, PONG), cleared once returned."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def receive_data(self, data: bytes | memoryview) -> None:
        """Buffer received bytes; decoding happens in ``requests`` or ``next_request``."""
        if not data or self._error is not None:
            return
        size = len(data)
        if not self._pending and size <= self._room():
            self._unpacker.feed(data)
            self._keep(data)
            self._fed += size
        else:
            self._pending.append(memoryview(bytes(data)))
            self._pending_len += size

    def next_request(self) -> ForwardRequest | None:
        """Return the next complete request, or None if more bytes are needed.

        Raises a ``ProtocolError`` subclass on malformed or oversized input and keeps raising
        it afterwards: the connection must be closed (after flushing ``data_to_send()``).
        """
        if self._error is not None:
            raise self._error
        try:
            if (message := self._next_message()) is None:
                return None
            return decode_request(*message, max_decompressed_bytes=self._max_decompressed,
                                  lenient=self._lenient)
        except ProtocolError as exc:
            self._error = exc
            raise

    def requests(self, max_events: int = 0) -> list[ForwardRequest]:
        """The complete requests buffered now, the fast way a server reads them.

        Runs of Message-mode requests with one tag and no options (fluent-logger's ``emit``)
        come back merged into one request (see ``ForwardRequest.count``): one object per
        event instead of four. With ``max_events`` decoding stops after the request that
        reaches that many events; the next call goes on. Requests before a malformed one
        are returned, and the error is raised by the next call.
        """
        if self._error is not None:
            raise self._error
        out: list[ForwardRequest] = []
        try:
            self._decode(out, max_events or sys.maxsize)
        except ProtocolError as exc:
            self._error = exc
            if not out:
                raise
        return out

    def _decode(self, out: list[ForwardRequest], limit: int) -> None:
        events = 0
        merged: ForwardRequest | None = None  # the open run of merged Message-mode requests
        while events < limit and (message := self._next_message()) is not None:
            msg, size = message
            # Inlined shortcut for the commonest request, Message mode without options.
            if type(msg) is list and len(msg) == 3 and type(tag := msg[0]) is str \
                    and tag in KNOWN_TYPES:
                t, record = msg[1], msg[2]
                kind = type(t)
                if (kind is int or kind is float) and type(record) is dict:
                    event = (_at_ns(tag, record, t, None) if kind is int and t >= _NS_FLOOR
                             else decoded(ForwardEvent, tag, record, t or _now(), None))
                    if merged is None or merged.tag != tag:
                        merged = ForwardRequest(tag, [event], None, {}, 0, size, "message")
                        out.append(merged)
                    else:
                        merged.events.append(event)
                        merged.size += size
                        merged.count += 1
                    events += 1
                    continue
            request = decode_request(msg, size, max_decompressed_bytes=self._max_decompressed,
                                     lenient=self._lenient)
            out.append(request)
            merged = None
            events += len(request.events)

    def __iter__(self) -> Iterator[ForwardRequest]:
        while (request := self.next_request()) is not None:
            yield request

    def _room(self) -> int:
        return self._max_request - (self._fed - self._unpacker.tell())

    def _feed_pending(self) -> bool:
        """Move queued bytes into the Unpacker as far as its cap allows; True if any moved."""
        room = self._room()
        moved = False
        pending = self._pending
        while pending and room > 0:
            view = pending[0]
            if len(view) <= room:
                pending.popleft()
            else:
                pending[0] = view[room:]
                view = view[:room]
            self._unpacker.feed(view)
            self._keep(view)
            n = len(view)
            self._fed += n
            self._pending_len -= n
            room -= n
            moved = True
        return moved

    def _keep(self, data: bytes | memoryview) -> None:
        """Remember bytes fed to the Unpacker, for ``_relax``; those of the requests decoded
        since the last call are dropped first (once per read, not once per request)."""
        done = self._start - self._kept_from
        if done:
            del self._kept[:done]
            self._kept_from = self._start
        self._kept += data

    def _relax(self) -> msgpack.Unpacker:
        """Switch to the lenient decoder, re-fed from the start of the failed request (a
        failed Unpacker cannot go on); return it."""
        rest = bytes(self._kept[self._start - self._kept_from:])
        self._lenient = True
        self._unpacker = _unpacker(self._max_request, lenient=True)
        self._unpacker.feed(rest)
        self._kept = bytearray(rest)
        self._fed, self._start, self._kept_from = len(rest), 0, 0
        return self._unpacker

    def _next_message(self) -> tuple[Any, int] | None:
        """The next request's msgpack value and its size on the wire; None when more bytes
        are needed. Heartbeats are skipped and the handshake's PING is consumed here."""
        unpacker = self._unpacker
        while True:
            try:
                msg = unpacker.unpack()
            except msgpack.OutOfData:
                if self._feed_pending():
                    continue
                # Everything fed since _start belongs to the unfinished request. With bytes
                # still queued the Unpacker is full, so the request needs more than the cap.
                if self._pending or self._fed - self._start > self._max_request:
                    raise RequestTooLarge(
                        f"request exceeds max_request_bytes ({self._max_request})"
                    ) from None
                return None
            except _UNPACK_ERRORS as exc:
                if _bad_map_key(exc) and not self._lenient:
                    unpacker = self._relax()
                    continue
                raise _unpack_error(exc, "request") from exc
            end = unpacker.tell()
            size = end - self._start
            self._start = end
            if size > self._max_request:
                raise RequestTooLarge(
                    f"request of {size} bytes exceeds max_request_bytes ({self._max_request})"
                )
            if msg is None:  # heartbeat
                continue
            handshake = self._handshake
            if handshake is not None and not handshake.authenticated:
                self._outgoing += handshake.verify_ping(msg)
                if handshake.failed:
                    raise HandshakeFailed(handshake.reason)
                continue
            return msg, size
