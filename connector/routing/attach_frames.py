"""The attach fields proton's engine drops, read from the peer's attach frames and written into
ours.

Proton 0.40 neither decodes nor encodes three attach fields: the link's offered-capabilities
and desired-capabilities, and its source's default-outcome (``pn_do_attach`` skips them and
the attach it writes has nulls there). Clients use them: Qpid JMS asks for
``DELAYED_DELIVERY`` and ``SHARED-SUBS`` through desired-capabilities, and a broker says what
a link supports through offered-capabilities. So the routing core carries them itself:

- :class:`AttachReader` walks the bytes a peer sends, before proton sees them, and keeps those
  fields from each attach frame that has any, keyed by link name and role;
- :class:`AttachWriter` walks the bytes proton writes and, for an attach it has been asked to
  complete, re-encodes that one frame with the fields filled in.

Only frame headers are read (a size, a data offset and a type, as in AMQP 1.0 §2.3); the
attach body itself is decoded and encoded by proton's own codec (``Data``). Every other frame
is skipped by its size, so the walk costs a few bytecodes per frame on the message path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from proton import Data, Described, ulong

# Positions in the attach and source lists (AMQP 1.0 §2.7.3, §3.5.3).
_NAME = 0
_ROLE = 2
_SOURCE = 5
_OFFERED = 11
_DESIRED = 12
_DEFAULT_OUTCOME = 8
_SOURCE_DESCRIPTOR = ulong(0x28)
_ATTACH_DESCRIPTOR = ulong(0x12)
# A frame header: size (4 bytes), data offset in 4-byte words, type (0 for AMQP), channel.
_HEADER = 8
_frame_header = struct.Struct(">IBB").unpack_from
# Protocol headers ("AMQP" and 4 version bytes) come first and again after SASL; at a frame
# boundary they read as a frame of 0x414D5150 bytes, which no frame size limit allows.
_PROTOCOL = int.from_bytes(b"AMQP", "big")
# The most bytes it can take to tell an attach from its start: a header of 255 words and
# the body's 3-byte descriptor.
_TELLS = 255 * 4 + 3
# An attach is a few hundred bytes; one with kilobytes of filters or properties still fits.
# A bigger one is left as proton wrote it (proton itself refuses what exceeds max-frame-size).
MAX_ATTACH = 1 << 20


@dataclass(frozen=True, slots=True)
class LinkExtras:
    """The attach fields proton drops, as proton's codec decodes them (None: absent)."""

    offered: Any = None
    desired: Any = None
    default_outcome: Any = None


LinkKey = tuple[str, bool]  # (link name, role: True for a receiver), as in the attach frame


