"""A relayed message's sections, read for the policy's check of its 'to' address.

Off the per-message path: only anonymous-relay links of guests whose policy restricts
addresses or maps them (``deliveries._forward_relayed``) read a message at all.

The check must read the address the broker will route by. A message is a run of sections,
each a described value (AMQP 1.0 §3.2); a decoder that takes the last properties section it
meets (proton's ``Message``) and a broker that routes by the first (Artemis) disagree on a
message with two, so a guest could name an allowed address to the check and a forbidden one
to the broker. So the bytes are walked one section at a time with proton's codec, and a
message that is not exactly the sequence §3.2 allows (each section at most once and in
order; one or more data sections, one or more amqp-sequence sections, or one amqp-value)
is refused whole. A mapped address replaces only the properties section's bytes: the others
go on as the guest wrote them, including any that proton's ``Message`` would drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proton import Data, Described, ulong

from .frames import PlainData

# Section descriptors (AMQP 1.0 §3.2), by code and by name, with their rank in a message.
_HEADER, _DELIVERY_ANN, _MESSAGE_ANN, _PROPERTIES, _APP_PROPERTIES = range(0x70, 0x75)
_DATA, _SEQUENCE, _VALUE, _FOOTER = range(0x75, 0x79)
_NAMES = {
    "amqp:header:list": _HEADER,
    "amqp:delivery-annotations:map": _DELIVERY_ANN,
    "amqp:message-annotations:map": _MESSAGE_ANN,
    "amqp:properties:list": _PROPERTIES,
    "amqp:application-properties:map": _APP_PROPERTIES,
    "amqp:data:binary": _DATA,
    "amqp:amqp-sequence:list": _SEQUENCE,
    "amqp:amqp-value:*": _VALUE,
    "amqp:footer:map": _FOOTER,
}
# The body's three kinds share one rank; the footer comes after it.
_RANK = {code: min(code, _DATA) if code < _FOOTER else _DATA + 1 for code in range(0x70, 0x79)}
# Body sections that may repeat (one kind only): data and amqp-sequence.
_REPEATS = frozenset({_DATA, _SEQUENCE})
# The 'to' field's index in the properties list.
_TO = 2


class BadMessage(ValueError):
    """The bytes are not one message that the relay check can read."""


@dataclass
class RelayedMessage:
    """A relayed message's bytes and where its properties section lies in them."""

    data: bytes
    to: str | None
    properties: tuple[int, int] | None  # (start, end) offsets, or None: no such section
    fields: list[Any]  # the properties list, as decoded

    def with_to(self, address: str) -> bytes:
        """The message's bytes with ``address`` as its 'to', every other byte unchanged.
        Only for a message that has a 'to' (one without is refused), so it has properties."""
        assert self.properties is not None
        fields = list(self.fields)
        fields[_TO] = address
        section = Data()
        section.put_object(Described(ulong(_PROPERTIES), fields))
        start, end = self.properties
        return self.data[:start] + section.encode() + self.data[end:]


def read(data: bytes) -> RelayedMessage:
    """Read ``data`` as one message; raises ``BadMessage`` saying why it is not one."""
    last_rank = -1
    last_code = -1
    properties = None
    fields: list[Any] = []
    for code, start, end in _walk(data):
        rank = _RANK[code]
        again = code == last_code and code in _REPEATS
        if rank <= last_rank and not again:
            raise BadMessage(f"a {_name(code)} section out of order at byte {start}")
        last_rank, last_code = rank, code
        if code == _PROPERTIES:
            properties = (start, end)
            fields = _properties(data[start:end], start)
    to = fields[_TO] if len(fields) > _TO else None
    if to is not None and not isinstance(to, str):
        raise BadMessage("a 'to' address that is not a string")
    return RelayedMessage(data, to, properties, fields)


def _walk(data: bytes) -> Any:
    """(descriptor code, start, end) of each section of ``data``, in order."""
    pos = 0
    while pos < len(data):
        value = Data()
        try:
            size = value.decode(data[pos:])
        except Exception as err:  # proton's codec raises several error types
            raise BadMessage(f"undecodable bytes at byte {pos}") from err
        value.rewind()
        value.next()
        code = _descriptor(value) if value.type() == Data.DESCRIBED else None
        if code is None:
            raise BadMessage(f"a value that is not a message section at byte {pos}")
        yield code, pos, pos + size
        pos += size


def _descriptor(value: Data) -> int | None:
    """The section code of the described value ``value`` is at, or None."""
    value.enter()
    value.next()
    kind = value.type()
    if kind == Data.ULONG:
        code = value.get_ulong()
        return code if _HEADER <= code <= _FOOTER else None
    if kind == Data.SYMBOL:
        return _NAMES.get(str(value.get_symbol()))
    return None


def _properties(section: bytes, at: int) -> list[Any]:
    """The fields of the properties section ``section`` (at byte ``at``)."""
    value = PlainData()  # binary ids as bytes, not views of a buffer gone with the Data
    value.decode(section)
    value.rewind()
    value.next()
    fields = value.get_object().value
    if not isinstance(fields, list):
        raise BadMessage(f"a properties section that is not a list at byte {at}")
    return fields


def _name(code: int) -> str:
    return next(name for name, c in _NAMES.items() if c == code).split(":")[1]
