"""Flow echo: an engine answers a peer's flow that asks for its link state (AMQP 1.0
§2.7.4), which proton 0.40 by itself never does.

The peer is a proton engine; its echo flows are written here with proton's codec, because
proton cannot send one. What our engine wrote is read back by proton's frame tracer on a
fresh transport, a decoder that shares no code with ours, and the peer's proton must take
the answer without error and keep its own credit where it was.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
from cproton_ffi import ffi, lib
from proton import Data, Described, Transport, symbol, uint, ulong

from connector.routing import frames
from connector.routing.engine import Engine
from connector.routing.frames import FLOW_DECODES_PER_READ
from tests.support.attach_peer import echo_flow, link_flows
from tests.support.routing import pump

WINDOW = uint(2**31 - 1)


def _accept_all(server: Engine) -> None:
    """Open whatever the client opened, as a broker would."""
    lib.pn_connection_open(server.connection)
    ssn = lib.pn_session_head(server.connection, 0)
    while ssn != ffi.NULL:
        if lib.pn_session_state(ssn) & lib.PN_LOCAL_UNINIT:
            lib.pn_session_open(ssn)
        ssn = lib.pn_session_next(ssn, 0)


def _open_link(server: Engine) -> Any:
    link = lib.pn_link_head(server.connection, lib.PN_LOCAL_UNINIT)
    lib.pn_terminus_copy(lib.pn_link_source(link), lib.pn_link_remote_source(link))
    lib.pn_terminus_copy(lib.pn_link_target(link), lib.pn_link_remote_target(link))
    lib.pn_link_open(link)
    return link


class _Pair(NamedTuple):
    client: Engine
    server: Engine
    theirs: Any  # the client's link
    ours: Any  # the server's end of it (None until attached)
    lines: list[str]  # what the client's frame tracer wrote


def _pair(receiving: bool, credit: int = 0, *, attach: bool = True) -> _Pair:
    """A client with one link (receiving from or sending to "q") and our server engine,
    connected; the server's end attached (unless not ``attach``), ``credit`` granted by
    whichever end receives."""
    client = Engine(server=False)
    lines: list[str] = []
    traced = Transport.wrap(client.transport)
    traced.tracer = lambda _t, line: lines.append(line)
    traced.trace(Transport.TRACE_FRM)
    server = Engine(server=True)
    lib.pn_connection_open(client.connection)
    ssn = lib.pn_session(client.connection)
    lib.pn_session_open(ssn)
    link = (lib.pn_receiver if receiving else lib.pn_sender)(ssn, b"l")
    term = lib.pn_link_source(link) if receiving else lib.pn_link_target(link)
    lib.pn_terminus_set_address(term, b"q")
    lib.pn_link_open(link)
    pump(server, client)
    _accept_all(server)
    ours = _open_link(server) if attach else None
    if credit:
        lib.pn_link_flow(link if receiving else ours, credit)
    pump(server, client)
    return _Pair(client, server, link, ours, lines)


def _flow(fields: list[Any]) -> bytes:
    """A flow frame on channel 0, as proton's codec encodes it."""
    data = Data()
    data.put_object(Described(ulong(0x13), fields))
    body = data.encode()
    return (8 + len(body)).to_bytes(4, "big") + b"\x02\x00\x00\x00" + body


def _send(pair: _Pair, link: Any, n: int, size: int = 1) -> None:
    """Send ``n`` messages of ``size`` bytes on ``link`` and move them across."""
    for i in range(n):
        tag = ffi.new("pn_delivery_tag_t *", {"size": 1, "start": ffi.new("char[]", b"%d" % i)})
        lib.pn_delivery(link, tag[0])
        lib.pn_link_send(link, b"m" * size, size)
        lib.pn_link_advance(link)
    pump(pair.server, pair.client)


def _ask(pair: _Pair, *flows: bytes) -> list[dict[str, Any]]:
    """Push the client's ``flows`` into the server; the link flows the client has received."""
    pair.server.push(b"".join(flows))
    pump(pair.server, pair.client)
    return link_flows([line for line in pair.lines if "<-" in line])


def test_a_sender_answers_a_receivers_echo_with_its_delivery_count_and_credit() -> None:
    pair = _pair(receiving=True, credit=10)
    _send(pair, pair.ours, 3)
    assert _ask(pair) == []  # proton's sender never writes a flow by itself
    (answer,) = _ask(pair, echo_flow(incoming=3, outgoing=0, count=3, credit=7))
    assert answer["handle"] == 0
    assert answer["delivery-count"] == 3 and answer["link-credit"] == 7
    assert answer["next-outgoing-id"] == 3 and "echo" not in answer
    rcv = pair.theirs
    assert lib.pn_link_credit(rcv) - lib.pn_link_queued(rcv) == 7
    assert pair.client.condition() is None
    _send(pair, pair.ours, 7)  # the link goes on as before
    assert lib.pn_link_queued(rcv) == 10 and lib.pn_link_credit(rcv) == 10


