"""The frame-level work proton 0.40's engine leaves undone, done on the bytes around it.

Two things a router must carry that proton's engine cannot:

- **Attach fields it drops.** Proton neither decodes nor encodes a link's offered- and
  desired-capabilities, nor its source's default-outcome (``pn_do_attach`` skips them and the
  attach it writes has nulls there). Clients use them: Qpid JMS asks for
  ``DELAYED_DELIVERY`` and ``SHARED-SUBS`` through desired-capabilities, and a broker says
  what a link supports through offered-capabilities.
- **Flow echo.** A peer may set ``echo`` on a flow to ask for our link's flow state. Proton
  ignores the flag and has no call that sends a flow for a given link, so it never answers.

So each engine walks the bytes on both sides of proton:

- :class:`FrameReader` walks what the peer sends, before proton sees it. It keeps the
  dropped attach fields of each attach that has any, which link each of the peer's
  (channel, handle) pairs names, and the flows that ask for an echo;
- :class:`FrameWriter` walks what proton writes. It knows which (channel, handle) each of
  our links has, re-encodes an attach it has been asked to complete, and puts extra frames
  (our echo answers, built in ``echo.py``) at a given place in proton's output.

Only frame headers are read (a size, a data offset, a type and a channel, as in AMQP 1.0
§2.3), plus the two bytes that tell a flow's field count. The few frames that matter
(attach, detach, end, and a flow that may carry echo) are decoded and encoded by proton's
own codec (``Data``). Every other frame is skipped by its size, so the walk costs a few
bytecodes per frame on the message path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from cproton_ffi import ffi, lib
from proton import Data, Described, ulong

# Performatives (AMQP 1.0 §2.7), by the code of their descriptor.
ATTACH = 0x12
FLOW = 0x13
TRANSFER = 0x14
_DISPOSITION = 0x15
DETACH = 0x16
END = 0x17
_DESCRIPTORS = {code: ulong(code) for code in (ATTACH, FLOW, DETACH, END)}
# Positions in the attach, flow and source lists (§2.7.3, §2.7.4, §3.5.3).
_NAME = 0
_HANDLE = 1
_ROLE = 2
_SOURCE = 5
_UNSETTLED = 7
_INCOMPLETE_UNSETTLED = 8
_OFFERED = 11
_DESIRED = 12
_DEFAULT_OUTCOME = 8
_ADDRESS = 0
_DYNAMIC = 4
_SOURCE_DESCRIPTOR = ulong(0x28)
FLOW_HANDLE = 4
_FLOW_DELIVERY_COUNT = 5
_FLOW_LINK_CREDIT = 6
_FLOW_ECHO = 9
# A frame header: size (4 bytes), data offset in 4-byte words, type (0 for AMQP), channel.
_HEADER = 8
_frame_header = struct.Struct(">IBBH").unpack_from
# A flow body: the descriptor (3 bytes), then its list: list0 (0x45, no fields), list8
# (0xc0, size and count one byte each) or list32 (0xd0, four bytes each).
_LIST8 = 0xC0
_LIST32 = 0xD0
_FLOW_TELLS = 12  # body bytes enough to read any flow's field count
# Protocol headers ("AMQP" and 4 version bytes) come first and again after SASL; at a frame
# boundary they read as a frame of 0x414D5150 bytes, which no frame size limit allows.
_PROTOCOL = int.from_bytes(b"AMQP", "big")
# The most bytes it can take to tell a frame of interest from its start: a header of 255
# words and the first bytes of a flow body.
_TELLS = 255 * 4 + _FLOW_TELLS
# Looking at a flow costs 4 µs (its echo flag, through proton's C codec) to 20 µs (all its
# fields, through proton's Python codec), against 1-2 µs for proton to take it, so a guest
# sending nothing but long flows could make the loop that serves every guest several times
# dearer to run. A read of 64 KiB holds some 1500 such flows; an honest peer asks for an echo
# a few times per link at most. Past this many flows looked at in one read, the rest are
# walked past unread.
FLOW_DECODES_PER_READ = 32
# Deliveries the dispositions of one read may name, all of its frames together. Proton posts
# an event for every delivery held in a disposition's range, for every frame (it drops only
# an event repeating the one just before), all while the read is pushed: 1000 frames of 22
# bytes over 1000 held deliveries made a million events, 170 MB and seconds of the loop that
# serves every guest. A guest settling one by one names one per frame, some 9,000 in a read
# at most; one settling in ranges names what it holds, at most max_unsettled_per_link
# (10,000) a link.
DISPOSITION_SPAN_PER_READ = 1 << 16
# Dispositions of one read taken as naming one delivery each, unread: reading what each
# names costs about 1 µs, and a guest settling as it receives sends one or a few a read.
# Past this many, all of the read's are read. Those few can name at most this many times
# what a session holds: bounded by max_unsettled_per_link, a few MB of proton's events.
DISPOSITIONS_UNREAD = 8
_UINT0, _SMALLUINT, _UINT, _NULL, _BOOLEAN = 0x43, 0x52, 0x70, 0x40, 0x56
# Values a frame may hold for the walker to decode it into Python objects (about 0.7 µs
# each): an attach carries some tens. One a guest filled with 65,000 nested empty lists
# cost 45 ms a decode, up to four per attach (its own, our copy of it, each walked on both
# engines), and ends and detaches, which carry an error's info map, come at no rate limit:
# a guest sending those held the loop for its neighbours. Past this many the frame is left
# as proton wrote and read it: an attach's dropped fields are not carried, its link is not
# noted for echo answers.
MAX_DECODED_VALUES = 512
_COMPOUND = frozenset({Data.DESCRIBED, Data.ARRAY, Data.LIST, Data.MAP})
# An attach is a few hundred bytes; one with kilobytes of filters or properties still fits.
# A bigger frame is left as proton wrote it (proton itself refuses what exceeds
# max-frame-size).
MAX_DECODED = 1 << 20


@dataclass(frozen=True, slots=True)
class LinkExtras:
    """The attach fields proton drops, as proton's codec decodes them (None: absent)."""

    offered: Any = None
    desired: Any = None
    default_outcome: Any = None
    # A source with neither an address nor dynamic set, which proton takes for no source at
    # all (every sender of proton's own clients attaches one), with all its fields.
    source: Any = None
    # A resumed link's unsettled map and incomplete-unsettled flag (§2.6.13). Proton's engine
    # resumes nothing itself: a delivery the peer resends on it arrives as a new one, a
    # duplicate that at-least-once allows; the peer still decides from the map.
    unsettled: Any = None
    incomplete_unsettled: Any = None


