"""Find the start of a guest's AMQP connection in a channel's byte stream (sans-IO).

A virtio-serial channel outlives the guest connections on it: the host sees nothing when the
guest closes its port, and qemu hands the next opener whatever was written meanwhile. So the
connector treats everything before a valid protocol header as noise: it is discarded and
counted, never fed to proton. Recognisable wrong protocols are named so the log says what
the guest tried.
"""

from __future__ import annotations

from dataclasses import dataclass

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
TLS_AMQP_HEADER = b"AMQP\x02\x01\x00\x00"
HEADER_SIZE = 8
_MAGIC = b"AMQP"


@dataclass(frozen=True)
class HeaderFound:
    """A protocol header and the bytes that followed it in the same read."""

    header: bytes
    rest: bytes
    discarded: int  # bytes thrown away since the previous header (for the log)


def describe_garbage(data: bytes) -> str | None:
    """Name a wrong protocol from its first bytes, for the log; None if unrecognised."""
    if data.startswith(_MAGIC) and len(data) >= HEADER_SIZE:
        proto, major, minor, rev = data[4], data[5], data[6], data[7]
        if data[:HEADER_SIZE] == TLS_AMQP_HEADER:
            return "an AMQP TLS header (TLS is not used on a virtio channel)"
        if (major, minor) == (0, 10) or (proto, major, minor, rev) == (1, 1, 0, 10):
            return "an AMQP 0-10 header (only AMQP 1.0 is routed)"
        return f"an unsupported AMQP header {data[:HEADER_SIZE]!r}"
    if data[:1] == b"\x16" and data[1:2] == b"\x03":
        return "a TLS ClientHello (TLS is not used on a virtio channel)"
    if data[:4] in (b"GET ", b"POST", b"PUT ", b"HEAD", b"OPTI", b"CONN"):
        return "an HTTP request"
    return None


class HeaderScanner:
    """Feed it reads; it answers with the first valid AMQP 1.0 (or SASL) header.

    Holds at most ``HEADER_SIZE - 1`` bytes between reads (a header split across reads), so
    a guest that floods garbage costs no memory.
    """

    def __init__(self) -> None:
        self._held = b""
        self._discarded = 0  # over the scanner's whole life, like an interface counter
        self._since_header = 0
        self.wrong: list[str] = []  # descriptions of wrong protocols seen, for the log

    @property
    def discarded(self) -> int:
        """Bytes thrown away while waiting for headers, over the scanner's life."""
        return self._discarded

    def feed(self, data: bytes) -> HeaderFound | None:
        """Scan one read; return the header and what follows, or None to keep waiting."""
        buf = self._held + bytes(data)
        self._held = b""
        pos = 0
        while True:
            i = buf.find(_MAGIC, pos)
            if i < 0:
                break
            if len(buf) - i < HEADER_SIZE:
                self._discard(buf[:i])
                self._held = buf[i:]
                return None
            candidate = buf[i : i + HEADER_SIZE]
            if candidate in (AMQP_HEADER, SASL_HEADER):
                self._discard(buf[:i])
                found = HeaderFound(candidate, buf[i + HEADER_SIZE :], self._since_header)
                self._since_header = 0
                return found
            pos = i + 1
        cut = len(buf) - _partial_magic(buf)
        self._discard(buf[:cut])
        self._held = buf[cut:]
        return None

    def _discard(self, garbage: bytes) -> None:
        """Count thrown-away bytes and remember which wrong protocols they looked like."""
        if not garbage:
            return
        self._discarded += len(garbage)
        self._since_header += len(garbage)
        starts = [0]
        i = garbage.find(_MAGIC, 1)
        while i >= 0:
            starts.append(i)
            i = garbage.find(_MAGIC, i + 1)
        for start in starts:
            what = describe_garbage(garbage[start:])
            if what and (not self.wrong or self.wrong[-1] != what):
                self.wrong.append(what)


def _partial_magic(buf: bytes) -> int:
    """Length of the longest suffix of ``buf`` that could begin the next ``AMQP``."""
    for n in range(min(len(_MAGIC) - 1, len(buf)), 0, -1):
        if buf.endswith(_MAGIC[:n]):
            return n
    return 0


# What a new connection's first frame after its header looks like: a frame header (size,
# data offset >= 2 words, frame type) whose body starts with the described-type constructor
# of an open (AMQP frame, 0x10) or a sasl-init (SASL frame, 0x41).
_FRAME_HEADER = 8
_SMALL_ULONG = 0x53
_OPEN = 0x10
_SASL_INIT = 0x41


def starts_new_connection(data: bytes) -> bool:
    """Whether a read is the start of a new connection, not the middle of a message.

    A protocol header followed by an open (or, after the SASL header, by nothing yet or a
    sasl-init) is what a client writes first. Message bytes that happen to hold the header
    would also need a well-formed first frame after it to be mistaken for one.
    """
    if data.startswith(SASL_HEADER):
        rest = data[HEADER_SIZE:]
        return not rest or _is_frame(rest, 1, _SASL_INIT)
    return data.startswith(AMQP_HEADER) and _is_frame(data[HEADER_SIZE:], 0, _OPEN)


def _is_frame(buf: bytes, frame_type: int, code: int) -> bool:
    if len(buf) < _FRAME_HEADER + 3:
        return False
    doff = buf[4]
    if doff < 2 or buf[5] != frame_type:
        return False
    body = buf[doff * 4 : doff * 4 + 3]
    return body == bytes((0x00, _SMALL_ULONG, code))
