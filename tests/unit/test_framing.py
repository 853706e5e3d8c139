"""Finding where a guest's connection starts in a channel's byte stream."""

from __future__ import annotations

import pytest
from proton import Connection, Transport

from connector.channels.framing import (
    AMQP_HEADER,
    SASL_HEADER,
    HeaderScanner,
    describe_garbage,
    starts_new_connection,
)


def _client_bytes(sasl: bool) -> bytes:
    transport, conn = Transport(), Connection()
    transport.bind(conn)
    if sasl:
        transport.sasl().allowed_mechs("ANONYMOUS")
    conn.open()
    return bytes(transport.peek(transport.pending()))


def test_garbage_before_the_header_is_discarded_and_counted() -> None:
    scanner = HeaderScanner()
    assert scanner.feed(b"stale frame bytes") is None
    found = scanner.feed(b"more junk" + AMQP_HEADER + b"rest")
    assert found is not None
    assert (found.header, found.rest, found.discarded) == (AMQP_HEADER, b"rest", 26)
    assert scanner.discarded == 26


@pytest.mark.parametrize("split", range(1, 8))
def test_a_header_split_across_reads_is_found(split: int) -> None:
    scanner = HeaderScanner()
    assert scanner.feed(b"xx" + SASL_HEADER[:split]) is None
    found = scanner.feed(SASL_HEADER[split:] + b"!")
    assert found is not None and found.header == SASL_HEADER and found.rest == b"!"
    assert found.discarded == 2


def test_a_flood_of_garbage_holds_no_memory() -> None:
    scanner = HeaderScanner()
    for _ in range(100):
        assert scanner.feed(b"\xff" * 65536 + b"AMQ") is None
        assert len(scanner._held) <= 7
    assert scanner.discarded == 100 * 65536 + 99 * 3


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"AMQP\x01\x01\x00\x0a", "AMQP 0-10"),
        (b"GET / HTTP/1.1\r\n", "HTTP"),
        (b"\x16\x03\x01\x02\x00\x01", "TLS ClientHello"),
        (b"AMQP\x02\x01\x00\x00", "TLS"),
    ],
)
def test_wrong_protocols_are_named(data: bytes, named: str) -> None:
    assert named in (describe_garbage(data) or "")
    scanner = HeaderScanner()
    assert scanner.feed(data) is None
    assert any(named in w for w in scanner.wrong)


def test_a_new_connection_is_told_from_message_bytes() -> None:
    assert starts_new_connection(_client_bytes(sasl=False))  # header + open
    assert starts_new_connection(_client_bytes(sasl=True))  # SASL header, waiting
    assert not starts_new_connection(AMQP_HEADER + b"\x00" * 40)  # header, then no open
    assert not starts_new_connection(b"payload" + AMQP_HEADER)
    assert not starts_new_connection(AMQP_HEADER)