LinkKey = tuple[str, bool]  # (link name, role: True for a receiver), as in the attach frame
Where = tuple[int, int]  # (channel, handle) of a link, in one direction


class PeerFlow(NamedTuple):
    """A flow the peer sent for a link, decoded."""

    where: Where
    delivery_count: int  # 0 when absent, as proton takes it
    link_credit: int
    echo: bool


# What a walk stops at (besides attach, detach and end frames).
ECHO_FLOWS = 0  # flows that may carry echo (more than nine fields)
EVERY_FLOW = 1
EVERY_FRAME = 2  # every AMQP frame with a body


def _next_frame(
    buf: Any, pos: int, end: int, stop: int, dispositions: list[int] | None = None
) -> tuple[int, int]:
    """Walk whole frames from the boundary at ``pos``: (start, size) of the first frame of
    interest, or (boundary, 0) where the walk stopped: at or past ``end``, or before ``end``
    at a frame whose start is too short to tell. With ``dispositions``, the start of each
    disposition walked past is added to it.

    Of interest: attach, detach, end, and flows or frames as ``stop`` says. The message
    path: a struct unpack and a few comparisons per frame. A body starts with a descriptor
    that proton and every peer we know write as the smallulong ``00 53 xx``; a peer writing
    the 8-byte or the symbolic form would just not have its attach fields carried nor its
    echo answered.
    """
    while pos < end:
        if end - pos < _HEADER:
            return pos, 0
        size, doff, ftype, _ = _frame_header(buf, pos)
        if size == _PROTOCOL:
            pos += _HEADER
            continue
        if size < _HEADER:  # not a frame: proton ends the connection; stop walking this read
            return end, 0
        body = pos + 4 * doff
        if ftype == 0 and size > 4 * doff:  # an AMQP frame with a body, not a heartbeat
            if body + 3 > end:
                return pos, 0
            code = buf[body + 2]
            # Transfers and dispositions, nearly every frame, leave at the first test.
            if TRANSFER <= code <= _DISPOSITION or buf[body + 1] != 0x53 or buf[body]:
                if code == _DISPOSITION and dispositions is not None and not buf[body]:
                    dispositions.append(pos)
                if stop == EVERY_FRAME:
                    return pos, size
                pos += size
                continue
            if code == FLOW and stop == ECHO_FLOWS:
                if body + _FLOW_TELLS > end and pos + size > end:
                    return pos, 0
                if _flow_fields(buf, body + 3) > _FLOW_ECHO:
                    return pos, size
            elif code in _DESCRIPTORS or stop == EVERY_FRAME:
                return pos, size
        pos += size
    return pos, 0


