"""The native wire protocol, sans-I/O: bytes in -> frames out, frames in -> bytes out.

Nothing here touches a socket or eventlet (the h11 model), so the codec is tested on bytes
alone and survives a change of event loop. ``docs/protocol.md`` is the normative description;
this module is its executable form.

Every frame is one msgpack array whose first element is the frame kind. msgpack is
self-delimiting, so there is no length prefix; ``FrameReader`` streams through
``msgpack.Unpacker`` and enforces ``max_frame_bytes`` exactly by measuring each frame with
``Unpacker.tell()``.
"""

from __future__ import annotations

import sys
import time as _time
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

from .errors import FrameTooLarge, ProtocolError, UnsupportedVersion
from .event import KNOWN_TYPES, Event, decoded, type_problem

VERSION = 1

HELLO = 0
EVENT = 1
BATCH = 2
REQUEST = 3
ACK = 4
REPLY = 5
ERROR = 6
PING = 7
PONG = 8

KIND_NAMES = {
    HELLO: "HELLO",
    EVENT: "EVENT",
    BATCH: "BATCH",
    REQUEST: "REQUEST",
    ACK: "ACK",
    REPLY: "REPLY",
    ERROR: "ERROR",
    PING: "PING",
    PONG: "PONG",
}

#: Frame kinds whose body is a list of events.
EVENT_KINDS = frozenset({EVENT, BATCH, REQUEST})

#: Frame kinds each side may receive.
SERVER_RECEIVES = frozenset({HELLO, EVENT, BATCH, REQUEST, PING})
CLIENT_RECEIVES = frozenset({HELLO, ACK, REPLY, ERROR, PONG})

DEFAULT_MAX_FRAME_BYTES = 1 << 20
_CHUNK = 1 << 16  # the most the adapter reads at once
_READ_SIZE = 4096  # a new decoder's buffer: it grows for bigger reads and frames
# Idle readers' decoders by (max_frame_bytes, strict_map_key), for the next reader to take.
_SPARES: dict[tuple[int, bool], list[msgpack.Unpacker]] = {}
_MAX_SPARES = 16
MAX_CORR = (1 << 63) - 1


class Frame:
    """A decoded frame: ``kind``, the correlation id ``corr`` and a kind-specific ``body``.

    ``body`` is a list of ``Event`` for EVENT/BATCH/REQUEST, the reply value for REPLY,
    ``(code, type, message)`` for ERROR, the info map for HELLO and ``None`` otherwise.
    """

    __slots__ = ("body", "corr", "kind")

    def __init__(self, kind: int, corr: int, body: Any = None) -> None:
        self.kind = kind
        self.corr = corr
        self.body = body

    def __repr__(self) -> str:
        kind = KIND_NAMES.get(self.kind, self.kind)
        return f"Frame({kind}, corr={self.corr}, body={self.body!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.kind, self.corr, self.body) == (other.kind, other.corr, other.body)

    __hash__ = None  # type: ignore[assignment]


def weight(frame: Frame) -> int:
    """How much of a job a frame is: its events, or one for a frame without events."""
    return len(frame.body) if frame.kind in EVENT_KINDS else 1


def _bad(msg: str) -> ProtocolError:
    return ProtocolError(msg)


def _event(raw: Any, now: float | None = None) -> Event:
    """Build an Event from its wire form ``[type, data, id?, time?, meta?]``."""
    if type(raw) is list and len(raw) == 2 and type(raw[0]) is str and raw[0] in KNOWN_TYPES:
        return Event(raw[0], raw[1], None, now)  # the common minimal form, checked cheaply
    if type(raw) is not list or not 2 <= len(raw) <= 5:
        raise _bad("an event must be an array [type, data, id?, time?, meta?]")
    etype = raw[0]
    if (problem := type_problem(etype)) is not None:
        raise _bad(f"event type {problem}")
    n = len(raw)
    eid = raw[2] if n > 2 else None
    etime = raw[3] if n > 3 else None
    meta = raw[4] if n > 4 else None
    if eid is not None and (type(eid) is not str or not eid):
        # "" would be kept as the id of every such event: deduplication on it would drop all
        # but the first, so it is refused like any other malformed id.
        raise _bad("event id must be a non-empty string or nil")
    if etime is not None and type(etime) not in (float, int):
        raise _bad("event time must be a number or nil")
    if meta is not None and type(meta) is not dict:
        raise _bad("event meta must be a map or nil")
    return Event(etype, raw[1], eid, now if etime is None else etime, meta)


