"""Reading a relayed message's sections for the policy's 'to' check (connector/routing/
sections.py): only one well-formed message passes, and a mapped 'to' changes nothing else."""

from __future__ import annotations

import uuid

import pytest
from proton import Data, Described, Message, symbol, timestamp, uint, ulong

from connector.routing import sections


def _section(code: int | str, value: object) -> bytes:
    data = Data()
    descriptor = symbol(code) if isinstance(code, str) else ulong(code)
    data.put_object(Described(descriptor, value))
    return data.encode()


HEADER = _section(0x70, [True])
ANNOTATIONS = _section(0x72, {symbol("x-opt-a"): "kept"})
PROPERTIES = _section(0x73, [b"id", None, "orders", "subject"])
DATA = _section(0x75, b"part")
FOOTER = _section(0x78, {symbol("x-sum"): 7})


def test_a_message_proton_encodes_is_read() -> None:
    msg = sections.read(Message(address="orders", body="hi", subject="s").encode())
    assert msg.to == "orders"


def test_a_mapped_to_changes_only_the_properties_section() -> None:
    """Data sections repeated, annotations and a footer (which proton's ``Message`` would
    merge or drop on a re-encode) go on byte for byte."""
    raw = HEADER + ANNOTATIONS + PROPERTIES + DATA + DATA + FOOTER
    msg = sections.read(raw)
    out = msg.with_to("guests.vm1.orders")
    after = sections.read(out)
    assert after.to == "guests.vm1.orders"
    assert after.fields == [b"id", None, "guests.vm1.orders", "subject"]
    assert out.startswith(HEADER + ANNOTATIONS)
    assert out.endswith(DATA + DATA + FOOTER)


def test_every_property_keeps_its_type_through_a_mapped_to() -> None:
    """Binary ids (which proton hands out as views of a buffer it frees), a uuid, ulong,
    symbols, timestamps and a uint: all encoded again exactly as the guest wrote them."""

    def properties(to: str) -> bytes:
        return _section(
            0x73,
            [
                uuid.UUID(int=1), b"user", to, "subject", "reply", ulong(5), symbol("text/plain"),
                symbol("gzip"), timestamp(1000), timestamp(2000), "group", uint(3), "reply-group",
            ],
        )  # fmt: skip

    out = sections.read(properties("orders") + DATA).with_to("guests.vm1.orders")
    assert out == properties("guests.vm1.orders") + DATA


def test_symbolic_descriptors_are_read() -> None:
    raw = _section("amqp:properties:list", [None, None, "orders"]) + _section(
        "amqp:amqp-value:*", "hi"
    )
    assert sections.read(raw).to == "orders"


def test_a_message_without_properties_has_no_to() -> None:
    assert sections.read(DATA).to is None


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (PROPERTIES + DATA + PROPERTIES + DATA, "properties section out of order"),
        (PROPERTIES + PROPERTIES + DATA, "properties section out of order"),
        (DATA + ANNOTATIONS, "message-annotations section out of order"),
        (DATA + _section(0x76, [1]), "amqp-sequence section out of order"),
        (_section(0x77, 1) + _section(0x77, 2), "amqp-value section out of order"),
        (DATA + FOOTER + FOOTER, "footer section out of order"),
        (DATA + b"\x00", "undecodable bytes at byte"),
        (PROPERTIES + b"\xa1\x02hi", "not a message section at byte"),
        (_section(0x71, {}) + _section(0x99, 1), "not a message section"),
        (_section(0x73, "x") + DATA, "not a list"),
        (_section(0x73, [None, None, b"orders"]) + DATA, "'to' address that is not a string"),
    ],
)
def test_what_is_not_one_message_is_refused(raw: bytes, why: str) -> None:
    with pytest.raises(sections.BadMessage, match=why):
        sections.read(raw)