def _disposition_span(buf: Any, pos: int, end: int) -> int:
    """How many delivery-ids the disposition frame at ``pos`` names: last - first + 1 (one
    when it has no last, or its fields are not all in ``buf`` before ``end``). Read from
    the bytes (role, first, last: a boolean and two uints), not decoded."""
    size, doff = _frame_header(buf, pos)[:2]
    at, end = pos + 4 * doff + 3, min(end, pos + size)
    if at + 3 > end:
        return 1
    kind = buf[at]
    if kind == _LIST8:
        count, at = buf[at + 2], at + 3
    elif kind == _LIST32 and at + 9 <= end:
        count, at = int.from_bytes(buf[at + 5 : at + 9], "big"), at + 9
    else:
        return 1
    if count < 3 or at >= end:
        return 1
    at += 2 if buf[at] == _BOOLEAN else 1  # role
    first, at = _uint_at(buf, at, end)
    last, at = _uint_at(buf, at, end)
    if first is None or last is None:
        return 1
    return ((last - first) & 0xFFFFFFFF) + 1


def _uint_at(buf: Any, at: int, end: int) -> tuple[int | None, int]:
    """The uint encoded at ``at`` and where the next value starts; None for null or what
    does not fit before ``end``."""
    if at >= end:
        return None, at
    kind = buf[at]
    if kind == _UINT0:
        return 0, at + 1
    if kind == _SMALLUINT and at + 2 <= end:
        return buf[at + 1], at + 2
    if kind == _UINT and at + 5 <= end:
        return int.from_bytes(buf[at + 1 : at + 5], "big"), at + 5
    return None, at + 1


def _flow_fields(buf: Any, at: int) -> int:
    """How many fields a flow's list has, from its constructor at ``at``."""
    kind = buf[at]
    if kind == _LIST8:
        return buf[at + 2]
    if kind == _LIST32:
        return int.from_bytes(buf[at + 5 : at + 9], "big")
    return 0


_probe = lib.pn_data(16)  # reused: the reader runs on the loop's one thread
_PN_BOOL = lib.PN_BOOL


_PN_UINT = lib.PN_UINT