def _corr(raw: list[Any], *, required: bool) -> int:
    corr = raw[1] if len(raw) > 1 else None
    if type(corr) is not int or not 0 <= corr <= MAX_CORR or (required and corr == 0):
        shown = "nothing" if len(raw) < 2 else repr(corr)[:40]
        raise _bad(f"{KIND_NAMES[raw[0]]} needs a correlation id: an integer from "
                   f"{1 if required else 0} to {MAX_CORR} (2^63-1), got {shown}")
    return corr


# msgpack's words for a map key it refuses, in the protocol's (msgpack's spec) words.
_KEY_NAMES = {"int": "an integer", "float": "a float", "bool": "a boolean", "NoneType": "nil",
              "list": "an array", "tuple": "an array", "dict": "a map", "ExtType": "an ext"}


def _undecodable(exc: Exception) -> ProtocolError:
    """What was wrong with bytes msgpack refused, in the peer's terms, not the decoder's
    (``strict_map_key=True``, or an empty ``FormatError``)."""
    text = str(exc)
    if "is not allowed for map key" in text:
        name = text.split(" is not allowed", 1)[0]
        return _bad(f"a map has {_KEY_NAMES.get(name, name)} key; map keys must be strings")
    if isinstance(exc, msgpack.StackError):
        return _bad("values are nested too deeply to decode")
    if isinstance(exc, msgpack.FormatError):
        return _bad("bytes that are not msgpack (a byte that starts no msgpack value)")
    return _bad("bytes that are not valid msgpack" + (f": {text}" if text else ""))


def _parse(raw: Any, accept: frozenset[int], now: float | None = None) -> Frame:
    """Turn one unpacked msgpack value into a Frame, validating its shape."""
    if type(raw) is not list or not raw or type(raw[0]) is not int:
        raise _bad("a frame must be an array whose first element is the frame kind")
    kind = raw[0]
    if kind not in accept:
        raise _bad(f"unexpected frame kind {kind!r}")
    n = len(raw)
    if kind in (EVENT, REQUEST):
        if n != 3:
            raise _bad(f"{KIND_NAMES[kind]} must be [{kind}, corr, event]")
        return Frame(kind, _corr(raw, required=kind == REQUEST), [_event(raw[2], now)])
    if kind == BATCH:
        if n != 3 or type(raw[2]) is not list:
            raise _bad("BATCH must be [2, corr, [event, ...]]")
        if now is None:
            now = _time.time()
        body: list[Event] = []
        append = body.append
        known = KNOWN_TYPES
        for e in raw[2]:  # the minimal form inlined: this loop is the batch hot path
            if type(e) is list and len(e) == 2 and type(etype := e[0]) is str and etype in known:
                append(decoded(Event, etype, e[1], now, None))
            else:
                append(_event(e, now))
        return Frame(kind, _corr(raw, required=False), body)
    if kind == HELLO:
        if n != 3 or type(raw[1]) is not int or type(raw[2]) is not dict:
            raise _bad("HELLO must be [0, version, {info}]")
        if raw[1] != VERSION:
            raise UnsupportedVersion(f"protocol version {raw[1]} is not supported "
                                     f"(this side speaks {VERSION})")
        return Frame(kind, 0, raw[2])
    if kind == REPLY:
        if n != 3:
            raise _bad("REPLY must be [5, corr, value]")
        return Frame(kind, _corr(raw, required=True), raw[2])
    if kind == ERROR:
        if n < 5 or not all(type(x) is str for x in raw[2:5]):
            raise _bad("ERROR must be [6, corr, code, type, message]")
        return Frame(kind, _corr(raw, required=False), (raw[2], raw[3], raw[4]))
    # ACK, PING, PONG
    if n != 2:
        raise _bad(f"{KIND_NAMES[kind]} must be [{kind}, corr]")
    return Frame(kind, _corr(raw, required=kind != PONG and kind != ACK))