def test_a_receiver_answers_a_senders_echo_with_its_own_state() -> None:
    pair = _pair(receiving=False, credit=5)
    _send(pair, pair.theirs, 2)
    while lib.pn_link_current(pair.ours) != ffi.NULL:
        lib.pn_link_advance(pair.ours)
    before = len(_ask(pair))
    flows = _ask(pair, echo_flow(incoming=0, outgoing=2, count=2, credit=3))
    assert len(flows) == before + 1
    assert flows[-1]["delivery-count"] == 2 and flows[-1]["link-credit"] == 3
    assert pair.client.condition() is None and lib.pn_link_credit(pair.theirs) == 3


def test_an_echo_before_our_attach_is_answered_after_it() -> None:
    pair = _pair(receiving=True, credit=4, attach=False)
    assert _ask(pair, echo_flow(incoming=0, outgoing=0, count=0, credit=4)) == []  # no link yet
    _open_link(pair.server)
    (answer,) = _ask(pair)
    assert answer["delivery-count"] == 0 and answer["link-credit"] == 4
    received = [line for line in pair.lines if "<- @" in line]
    answered = next(i for i, line in enumerate(received) if "handle=" in line and "@flow" in line)
    assert any("@attach" in line for line in received[:answered])


def test_a_later_flow_in_the_same_read_moves_the_answer() -> None:
    pair = _pair(receiving=True, credit=2)
    _send(pair, pair.ours, 2)
    # The echo, then more credit before the server writes anything.
    (answer,) = _ask(
        pair,
        echo_flow(incoming=2, outgoing=0, count=2, credit=0),
        echo_flow(incoming=2, outgoing=0, count=2, credit=5, echo=False),
    )
    assert answer["delivery-count"] == 2 and answer["link-credit"] == 5


def test_flows_without_echo_get_no_answer() -> None:
    pair = _pair(receiving=True)
    session_echo = _flow([uint(0), WINDOW, uint(0), WINDOW, None, None, None, None, False, True])
    assert _ask(pair, echo_flow(incoming=0, outgoing=0, count=0, credit=3, echo=False)) == []
    assert _ask(pair, session_echo) == []
    assert pair.server.condition() is None


def test_an_answer_waits_for_frames_hidden_behind_a_full_output_buffer() -> None:
    # A message far larger than proton's output buffer: most of its frames wait unseen
    # inside proton. An answer put in at the visible end would count the delivery before
    # its frames arrive, and the client would count it twice.
    pair = _pair(receiving=True, credit=10)
    tag = ffi.new("pn_delivery_tag_t *", {"size": 1, "start": ffi.new("char[]", b"b")})
    lib.pn_delivery(pair.ours, tag[0])
    lib.pn_link_send(pair.ours, b"x" * 2_000_000, 2_000_000)
    lib.pn_link_advance(pair.ours)
    first = pair.server.peek_output()
    pair.client.push(bytes(first))
    pair.server.pop_output(len(first))
    (answer,) = _ask(pair, echo_flow(incoming=0, outgoing=0, count=0, credit=10))
    assert answer["delivery-count"] == 1 and answer["link-credit"] == 9
    assert lib.pn_link_credit(pair.theirs) - lib.pn_link_queued(pair.theirs) == 9
    # It waited without asking proton for a session flow at every try.
    assert sum("<- @flow" in line for line in pair.lines) <= 3


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of ``frames.<name>`` from now on (one entry each): ``decode`` (a
    frame into Python objects), ``_flow_state`` (a flow's link state, with proton's codec)."""
    calls: list[int] = []
    real = getattr(frames, name)
    monkeypatch.setattr(frames, name, lambda frame: calls.append(1) or real(frame))
    return calls


def test_a_flood_of_echo_flows_is_not_decoded_past_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Reading a flow costs more than proton's taking it, so a guest that sends nothing but
    # echo requests must not make the shared loop pay that for each.
    pair = _pair(receiving=True, credit=5)
    echo = echo_flow(incoming=0, outgoing=0, count=0, credit=5)
    read = _count_calls(monkeypatch, "_flow_state")
    decoded = _count_calls(monkeypatch, "decode")
    flows = _ask(pair, echo * (FLOW_DECODES_PER_READ * 10))
    assert len(read) == FLOW_DECODES_PER_READ and decoded == []
    # Some of it went unread, so the sender's answer (built from the peer's last flow) is
    # not given; the next echo, read in whole, is answered.
    assert flows == [] and pair.server.condition() is None
    (answer,) = _ask(pair, echo)
    assert answer["delivery-count"] == 0 and answer["link-credit"] == 5


def test_no_flow_is_decoded_into_python_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Some clients write all eleven fields of every flow, properties too; no flow may cost
    # a decode into Python objects (20 µs, or 45 ms for one with 64 KB of nested lists,
    # which a guest could send four to a read), only a read of its link state.
    pair = _pair(receiving=True, credit=5)
    long_flow = _flow([
        uint(0), WINDOW, uint(0), WINDOW, uint(0), uint(0), uint(6), None, False, False,
        {symbol("x"): [[]] * 1000},
    ])  # fmt: skip
    decoded = _count_calls(monkeypatch, "decode")
    assert _ask(pair, long_flow) == []
    (answer,) = _ask(pair, echo_flow(incoming=0, outgoing=0, count=0, credit=6))
    assert decoded == [] and answer["link-credit"] == 6