def _flow_state(frame: Any) -> PeerFlow | None:
    """The link state a whole flow frame gives (its channel and handle, delivery-count,
    link-credit, echo), read with proton's C codec and nothing else of it: decoding a
    flow's fields into Python objects costs 20 µs, and 45 ms for one whose properties hold
    65,000 empty lists, which a guest may send four to a read. None for a session's flow
    (no handle: echo asks for link state, so there is none to give) or one proton will
    refuse."""
    body = bytes(frame[4 * frame[4] :])
    probe = _probe
    lib.pn_data_clear(probe)
    if lib.pn_data_decode(probe, ffi.from_buffer(body), len(body)) < 0:
        return None  # proton's own decoding of it ends the connection
    lib.pn_data_rewind(probe)
    lib.pn_data_next(probe)  # the described value
    lib.pn_data_enter(probe)
    lib.pn_data_next(probe)  # its descriptor
    lib.pn_data_next(probe)  # its list
    lib.pn_data_enter(probe)
    fields: list[Any] = []
    while len(fields) <= _FLOW_ECHO and lib.pn_data_next(probe):
        kind = lib.pn_data_type(probe)
        if kind == _PN_UINT:
            fields.append(lib.pn_data_get_uint(probe))
        elif kind == _PN_BOOL:
            fields.append(bool(lib.pn_data_get_bool(probe)))
        else:
            fields.append(None)
    handle = _field(fields, FLOW_HANDLE)
    if handle is None:
        return None
    return PeerFlow(
        (channel_of(frame), handle),
        _field(fields, _FLOW_DELIVERY_COUNT) or 0,
        _field(fields, _FLOW_LINK_CREDIT) or 0,
        _field(fields, _FLOW_ECHO) is True,
    )


def channel_of(frame: Any) -> int:
    """The channel a whole frame travels on."""
    return _frame_header(frame, 0)[3]


class PlainData(Data):
    """Proton's ``Data``, whose binary values come out as bytes. Proton's own are views of
    its buffer: gone with the ``Data``, and unhashable, so a map keyed by them (a resumed
    attach's unsettled map, keyed by delivery tags) could not be decoded at all."""

    get_mappings = {**Data.get_mappings, Data.BINARY: lambda data: bytes(data.get_binary())}


def _few_values(data: Data, limit: int) -> bool:
    """Whether what ``data`` holds (decoded by proton's C codec, rewound) is at most
    ``limit`` values in all: its tree walked, and the walk stopped past ``limit``."""
    count = depth = 0
    while True:
        if data.next() is not None:
            count += 1
            if count > limit:
                return False
            if data.type() in _COMPOUND:
                data.enter()
                depth += 1
        elif depth:
            data.exit()
            depth -= 1
        else:
            return True


def decode(frame: Any) -> tuple[int, list[Any]] | None:
    """(performative code, fields) of a whole frame, or None if proton cannot decode it as
    one of the performatives walked here (proton's own decoding of the same frame then ends
    the connection with the error), or it holds more than ``MAX_DECODED_VALUES`` values."""
    data = PlainData()
    try:
        data.decode(bytes(frame[4 * frame[4] :]))
        data.rewind()
        if not _few_values(data, MAX_DECODED_VALUES):
            return None
        data.rewind()
        data.next()
        described = data.get_object()
    except Exception:  # proton's codec raises several error types; all mean "undecodable"
        return None
    if not isinstance(described, Described) or not isinstance(described.value, list):
        return None
    code = int(described.descriptor) if isinstance(described.descriptor, ulong) else -1
    if _DESCRIPTORS.get(code) is None:
        return None
    return code, described.value


def encode(code: int, channel: int, fields: list[Any]) -> bytes:
    """A whole AMQP frame on ``channel`` carrying performative ``code`` with ``fields``."""
    data = Data()
    data.put_object(Described(_DESCRIPTORS[code], fields))
    body = data.encode()
    header = (_HEADER + len(body)).to_bytes(4, "big") + bytes((2, 0)) + channel.to_bytes(2, "big")
    return header + body


def _handle(fields: list[Any], index: int) -> int | None:
    value = _field(fields, index)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


