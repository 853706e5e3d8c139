"""The attach fields proton drops: read from a peer's frames, written into ours.

Streams come from a real proton engine. What the writer produced is checked with proton's
frame tracer on a receiving transport, a decoder that shares no code with the walker here.
"""

from __future__ import annotations

from typing import Any

import pytest
from cproton_ffi import lib
from proton import UNDESCRIBED, Array, Connection, Data, Described, Transport, symbol, uint, ulong

from connector.routing.engine import IO_CHUNK, Engine
from connector.routing.frames import (
    DISPOSITION_SPAN_PER_READ,
    DISPOSITIONS_UNREAD,
    MAX_DECODED_VALUES,
    FrameReader,
    LinkExtras,
    decode,
)

DELAYED = Array(UNDESCRIBED, Data.SYMBOL, symbol("DELAYED_DELIVERY"))
SHARED = Array(UNDESCRIBED, Data.SYMBOL, symbol("SHARED-SUBS"))
RELEASED = Described(ulong(0x26), [])
WANTED = LinkExtras(offered=SHARED, desired=DELAYED, default_outcome=RELEASED)


def _client(*links: tuple[str, bool, LinkExtras | None], sasl: bool = False) -> Engine:
    """A client engine that has opened, begun and attached ``links`` (name, sending, extras)."""
    engine = Engine(server=False, user="u" if sasl else None, password="p" if sasl else None)
    conn = engine.connection
    lib.pn_connection_open(conn)
    ssn = lib.pn_session(conn)
    lib.pn_session_open(ssn)
    for name, sending, extras in links:
        link = (lib.pn_sender if sending else lib.pn_receiver)(ssn, name.encode())
        lib.pn_terminus_set_address(lib.pn_link_source(link), b"q")
        if extras is not None:
            engine.complete_attach((name, not sending), extras)
        lib.pn_link_open(link)
    return engine


def _drain(engine: Engine, most: int = 1 << 30) -> bytes:
    """All the engine's output, popped ``most`` bytes at a time (a short socket write)."""
    out = bytearray()
    while view := engine.peek_output():
        n = min(len(view), most)
        out += view[:n]
        engine.pop_output(n)
    return bytes(out)


def _traced(stream: bytes) -> list[str]:
    """The frames a proton server transport decodes from ``stream``, as its tracer says."""
    lines: list[str] = []
    transport = Transport(Transport.SERVER)
    transport.tracer = lambda _t, line: lines.append(line)
    transport.trace(Transport.TRACE_FRM)
    transport.max_frame_size = 1 << 20
    transport.bind(Connection())
    while stream:
        n = transport.capacity()
        transport.push(stream[:n])
        stream = stream[n:]
    return [line for line in lines if "@attach" in line]


def test_the_writer_completes_the_asked_attach_and_leaves_the_others() -> None:
    stream = _drain(_client(("a", True, WANTED), ("b", False, None)))
    a, b = _traced(stream)
    assert "offered-capabilities=@<symbol>[:SHARED-SUBS]" in a
    assert 'desired-capabilities=@<symbol>[:"DELAYED_DELIVERY"]' in a
    assert "default-outcome=@released(38) []" in a
    assert 'name="b"' in b and "capabilities" not in b and "default-outcome" not in b


@pytest.mark.parametrize("most", [1, 7, 100])
def test_short_writes_give_the_same_stream(most: int) -> None:
    whole = _drain(_client(("a", True, WANTED), ("b", True, WANTED)))
    assert _drain(_client(("a", True, WANTED), ("b", True, WANTED)), most) == whole


def test_an_attach_larger_than_a_peek_is_completed() -> None:
    engine = _client()
    opening = _drain(engine)
    ssn = lib.pn_session_head(engine.connection, 0)
    link = lib.pn_sender(ssn, b"big")
    props = Data(lib.pn_link_properties(link))
    props.put_object({symbol("k"): "v" * (2 * IO_CHUNK)})
    engine.complete_attach(("big", False), WANTED)
    lib.pn_link_open(link)
    (attach,) = _traced(opening + _drain(engine))
    assert 'desired-capabilities=@<symbol>[:"DELAYED_DELIVERY"]' in attach


def test_a_resumed_attach_is_read_and_written_with_its_unsettled_map() -> None:
    """A resumed link's attach names its unsettled deliveries in a map keyed by their tags
    (binary): proton's Python codec cannot decode such a map (its binary values are
    unhashable views), so the reader skipped the whole attach, and the writer never knew
    the map. Both now carry it, and the incomplete-unsettled flag."""
    resumed = LinkExtras(
        unsettled={b"tag-1": Described(ulong(0x24), [])}, incomplete_unsettled=True
    )
    stream = _drain(_client(("r", False, resumed)))
    (attach,) = _traced(stream)
    assert 'unsettled={b"tag-1"=@accepted(36) []}' in attach
    assert "incomplete-unsettled=true" in attach
    assert _read(stream, []) == {("r", True): resumed}


def _read(stream: bytes, cuts: list[int]) -> dict[Any, LinkExtras]:
    reader = FrameReader()
    last = 0
    for cut in [*cuts, len(stream)]:
        reader.feed(memoryview(stream)[last:cut])
        last = cut
    return reader.found


def test_the_reader_finds_the_fields_however_the_stream_is_cut() -> None:
    stream = _drain(_client(("a", True, WANTED), ("b", False, None)), 5)
    expected = {("a", False): WANTED}
    assert _read(stream, []) == expected
    for cut in range(1, len(stream)):
        assert _read(stream, [cut]) == expected, cut
    assert _read(stream, list(range(1, len(stream)))) == expected