# The frames ``_parse_fast`` decodes inline, with the lowest correlation id each allows.
_FAST_KINDS = {EVENT: 0, REQUEST: 1}


def _parse_fast(raw: Any, accept: frozenset[int], now: float) -> Frame:
    """``_parse`` with a shortcut for the commonest frames: a minimal EVENT or REQUEST."""
    if (type(raw) is list and len(raw) == 3 and type(kind := raw[0]) is int
            and kind in _FAST_KINDS):
        corr, ev = raw[1], raw[2]
        if (type(corr) is int and _FAST_KINDS[kind] <= corr <= MAX_CORR and type(ev) is list
                and len(ev) == 2 and type(ev[0]) is str and ev[0] in KNOWN_TYPES
                and kind in accept):
            return Frame(kind, corr, [decoded(Event, ev[0], ev[1], now, None)])
    return _parse(raw, accept, now)


class FrameReader:
    """Incremental decoder for one direction of one connection.

    Feed it whatever ``recv`` returned with ``receive_data``; iterate it for complete frames.
    After any ``ProtocolError`` the reader is dead (msgpack's ``Unpacker`` must not be reused
    after a failure) and the connection must be closed.

    The ``Unpacker`` (about 41 KiB) exists only while a partial frame is buffered: an idle
    connection holds no decoder, which is what lets one worker keep 10,000 idle peers. An
    idle reader hands its decoder to a few spares shared by the readers of the same limits,
    unless its buffer grew: making a new one costs about as much as decoding a small request.
    """

    __slots__ = ("_accept", "_backlog", "_dead", "_error", "_fed", "_grown", "_max", "_pos",
                 "_spares", "_strict", "_unpacker")

    def __init__(
        self,
        accept: frozenset[int] = SERVER_RECEIVES,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        strict_map_key: bool | None = None,
    ) -> None:
        self._accept = accept
        # From untrusted peers only str/bin map keys (msgpack's default): int keys hash
        # predictably and invite hash flooding. A client trusts its server's replies.
        self._strict = accept is not CLIENT_RECEIVES if strict_map_key is None else strict_map_key
        self._max = max_frame_bytes
        self._unpacker: msgpack.Unpacker | None = None
        self._spares = _SPARES.setdefault((self._max, self._strict), [])
        self._grown = False  # the current unpacker's buffer may have outgrown _READ_SIZE
        self._fed = 0  # bytes fed to the current unpacker
        self._pos = 0  # unpacker offset at the end of the last complete frame
        self._dead = False
        self._error: ProtocolError | None = None  # raised by the next ``frames`` call
        self._backlog: list[memoryview] = []  # input beyond one chunk, fed as frames drain

    @property
    def idle(self) -> bool:
        """Nothing buffered and no error owed: ``frames`` would return [] (checked cheaply)."""
        return self._unpacker is None and self._error is None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return self._fed - self._pos + sum(len(b) for b in self._backlog)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; ``b""`` is ignored (EOF is the adapter's business).

        The caller may pass a view of a reused buffer as long as it drains the frames
        before the next ``recv``. Input larger than one chunk is copied and fed as the
        frames before it drain, so the decoder never holds more than a frame plus a chunk.
        """
        if self._dead:
            raise _bad("the reader failed earlier; the connection must be closed")
        if self._backlog or len(data) > _CHUNK:
            view = memoryview(bytes(data))
            self._backlog.extend(view[i : i + _CHUNK] for i in range(0, len(view), _CHUNK))
            if self._unpacker is not None and self._fed > self._pos:
                return
            data = self._backlog.pop(0)
        self._feed(data)

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._unpacker is None:
            try:  # (servers in other threads share the spares: no test-then-pop)
                self._unpacker = self._spares.pop()
                self._fed = self._pos = self._unpacker.tell()
            except IndexError:
                # Room for one partial frame plus one chunk of the frames after it.
                self._unpacker = msgpack.Unpacker(
                    max_buffer_size=self._max + _CHUNK, read_size=_READ_SIZE,
                    strict_map_key=self._strict,
                )
                self._fed = self._pos = 0
            self._grown = False
        if self._fed - self._pos + len(data) > _READ_SIZE:
            self._grown = True  # msgpack never shrinks a buffer once it has grown
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            self._fail()
            raise FrameTooLarge(f"frame exceeds max_frame_bytes={self._max}") from None
        self._fed += len(data)

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None when more data is needed."""
        unpacker = self._unpacker
        if unpacker is None:
            return None
        try:
            raw = unpacker.unpack()
        except msgpack.OutOfData:
            if self._backlog:
                self._feed(self._backlog.pop(0))
                return self.next_frame()
            if self._fed - self._pos > self._max:
                self._fail()
                raise FrameTooLarge(f"frame exceeds max_frame_bytes={self._max}") from None
            if self._pos == self._fed:
                self._release()
            return None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:  # FormatError, ...
            self._fail()
            raise _undecodable(exc) from None
        pos = unpacker.tell()
        size, self._pos = pos - self._pos, pos
        if size > self._max:
            self._fail()
            raise FrameTooLarge(f"frame of {size} bytes exceeds max_frame_bytes={self._max}")
        try:
            return _parse(raw, self._accept)
        except ProtocolError:
            self._fail()
            raise

    def frames(self, *, coalesce: int = 0, max_events: int = 0) -> list[Frame]:
        """Every complete frame buffered now; the fast path the server uses.

        While the undecoded bytes are fewer than ``max_frame_bytes`` no frame among them can
        exceed the limit, so frames are decoded in one loop without measuring each one.
        With ``coalesce=N``, up to N consecutive fire-and-forget EVENT frames come back as
        one ``BATCH`` with corr 0, which means the same and saves a frame object per event.
        With ``max_events=M`` decoding stops after the frame that brings the count of events
        (other frames count one) to M, and the next call goes on from there: a caller that
        dispatches each slice before decoding the next reuses memory that is still in cache,
        instead of holding a whole read's events at once.

        Frames before a malformed one are returned; the error is raised by the next call,
        so a peer's valid requests are answered before its connection is closed.
        """
        if self._error is not None:
            raise self._error
        out: list[Frame] = []
        try:
            self._decode(out, coalesce, max_events)
        except ProtocolError as exc:
            if not out:
                raise
            self._error = exc
        return out

    def _decode(self, out: list[Frame], coalesce: int, max_events: int) -> None:
        """``frames``' loop: append to ``out`` until the buffer or the event budget ends."""
        accept = self._accept
        known = KNOWN_TYPES
        fast = coalesce and EVENT in accept
        limit = max_events or sys.maxsize
        count = 0
        while (unpacker := self._unpacker) is not None:
            if self._fed - self._pos > self._max:
                frame = self.next_frame()  # measure frame by frame near the limit
                if frame is None:
                    return
                out.append(frame)
                count += weight(frame)
                if count >= limit:
                    return
                continue
            now = _time.time()
            tell = unpacker.tell
            pos = self._pos
            batch: list[Event] | None = None  # the open coalesced fire-and-forget batch
            try:
                for raw in unpacker:
                    pos = tell()  # after a partial frame tell() counts its bytes too
                    # Inlined shortcut for the commonest frame, [1, 0, [type, data]] (a
                    # fire-and-forget minimal event): no Frame per event when coalescing.
                    if (fast and type(raw) is list and len(raw) == 3 and raw[0] == EVENT
                            and type(raw[0]) is int and raw[1] == 0 and type(raw[1]) is int
                            and type(ev := raw[2]) is list and len(ev) == 2
                            and type(etype := ev[0]) is str and etype in known):
                        event: Event | None = decoded(Event, etype, ev[1], now, None)
                    else:
                        frame = _parse_fast(raw, accept, now)
                        event = frame.body[0] if (
                            coalesce and frame.kind == EVENT and not frame.corr) else None
                        if event is None:
                            batch = None  # keep frames in order: a later event starts anew
                            out.append(frame)
                            count += weight(frame)
                    if event is not None:
                        if batch is None or len(batch) >= coalesce:
                            batch = []
                            out.append(Frame(BATCH, 0, batch))
                        batch.append(event)
                        count += 1
                    if count >= limit:
                        self._pos = pos
                        return
            except ProtocolError:
                self._fail()
                raise
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                self._fail()
                raise _undecodable(exc) from None
            self._pos = pos
            if self._backlog:
                self._feed(self._backlog.pop(0))
                continue
            if self._pos == self._fed:
                self._release()
            return

    def take_buffered(self) -> bytes:
        """Remove and return the bytes received after the last complete frame.

        For handing a stream over to another reader: the connection's handshake reads with
        a small limit, then passes whatever the client pipelined behind its HELLO on. Call it
        only right after a frame was returned (mid-frame, msgpack has consumed a prefix).
        """
        rest = b""
        if self._unpacker is not None and self._fed > self._pos:
            rest = self._unpacker.read_bytes(self._fed - self._pos)
        rest += b"".join(bytes(b) for b in self._backlog)
        self._backlog.clear()
        self._unpacker = None
        self._fed = self._pos = 0
        return rest

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames())

    def _release(self) -> None:
        """Idle: hand the decoder (every byte fed is consumed) to the spares, or drop it."""
        unpacker, self._unpacker = self._unpacker, None
        if not self._grown and len(self._spares) < _MAX_SPARES:
            self._spares.append(unpacker)

    def _fail(self) -> None:
        self._dead = True
        self._unpacker = None