class _LinkTable:
    """Which link each (channel, handle) of one direction names, kept from the attach,
    detach and end frames of that direction, so it is exact and as large as the live links."""

    __slots__ = ("by_key", "by_where")

    def __init__(self) -> None:
        self.by_where: dict[Where, LinkKey] = {}
        self.by_key: dict[LinkKey, Where] = {}

    def note(self, code: int, channel: int, fields: list[Any]) -> None:
        if code == ATTACH:
            handle = _handle(fields, _HANDLE)
            if handle is None or not isinstance(fields[_NAME], str) or len(fields) <= _ROLE:
                return
            key = (fields[_NAME], bool(fields[_ROLE]))
            self._forget((channel, handle))
            self.by_where[(channel, handle)] = key
            self.by_key[key] = (channel, handle)
        elif code == DETACH:
            handle = _handle(fields, 0)
            if handle is not None:
                self._forget((channel, handle))
        elif code == END:
            for where in [w for w in self.by_where if w[0] == channel]:
                self._forget(where)

    def _forget(self, where: Where) -> None:
        key = self.by_where.pop(where, None)
        if key is not None and self.by_key.get(key) == where:
            del self.by_key[key]


class FrameReader:
    """Walks a peer's bytes: the dropped attach fields, the peer's links, its echo flows."""

    __slots__ = (
        "_budget",
        "_held",
        "_skip",
        "disposition_limit",
        "disposition_span",
        "flows",
        "flows_skipped",
        "found",
        "links",
        "stop",
    )

    def __init__(self) -> None:
        self._skip = 0  # bytes of the current frame still to pass
        self._held = bytearray()  # the start of a frame split across reads
        self.found: dict[LinkKey, LinkExtras] = {}
        self.links = _LinkTable()
        # Flows that ask for an echo; every flow while ``stop`` is EVERY_FLOW (an echo
        # answer is due, and the peer's later flows change what it must say).
        self.flows: list[PeerFlow] = []
        self.stop = ECHO_FLOWS
        self.flows_skipped = False  # some flows went unread (FLOW_DECODES_PER_READ)
        self._budget = FLOW_DECODES_PER_READ
        # The most delivery-ids the dispositions of one read may name (a guest's reader:
        # DISPOSITION_SPAN_PER_READ; 0: not counted), and how many the last read's named.
        self.disposition_limit = 0
        self.disposition_span = 0

    def feed(self, data: Any) -> None:
        """Walk bytes the peer sent (call before pushing them into proton)."""
        end = len(data)
        self._budget = FLOW_DECODES_PER_READ
        dispositions: list[int] | None = [] if self.disposition_limit else None
        pos = self._feed_held(data) if self._held else self._skip
        while pos < end:
            pos, size = _next_frame(data, pos, end, self.stop, dispositions)
            if not size:
                if pos < end:  # a frame start split across reads
                    self._held += data[pos:]
                    pos = end
                break
            if size > MAX_DECODED:
                pos += size
            elif pos + size > end:  # a frame of interest split across reads
                self._held += data[pos:]
                pos = end
            else:
                self._keep(data[pos : pos + size])
                pos += size
        self._skip = pos - end
        if dispositions is not None:
            self.disposition_span = (
                sum(_disposition_span(data, at, end) for at in dispositions)
                if len(dispositions) > DISPOSITIONS_UNREAD
                else len(dispositions)
            )

    def _feed_held(self, data: Any) -> int:
        """Complete the frame start held from the last read; the offset in ``data`` after
        that frame (past the end when it goes on)."""
        held = self._held
        had = len(held)
        joined = held + data[:_TELLS]
        pos, size = _next_frame(joined, 0, len(joined), self.stop)
        if pos == 0 and not size:  # still too short to tell
            held += data
            return len(data)
        if pos == 0 and size <= MAX_DECODED:  # a frame of interest
            if had + len(data) < size:
                held += data
                return len(data)
            self._keep(held + data[: size - had])
        self._held = bytearray()
        size = _frame_header(joined, 0)[0]
        # (Not a frame at all: proton ends the connection; walk on from here.)
        return max(_HEADER if size == _PROTOCOL else size, had) - had

    def _keep(self, frame: Any) -> None:
        if frame[4 * frame[4] + 2] == FLOW:
            if self._budget <= 0:
                self.flows_skipped = True
                return
            self._budget -= 1
            flow = _flow_state(frame)
            if flow is None or (self.stop == ECHO_FLOWS and not flow.echo):
                return  # a session's flow, or a long one without echo
            self.flows.append(flow)
            if flow.echo:
                self.stop = EVERY_FLOW
            return
        decoded = decode(frame)
        if decoded is None:
            return
        code, fields = decoded
        self.links.note(code, channel_of(frame), fields)
        if code != ATTACH or len(fields) <= _ROLE or not isinstance(fields[_NAME], str):
            return
        dropped = _source_dropped(fields)
        if len(fields) <= _UNSETTLED and not _source_outcome(fields) and dropped is None:
            return
        extras = LinkExtras(
            offered=_field(fields, _OFFERED),
            desired=_field(fields, _DESIRED),
            default_outcome=_source_outcome(fields),
            source=dropped,
            unsettled=_field(fields, _UNSETTLED),
            incomplete_unsettled=_field(fields, _INCOMPLETE_UNSETTLED) or None,
        )
        if extras != LinkExtras():
            self.found[(fields[_NAME], bool(fields[_ROLE]))] = extras

    def take(self, key: LinkKey) -> LinkExtras | None:
        """The dropped fields of the peer's attach for ``key``, once."""
        return self.found.pop(key, None) if self.found else None