def _next_attach(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """Walk whole frames from the boundary at ``pos``: (start, size) of the first attach
    frame, or (boundary, 0) where the walk stopped: at or past ``end``, or before ``end`` at a
    frame whose start is too short to tell.

    The message path: a struct unpack and a few comparisons per frame. An attach's body is
    the described list 0x12, whose descriptor proton and every peer we know write as the
    smallulong ``00 53 12``; a peer writing the 8-byte or the symbolic form would just not
    have these fields carried.
    """
    while pos < end:
        if end - pos < _HEADER:
            return pos, 0
        size, doff, ftype = _frame_header(buf, pos)
        if size == _PROTOCOL:
            pos += _HEADER
            continue
        if size < _HEADER:  # not a frame: proton ends the connection; stop walking this read
            return end, 0
        body = pos + 4 * doff
        if ftype == 0 and size > 4 * doff:  # an AMQP frame with a body, not a heartbeat
            if body + 3 > end:
                return pos, 0
            if buf[body + 2] == 0x12 and buf[body + 1] == 0x53 and buf[body] == 0:
                return pos, size
        pos += size
    return pos, 0


def _decode(frame: Any) -> list[Any] | None:
    """The fields of an attach frame, or None if proton cannot decode it (proton's own
    decoding of the same frame then ends the connection with the error)."""
    data = Data()
    try:
        data.decode(bytes(frame[4 * frame[4] :]))
        data.rewind()
        data.next()
        described = data.get_object()
    except Exception:  # proton's codec raises several error types; all mean "undecodable"
        return None
    if (
        not isinstance(described, Described)
        or described.descriptor != _ATTACH_DESCRIPTOR
        or not isinstance(described.value, list)
        or len(described.value) <= _ROLE
        or not isinstance(described.value[_NAME], str)
    ):
        return None  # proton's own decoding of it ends the connection
    return described.value


class AttachReader:
    """Walks a peer's bytes and keeps the dropped fields of each attach that has any."""

    __slots__ = ("_held", "_skip", "found")

    def __init__(self) -> None:
        self._skip = 0  # bytes of the current frame still to pass
        self._held = bytearray()  # the start of a frame split across reads
        self.found: dict[LinkKey, LinkExtras] = {}

    def feed(self, data: Any) -> None:
        """Walk bytes the peer sent (call before pushing them into proton)."""
        end = len(data)
        pos = self._feed_held(data) if self._held else self._skip
        while pos < end:
            pos, size = _next_attach(data, pos, end)
            if not size:
                if pos < end:  # a frame start split across reads
                    self._held += data[pos:]
                    pos = end
                break
            if size > MAX_ATTACH:
                pos += size
            elif pos + size > end:  # an attach split across reads
                self._held += data[pos:]
                pos = end
            else:
                self._keep(data[pos : pos + size])
                pos += size
        self._skip = pos - end

    def _feed_held(self, data: Any) -> int:
        """Complete the frame start held from the last read; the offset in ``data`` after
        that frame (past the end when it goes on)."""
        held = self._held
        had = len(held)
        joined = held + data[:_TELLS]
        pos, size = _next_attach(joined, 0, len(joined))
        if pos == 0 and not size:  # still too short to tell
            held += data
            return len(data)
        if pos == 0 and size <= MAX_ATTACH:  # an attach
            if had + len(data) < size:
                held += data
                return len(data)
            self._keep(held + data[: size - had])
        self._held = bytearray()
        size = _frame_header(joined, 0)[0]
        # (Not a frame at all: proton ends the connection; walk on from here.)
        return max(_HEADER if size == _PROTOCOL else size, had) - had

    def _keep(self, frame: Any) -> None:
        fields = _decode(frame)
        if fields is None or (len(fields) <= _OFFERED and not _source_outcome(fields)):
            return
        extras = LinkExtras(
            offered=_field(fields, _OFFERED),
            desired=_field(fields, _DESIRED),
            default_outcome=_source_outcome(fields),
        )
        if extras != LinkExtras():
            self.found[(fields[_NAME], bool(fields[_ROLE]))] = extras

    def take(self, key: LinkKey) -> LinkExtras | None:
        """The dropped fields of the peer's attach for ``key``, once."""
        return self.found.pop(key, None) if self.found else None


class AttachWriter:
    """Walks the bytes proton writes, completing the attach frames it was asked to."""

    __slots__ = ("_next", "pending", "staged", "staged_pos")

    def __init__(self) -> None:
        self._next = 0  # where the next unexamined frame starts, from proton's output head
        self.pending: dict[LinkKey, LinkExtras] = {}
        # A rewritten attach, to go out before proton's next byte; replaced, never resized,
        # because a caller may still hold a view of it.
        self.staged = b""
        self.staged_pos = 0

    def complete(self, key: LinkKey, extras: LinkExtras) -> None:
        """Fill in ``extras`` when our attach for ``key`` goes out."""
        self.pending[key] = extras

    def sendable(self, out: Any, more: Any) -> int:
        """How much of ``out`` (proton's output head) may go out as it is.

        Stops before an attach frame to complete; once that frame starts ``out``, stages its
        rewrite and returns how many of proton's bytes it replaces, as a negative number.
        ``more(n)`` returns ``n`` bytes of proton's output, or None, when ``out`` is shorter
        than the attach.
        """
        end = len(out)
        pos = self._next
        while pos < end:
            pos, size = _next_attach(out, pos, end)
            if not size:
                break
            if self.pending and size <= MAX_ATTACH:
                if pos:
                    break  # send what comes before it first
                frame = out[:size] if size <= end else more(size)
                if frame is not None:
                    self.staged = self._rewrite(frame)
                    self.staged_pos = 0
                    self._next = size
                    return -size
            pos += size
        self._next = pos
        return min(pos, end)

    def popped(self, n: int) -> None:
        """``n`` of proton's output bytes went out (or were replaced)."""
        self._next -= n

    def _rewrite(self, frame: Any) -> bytes:
        fields = _decode(frame)
        extras = None
        if fields is not None:
            extras = self.pending.pop((fields[_NAME], bool(fields[_ROLE])), None)
        if fields is None or extras is None:
            return bytes(frame)
        fields.extend([None] * (_DESIRED + 1 - len(fields)))
        fields[_OFFERED] = extras.offered
        fields[_DESIRED] = extras.desired
        source = fields[_SOURCE]
        if extras.default_outcome is not None and isinstance(source, Described):
            terms = list(source.value)
            terms.extend([None] * (_DEFAULT_OUTCOME + 1 - len(terms)))
            terms[_DEFAULT_OUTCOME] = extras.default_outcome
            fields[_SOURCE] = Described(source.descriptor, terms)
        data = Data()
        data.put_object(Described(_ATTACH_DESCRIPTOR, fields))
        body = data.encode()
        head = 4 * frame[4]
        return (head + len(body)).to_bytes(4, "big") + bytes(frame[4:head]) + body


def _field(fields: list[Any], index: int) -> Any:
    return fields[index] if len(fields) > index else None


def _source_outcome(fields: list[Any]) -> Any:
    """The source's default-outcome, if the attach has a source that names one."""
    source = _field(fields, _SOURCE)
    if not isinstance(source, Described) or source.descriptor != _SOURCE_DESCRIPTOR:
        return None
    return _field(source.value, _DEFAULT_OUTCOME) if isinstance(source.value, list) else None