# ---------------------------------------------------------------------------- encoding

# A reusable Packer: ``msgpack.packb`` makes (and frees) a new one, with a 256 KiB buffer,
# per call, which costs more than encoding a small reply. Whoever pops it owns it, so two
# users never share it, whatever threads or green threads (a value's own Python code, such
# as a dict subclass's ``items``, may switch them mid-pack); the others use ``packb``.
_PACKER_BUFFER = 256 * 1024  # msgpack's initial buffer, which it grows and never shrinks
_PACKERS = [msgpack.Packer(use_bin_type=True)]


def _pack(obj: Any) -> bytes:
    try:
        packer = _PACKERS.pop()
    except IndexError:
        return msgpack.packb(obj, use_bin_type=True)
    out = b""
    try:
        out = packer.pack(obj)
        return out
    finally:
        # One that grew (or failed, maybe after growing) is replaced: it would keep the
        # memory of the largest value it ever packed for the life of the process.
        _PACKERS.append(packer if 0 < len(out) <= _PACKER_BUFFER
                        else msgpack.Packer(use_bin_type=True))


_pack_array_header = msgpack.Packer().pack_array_header
_BATCH_HEAD = _pack_array_header(3) + _pack(BATCH)


def event_wire(
    type: str,
    data: Any,
    id: str | None = None,
    time: float | None = None,
    meta: dict[str, Any] | None = None,
) -> list[Any]:
    """The wire form of one event, with trailing nils dropped to save bytes."""
    if meta:
        return [type, data, id, time, meta]
    if time is not None:
        return [type, data, id, time]
    if id is not None:
        return [type, data, id]
    return [type, data]