class FrameWriter:
    """Walks the bytes proton writes: completes the attach frames it was asked to, keeps
    which (channel, handle) each of our links has, and puts extra frames in.

    Positions are counted in proton's output from its head (what the next peek returns
    first), before any of these edits.
    """

    __slots__ = ("_next", "edits", "links", "pending", "staged", "staged_pos")

    def __init__(self) -> None:
        self._next = 0  # where the next unexamined frame starts
        self.pending: dict[LinkKey, LinkExtras] = {}
        self.links = _LinkTable()
        # (position, proton bytes replaced, bytes to send instead), in position order.
        self.edits: list[tuple[int, int, bytes]] = []
        # An edit being sent; replaced, never resized, because a caller may still hold a
        # view of it.
        self.staged = b""
        self.staged_pos = 0

    def complete(self, key: LinkKey, extras: LinkExtras) -> None:
        """Fill in ``extras`` when our attach for ``key`` goes out."""
        self.pending[key] = extras

    def insert(self, frame: bytes, at: int) -> None:
        """Send ``frame`` after the first ``at`` bytes of proton's output (at or after every
        other edit)."""
        self.edits.append((at, 0, frame))

    def sendable(self, out: Any, more: Any) -> int:
        """How much of ``out`` (proton's output head) may go out as it is: up to the next
        edit or the first frame not yet examined in whole. ``more(n)`` returns ``n`` bytes
        of proton's output, or None, for a frame of interest longer than ``out``."""
        self.scan(out, more)
        edge = min(self._next, len(out))
        return min(self.edits[0][0], edge) if self.edits else edge

    def head_edit(self) -> tuple[int, bytes] | None:
        """Take the edit due at the head of proton's output, if there is one: (how many of
        proton's bytes it replaces, the bytes to send instead)."""
        if not self.edits or self.edits[0][0]:
            return None
        _, size, new = self.edits.pop(0)
        return size, new

    def scan(self, out: Any, more: Any, frames: list[tuple[int, Any]] | None = None) -> None:
        """Examine the frames of ``out`` not yet examined. With ``frames``, every frame
        walked is added to it as (position, the frame for a flow, else (its code, channel))."""
        end = len(out)
        pos = self._next
        stop = ECHO_FLOWS if frames is None else EVERY_FRAME
        while pos < end:
            at, size = _next_frame(out, pos, end, stop)
            if not size:
                pos = at
                break
            if size > MAX_DECODED:
                pos = at + size
                continue
            if at + size <= end:
                frame = out[at : at + size]
            elif at == 0:
                frame = more(size)
            else:
                frame = None
            if frame is None:
                pos = at
                break
            self._examine(at, frame, frames)
            pos = at + size
        self._next = pos

    def _examine(self, at: int, frame: Any, frames: list[tuple[int, Any]] | None) -> None:
        code = frame[4 * frame[4] + 2] if len(frame) > 4 * frame[4] + 2 else -1
        if frames is not None:
            frames.append((at, bytes(frame) if code == FLOW else (code, channel_of(frame))))
        if code not in (ATTACH, DETACH, END):
            return
        decoded = decode(frame)
        if decoded is None:
            return
        code, fields = decoded
        self.links.note(code, channel_of(frame), fields)
        if code == ATTACH and self.pending:
            extras = self.pending.pop((fields[_NAME], bool(fields[_ROLE])), None)
            if extras is not None:
                self.edits.append((at, len(frame), _completed(frame, fields, extras)))
                self.edits.sort(key=lambda edit: edit[0])

    def popped(self, n: int) -> None:
        """``n`` of proton's output bytes went out (or were replaced)."""
        self._next -= n
        if self.edits:
            self.edits = [(at - n, size, new) for at, size, new in self.edits]


