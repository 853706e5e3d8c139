"""Hand-built AMQP 1.0 frames, for inputs no well-behaved client produces.

Only the framing is done here; proton's ``Data`` encodes the performative bodies, so a test
states a performative as its descriptor code and field list, as the spec writes it.
"""

from __future__ import annotations

from typing import Any

from proton import Data, Described, uint, ulong

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_010_HEADER = b"AMQP\x01\x01\x00\x0a"
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
# The start of a TLS 1.2 ClientHello record (content type 22, version 3.1).
TLS_CLIENT_HELLO = bytes.fromhex("16030100a5010000a10303") + bytes(32) + b"\x00\x00\x02\x13\x01"
# A frame with no body: AMQP's heartbeat (size 8, doff 2, type 0, channel 0).
EMPTY_FRAME = b"\x00\x00\x00\x08\x02\x00\x00\x00"

OPEN, BEGIN, ATTACH, FLOW, TRANSFER, DISPOSITION, DETACH, END, CLOSE = range(0x10, 0x19)
SOURCE, TARGET = 0x28, 0x29
# How performatives start on the wire (the descriptor as a small ulong).
OPEN_DESCRIPTOR = b"\x00S\x10"
ATTACH_DESCRIPTOR = b"\x00S\x12"
FLOW_DESCRIPTOR = b"\x00S\x13"
DISPOSITION_DESCRIPTOR = b"\x00S\x15"
# A descriptor no AMQP 1.0 performative uses.
UNKNOWN_PERFORMATIVE = 0x77


def frame(body: bytes, channel: int = 0, ftype: int = 0, size: int | None = None) -> bytes:
    """An AMQP frame; ``size`` overrides the size field (to lie about it)."""
    real = 8 + len(body)
    return (size or real).to_bytes(4, "big") + bytes([2, ftype]) + channel.to_bytes(2, "big") + body


def performative(code: int, *fields: Any, payload: bytes = b"") -> bytes:
    """A described list ``code`` with ``fields`` (None encodes null), then ``payload``."""
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(code)
    data.put_list()
    data.enter()
    for value in fields:
        if value is None:
            data.put_null()
        else:
            data.put_object(value)
    data.exit()
    data.exit()
    return data.encode() + payload


def open_frame(container: str = "hostile", max_frame: int | None = None) -> bytes:
    """An open frame; ``max_frame`` sets the max-frame-size field."""
    fields: list[Any] = [container, None]
    if max_frame is not None:
        fields.append(uint(max_frame))
    return frame(performative(OPEN, *fields))


def begin_frame(channel: int = 0) -> bytes:
    """A begin for a new session: next-outgoing-id 0, windows of 100."""
    return frame(performative(BEGIN, None, uint(0), uint(100), uint(100)), channel)


def handshake() -> bytes:
    """Header, open and begin: the start every bad-frame case below shares."""
    return AMQP_HEADER + open_frame() + begin_frame()


def attach_frame(name: str, handle: int, *, sender: bool, address: str) -> bytes:
    """An attach: the guest as sender (role false) to ``address``, or as receiver from it."""
    terminus = Described(ulong(TARGET if sender else SOURCE), [address])
    fields: list[Any] = [name, uint(handle), not sender, None, None]
    fields += [None, terminus] if sender else [terminus, None]
    return frame(performative(ATTACH, *fields))


def transfer_frame(handle: int, delivery_id: int, body: bytes = b"x") -> bytes:
    """An unsettled transfer of one message whose data section is ``body``."""
    payload = b"\x00Su\xa0" + bytes([len(body)]) + body
    return frame(performative(TRANSFER, uint(handle), uint(delivery_id), str(delivery_id).encode(),
                              uint(0), False, payload=payload))  # fmt: skip


def null_name_attach() -> bytes:
    """An attach whose name field is null (the name is mandatory)."""
    return frame(performative(ATTACH, None, uint(0), False))