def encode_hello(info: dict[str, Any]) -> bytes:
    return _pack([HELLO, VERSION, info])


def encode_event(corr: int, event: Sequence[Any], *, request: bool = False) -> bytes:
    """EVENT (or REQUEST with ``request=True``) carrying one ``event_wire`` list."""
    return _pack([REQUEST if request else EVENT, corr, event])


def encode_batch(corr: int, events: Sequence[Sequence[Any]]) -> bytes:
    return _pack([BATCH, corr, events])


def pack_event(event: Sequence[Any]) -> bytes:
    """One ``event_wire`` list on its own, for ``encode_batch_packed``."""
    return _pack(event)


def encode_batch_packed(corr: int, packed: Sequence[bytes]) -> bytes:
    """BATCH from ``pack_event`` outputs: a sender can bound a frame's size as it fills it
    without encoding its events twice."""
    return b"".join((_BATCH_HEAD, _pack(corr), _pack_array_header(len(packed)), *packed))


def encode_ack(corr: int) -> bytes:
    return _pack([ACK, corr])


def encode_reply(corr: int, value: Any) -> bytes:
    """REPLY; raises ``TypeError`` when the value has no msgpack form."""
    return _pack([REPLY, corr, value])


def encode_error(corr: int, code: str, type: str, message: str) -> bytes:
    return _pack([ERROR, corr, code, type, message])


def encode_ping(corr: int) -> bytes:
    return _pack([PING, corr])


def encode_pong(corr: int) -> bytes:
    return _pack([PONG, corr])