def test_the_reader_walks_sasl_headers_frames_and_large_transfers() -> None:
    # What a SASL ANONYMOUS client sends a server, recorded through the whole exchange.
    client = _client(("a", True, WANTED))
    lib.pn_sasl_allowed_mechs(lib.pn_sasl(client.transport), b"ANONYMOUS")
    server = Engine(server=True)
    server.configure_sasl("ANONYMOUS")
    stream = bytearray()
    while out := _drain(client):
        stream += out
        server.push(out)
        client.push(_drain(server))
    assert stream.startswith(b"AMQP\x03") and stream.count(b"AMQP\x00\x01\x00\x00") == 1
    # Then a transfer whose payload is full of attach descriptors, and a heartbeat.
    transfer = Data()
    transfer.put_object(Described(ulong(0x14), [0, 0, b"t"]))
    body = transfer.encode() + b"\x00\x53\x12" * 40_000
    stream += (8 + len(body)).to_bytes(4, "big") + b"\x02\x00\x00\x00" + body
    stream += b"\x00\x00\x00\x08\x02\x00\x00\x00"
    expected = {("a", False): WANTED}
    assert _read(bytes(stream), list(range(0, len(stream), 999))) == expected
    assert _read(bytes(stream), list(range(0, len(stream), 4096))) == expected


def test_the_reader_survives_bytes_that_are_not_frames() -> None:
    # Proton ends such a connection; the walk must only not hang or fail first.
    for junk in (b"\x00" * 64, b"\x00\x00\x00\x04" * 16, b"\xff" * 64):
        assert _read(junk, [3, 17]) == {}


def test_the_reader_ignores_an_attach_proton_will_refuse() -> None:
    # A name that is not a string, and a list too short for a role: proton ends such a
    # connection with a decode error; the reader must keep nothing and raise nothing.
    for fields in ([[1], 0, False, *[None] * 8, DELAYED], ["x"]):
        body = Data()
        body.put_object(Described(ulong(0x12), fields))
        encoded = body.encode()
        frame = (8 + len(encoded)).to_bytes(4, "big") + b"\x02\x00\x00\x00" + encoded
        assert _read(frame, []) == {}


def _disposition(first: int, last: int | None, *, role: bool = True) -> bytes:
    """A disposition frame, encoded by proton's codec, naming ``first``..``last``."""
    fields: list[Any] = [role, uint(first)]
    if last is not None:
        fields.append(uint(last))
    data = Data()
    data.put_object(Described(ulong(0x15), fields))
    body = data.encode()
    return (8 + len(body)).to_bytes(4, "big") + bytes((2, 0, 0, 0)) + body


@pytest.mark.parametrize(
    ("first", "last", "named"),
    [
        (0, None, 1),  # no last: first alone
        (7, 7, 1),
        (0, 9, 10),  # uint0 and smalluint
        (300, 70_000, 69_701),  # uint
        (2**32 - 2, 1, 4),  # across the wrap of the sequence numbers
    ],
)
def test_the_reader_counts_the_deliveries_dispositions_name(
    first: int, last: int | None, named: int
) -> None:
    """What a read's dispositions name bounds the events proton posts for them (one per
    delivery held in a range, per frame): counted from their bytes, each encoding, once a
    read holds more than DISPOSITIONS_UNREAD of them; up to that many, one each."""
    reader = FrameReader()
    reader.disposition_limit = DISPOSITION_SPAN_PER_READ
    many = DISPOSITIONS_UNREAD + 1
    reader.feed(_disposition(first, last) * many)
    assert reader.disposition_span == many * named
    reader.feed(_disposition(first, last) * DISPOSITIONS_UNREAD)
    assert reader.disposition_span == DISPOSITIONS_UNREAD


def _attach_with(properties: Any) -> bytes:
    """An attach frame (a sender named "big", handle 0) whose link properties are
    ``properties``, and which desires DELAYED_DELIVERY (a field proton drops)."""
    source = Described(ulong(0x28), ["q"])
    target = Described(ulong(0x29), ["q"])
    fields: list[Any] = ["big", uint(0), False, None, None, source, target]
    fields += [None, None, uint(0), None, None, DELAYED, properties]
    data = Data()
    data.put_object(Described(ulong(0x12), fields))
    body = data.encode()
    return (8 + len(body)).to_bytes(4, "big") + bytes((2, 0, 0, 0)) + body


def test_a_frame_of_too_many_values_is_not_decoded_into_python_objects() -> None:
    """Decoding into Python objects costs about 0.7 µs a value: a guest's attach, end or
    detach (an error's info map) holding 65,000 nested empty lists cost 45 ms each time it
    was walked, and ends come at no rate limit. Past MAX_DECODED_VALUES the walker counts
    the values with proton's C codec, stops, and leaves the frame as proton read it; an
    attach of ordinary size is read as before."""
    small = _attach_with({symbol(f"k{i}"): i for i in range(20)})
    decoded = decode(small)
    assert decoded is not None and decoded[1][0] == "big"
    assert _read(small, []) == {("big", False): LinkExtras(desired=DELAYED)}
    nested = _attach_with({symbol("x"): [[]] * 65_000})
    assert decode(nested) is None
    assert _read(nested, []) == {}
    wide = _attach_with({symbol(f"k{i}"): i for i in range(MAX_DECODED_VALUES)})
    assert decode(wide) is None