def _completed(frame: Any, fields: list[Any], extras: LinkExtras) -> bytes:
    """Our attach ``frame`` re-encoded with the fields proton dropped."""
    fields.extend([None] * (_DESIRED + 1 - len(fields)))
    fields[_OFFERED] = extras.offered
    fields[_DESIRED] = extras.desired
    fields[_UNSETTLED] = extras.unsettled
    fields[_INCOMPLETE_UNSETTLED] = extras.incomplete_unsettled
    if fields[_SOURCE] is None:
        fields[_SOURCE] = extras.source
    source = fields[_SOURCE]
    if extras.default_outcome is not None and isinstance(source, Described):
        terms = list(source.value)
        terms.extend([None] * (_DEFAULT_OUTCOME + 1 - len(terms)))
        terms[_DEFAULT_OUTCOME] = extras.default_outcome
        fields[_SOURCE] = Described(source.descriptor, terms)
    data = Data()
    data.put_object(Described(_DESCRIPTORS[ATTACH], fields))
    body = data.encode()
    head = 4 * frame[4]
    return (head + len(body)).to_bytes(4, "big") + bytes(frame[4:head]) + body


def _field(fields: list[Any], index: int) -> Any:
    return fields[index] if len(fields) > index else None


def _source_terms(fields: list[Any]) -> list[Any] | None:
    """The fields of the attach's source, if it has one."""
    source = _field(fields, _SOURCE)
    if not isinstance(source, Described) or source.descriptor != _SOURCE_DESCRIPTOR:
        return None
    return source.value if isinstance(source.value, list) else None


def _source_outcome(fields: list[Any]) -> Any:
    """The source's default-outcome, if the attach has a source that names one."""
    terms = _source_terms(fields)
    return _field(terms, _DEFAULT_OUTCOME) if terms is not None else None


def _source_dropped(fields: list[Any]) -> Any:
    """The attach's source, whole, if proton's engine will take it for none: one with
    neither an address nor dynamic set (pn_do_attach, proton 0.40)."""
    terms = _source_terms(fields)
    if terms is None or _field(terms, _ADDRESS) is not None or _field(terms, _DYNAMIC):
        return None
    return fields[_SOURCE]
