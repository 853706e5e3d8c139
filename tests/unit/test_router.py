"""The routing core without sockets: a guest, the router and a scripted broker in memory.

These cover fields and orders no real broker in the suite produces; the integration tests
cover the same paths against Artemis and RabbitMQ.
"""

from __future__ import annotations

from typing import Any

import pytest
from cproton_ffi import lib
from proton import (
    Condition,
    Data,
    Delivery,
    Endpoint,
    Link,
    Message,
    Terminus,
    symbol,
)

from connector.channel import BACKLOG_HIGH
from connector.routing.router import FORCED, RouterState
from tests.reliability.amqp import (
    AMQP_HEADER,
    CLOSE,
    END,
    OPEN_DESCRIPTOR,
    begin_frame,
    frame,
    open_frame,
    performative,
)
from tests.support.routing import (
    IDENTITY,
    Harness,
    attach,
    link_count,
    move_bytes,
    receive_all,
    send_message,
)


def _value(data: Data):
    data.rewind()
    data.next()
    return data.get_object()


def test_open_carries_container_identity_and_broker_capabilities() -> None:
    h = Harness()
    h.guest.connection.properties = {
        symbol("app"): "agent",
        symbol("qpid-virtio.guest"): "i-am-someone-else",
    }
    conn = h.open_guest("app-1")
    bconn = h.broker.connection
    assert bconn.remote_container == "app-1"
    props = {str(k): v for k, v in bconn.remote_properties.items()}
    assert props["app"] == "agent"
    # The guest's claim is replaced by what the host asserts.
    for key, value in IDENTITY.items():
        assert props[key] == value
    # The guest's open is answered only now, with what the broker offered.
    assert conn.state & Endpoint.REMOTE_ACTIVE
    assert "ANONYMOUS-RELAY" in [str(c) for c in conn.remote_offered_capabilities]
    assert conn.remote_properties == {symbol("product"): "scripted-broker"}
    assert h.router.state is RouterState.OPEN


def test_guest_open_waits_for_the_broker() -> None:
    h = Harness(broker_answers_open=False)
    conn = h.open_guest()
    assert not conn.state & Endpoint.REMOTE_ACTIVE
    h.broker.connection.open()
    h.pump()
    assert conn.state & Endpoint.REMOTE_ACTIVE


def test_broker_refusing_the_open_closes_the_guest_with_its_condition() -> None:
    h = Harness(broker_answers_open=False)
    conn = h.open_guest()
    h.broker.connection.condition = Condition("amqp:unauthorized-access", "no")
    h.broker.connection.open()
    h.broker.connection.close()
    h.pump()
    assert conn.state & Endpoint.REMOTE_CLOSED
    assert conn.remote_condition.name == "amqp:unauthorized-access"


def test_upstream_failure_forces_the_guest_to_reconnect() -> None:
    h = Harness(broker_answers_open=False)
    conn = h.open_guest()
    h.router.upstream_failed("cannot connect to amqp://127.0.0.1:1: Connection refused")
    h.pump()
    assert conn.state & Endpoint.REMOTE_CLOSED
    assert conn.remote_condition.name == FORCED
    assert "Connection refused" in conn.remote_condition.description
    assert h.counters.upstream_failures == 1


@pytest.mark.parametrize("closer", ["guest", "router"])
def test_a_broker_hanging_up_during_our_close_fails_nothing(closer: str) -> None:
    # The guest closed its connection (or left, or broke a rule: the router closes both);
    # the broker then hangs up without answering our close. That is the end of the close
    # exchange, not an upstream failure: no failure counted (the next guest connection would
    # be counted as a reconnect), no warning about closing a guest that is gone, and the
    # recorded cause stays the guest's.
    h = Harness()
    conn = h.open_guest()
    if closer == "guest":
        conn.close()
    else:
        h.router.violation("amqp:resource-limit-exceeded", "too many links")
    h.pump()
    h.router.upstream_failed("amqp://127.0.0.1:5672 hung up mid-connection")
    h.pump()
    assert h.counters.upstream_failures == 0
    assert not h.router.failed_opening
    assert not any("upstream failed" in line for line in h.log.lines), h.log.lines
    assert h.router.upstream_dead
    if closer == "router":
        assert h.router.error == ("amqp:resource-limit-exceeded", "too many links")


def test_attach_fields_cross_unchanged() -> None:
    h = Harness()
    _, ssn = h.guest_session()
    rcv = ssn.receiver("sub-1")
    src = rcv.source
    src.address = "orders"
    src.durability = Terminus.DELIVERIES
    src.expiry_policy = Terminus.EXPIRE_NEVER
    src.timeout = 42
    src.distribution_mode = Terminus.DIST_MODE_COPY
    src.capabilities.put_array(False, Data.SYMBOL)
    src.capabilities.enter()
    src.capabilities.put_symbol("topic")
    src.capabilities.exit()
    src.filter.put_map()
    src.filter.enter()
    src.filter.put_symbol("selector")
    src.filter.put_string("colour = 'red'")
    src.filter.exit()
    rcv.snd_settle_mode = Link.SND_UNSETTLED
    rcv.rcv_settle_mode = Link.RCV_SECOND
    rcv.properties = {symbol("shared"): True}
    rcv.open()
    h.pump()
    blink = h.broker_link("sub-1")
    bsrc = blink.remote_source
    assert bsrc.address == "orders"
    assert bsrc.durability == Terminus.DELIVERIES
    assert bsrc.expiry_policy == Terminus.EXPIRE_NEVER
    assert bsrc.timeout == 42
    assert bsrc.distribution_mode == Terminus.DIST_MODE_COPY
    assert [str(c) for c in _value(bsrc.capabilities)] == ["topic"]
    assert _value(bsrc.filter) == {symbol("selector"): "colour = 'red'"}
    assert blink.remote_rcv_settle_mode == Link.RCV_SECOND
    assert blink.remote_properties == {symbol("shared"): True}
    assert rcv.state & Endpoint.REMOTE_ACTIVE
    assert rcv.remote_source.address == "orders"


def test_dynamic_node_address_assigned_by_the_broker_reaches_the_guest() -> None:
    h = Harness()

    def broker(ev) -> None:
        if ev.type.name == "PN_LINK_REMOTE_OPEN" and ev.link.remote_source.dynamic:
            ev.link.source.copy(ev.link.remote_source)
            ev.link.source.address = "tmp.queue.1"
            ev.link.target.copy(ev.link.remote_target)
            ev.link.open()
        else:
            h.broker_hook = None
            h._broker_default(ev)
            h.broker_hook = broker

    _, ssn = h.guest_session()
    h.broker_hook = broker
    rcv = ssn.receiver("reply")
    rcv.source.dynamic = True
    rcv.open()
    h.pump()
    assert rcv.remote_source.address == "tmp.queue.1"
    assert rcv.remote_source.dynamic


def _refuse_link(ev) -> None:
    ev.link.open()
    ev.link.condition = Condition("amqp:not-found", "no queue 'nope'")
    ev.link.close()


def _end_session(ev) -> None:
    ev.session.condition = Condition("amqp:not-found", "no queue 'nope'")
    ev.session.close()


@pytest.mark.parametrize(
    "broker_refuses",
    [_refuse_link, _end_session],  # RabbitMQ refuses an attach by ending the whole session
    ids=["detach", "session-end"],
)
def test_refused_attach_error_reaches_the_guest(broker_refuses) -> None:
    h = Harness()
    _, ssn = h.guest_session()
    h.broker_hook = lambda ev: ev.type.name == "PN_LINK_REMOTE_OPEN" and broker_refuses(ev)
    snd = attach(ssn, "s", "nope")
    h.pump()
    ended = snd if broker_refuses is _refuse_link else ssn
    assert ended.state & Endpoint.REMOTE_CLOSED
    assert ended.remote_condition.name == "amqp:not-found"
    assert ended.remote_condition.description == "no queue 'nope'"
    assert h.router.routes == {}


def test_guest_never_gets_more_credit_than_the_broker_gave() -> None:
    h = Harness()
    _, snd, brcv = h.sender("s1", "q")
    assert snd.credit == 0
    brcv.flow(3)
    h.pump()
    assert snd.credit == 3
    for i in range(3):
        send_message(snd, f"t{i}", i)
    h.pump()
    assert snd.credit == 0
    brcv.flow(2)
    h.pump()
    assert snd.credit == 2


def test_outcomes_cross_with_their_fields_and_settle_only_when_the_far_side_does() -> None:
    h = Harness()
    _, snd, brcv = h.sender("s1", "q", credit=5)
    dlvs = [send_message(snd, f"t{i}", i) for i in range(5)]
    h.pump()
    received = receive_all(brcv)
    assert [Message().decode(b) or None for _, b in received]  # decodes: bytes untouched
    assert len(received) == 5
    b = [d for d, _ in received]
    b[0].update(Delivery.ACCEPTED)
    b[1].local.condition = Condition("amqp:invalid-field", "bad colour")
    b[1].update(Delivery.REJECTED)
    b[2].update(Delivery.RELEASED)
    b[3].local.failed = True
    b[3].local.undeliverable = True
    b[3].local.annotations = {symbol("x-why"): "busy"}
    b[3].update(Delivery.MODIFIED)
    b[4].local.section_number = 1
    b[4].local.section_offset = 7
    b[4].update(Delivery.RECEIVED)
    h.pump()
    assert [d.remote_state for d in dlvs] == [
        Delivery.ACCEPTED,
        Delivery.REJECTED,
        Delivery.RELEASED,
        Delivery.MODIFIED,
        Delivery.RECEIVED,
    ]
    assert dlvs[1].remote.condition.description == "bad colour"
    assert dlvs[3].remote.failed and dlvs[3].remote.undeliverable
    assert dlvs[3].remote.annotations == {symbol("x-why"): "busy"}
    assert (dlvs[4].remote.section_number, dlvs[4].remote.section_offset) == (1, 7)
    # Not settled by the broker: the guest's deliveries are not settled either.
    assert not any(d.settled for d in dlvs)
    b[0].settle()
    h.pump()
    assert dlvs[0].settled and not dlvs[2].settled


def test_deliveries_are_counted_and_bytes_stream_through_unchanged() -> None:
    h = Harness()
    _, snd, brcv = h.sender("s1", "q", credit=1)
    payload = Message(body=b"x" * 3_000_000).encode()
    snd.delivery("big")
    # Write it in pieces; the router forwards each piece as it arrives.
    for i in range(0, len(payload), 100_000):
        snd.send(payload[i : i + 100_000])
        h.pump()
    snd.advance()
    h.pump()
    got = receive_all(brcv)
    assert len(got) == 1 and got[0][1] == payload
    assert h.counters.deliveries_in == 1
    assert h.counters.bytes_in == len(payload)


def test_output_proton_holds_behind_a_full_buffer_counts_as_backlog() -> None:
    # Proton frames a message into a buffer it does not report as pending whenever the
    # broker's session window allows, and its pending output stops at the broker's
    # max-frame-size (32 KiB here). Nothing reaches the broker in this test, so all of the
    # message waits upstream: the backlog must say so, or backpressure never stops the guest.
    h = Harness()
    _, snd, brcv = h.sender("s1", "q", credit=1)
    up = h.router.upstream
    snd.delivery("big")
    snd.send(b"x" * 1_000_000)
    snd.advance()
    while move_bytes(h.guest.transport, h.router.guest):
        h.router.process()
    assert h.counters.bytes_in == 1_000_000  # all of it went into the upstream engine
    assert 0 < lib.pn_transport_pending(up.transport) <= 64 * 1024
    assert up.backlog() > BACKLOG_HIGH
    # Once the broker has read it all, the backlog is back to nothing.
    h.pump()
    assert up.backlog() == 0
    assert len(receive_all(brcv)[0][1]) == 1_000_000


def test_aborted_transfer_is_passed_on() -> None:
    h = Harness()
    _, snd, brcv = h.sender("s1", "q", credit=1)
    dlv = snd.delivery("a")
    snd.send(b"\x00" * 200_000)
    h.pump()
    dlv.abort()
    h.pump()
    assert brcv.current is None or brcv.current.aborted
    assert h.counters.deliveries_in == 0


def test_presettled_messages_are_settled_on_both_sides() -> None:
    h = Harness()
    _, ssn = h.guest_session()
    snd = ssn.sender("ps")
    snd.target.address = "q"
    snd.snd_settle_mode = Link.SND_SETTLED
    snd.open()
    h.pump()
    brcv = h.broker_link("ps")
    brcv.flow(1)
    h.pump()
    send_message(snd, "p", "hi").settle()
    h.pump()
    bdlv = brcv.current
    assert bdlv is not None and bdlv.settled
    assert all(not r.inflight for r in h.router.routes.values())


def test_broker_to_guest_credit_and_drain() -> None:
    h = Harness()
    _, rcv, bsnd = h.receiver("r1", "q")
    rcv.flow(4)
    h.pump()
    assert bsnd.credit == 4
    send_message(bsnd, "m1", "one")
    h.pump()
    assert rcv.current is not None
    rcv.drain(0)  # ask the broker to use or return the remaining 3
    h.pump()
    assert bsnd.drain_mode
    assert bsnd.drained() == 3  # the broker has nothing more
    h.pump()
    assert rcv.credit - rcv.queued == 0
    assert not rcv.draining()


def test_detach_and_close_carry_conditions_both_ways() -> None:
    h = Harness()
    _, snd, brcv = h.sender("s1", "q")
    brcv.condition = Condition("amqp:resource-deleted", "queue deleted")
    brcv.close()
    h.pump()
    assert snd.state & Endpoint.REMOTE_CLOSED
    assert snd.remote_condition.name == "amqp:resource-deleted"
    conn = h.guest.connection
    conn.condition = Condition("app:bye", "done")
    conn.close()
    h.pump()
    assert h.broker.connection.remote_condition.name == "app:bye"
    assert h.router.guest_finished()


def test_guest_gone_closes_upstream_and_leaves_deliveries_unsettled() -> None:
    h = Harness()
    _, snd, brcv = h.sender("s1", "q", credit=1)
    send_message(snd, "u", "x")
    h.pump()
    bdlv = brcv.current
    h.router.guest_gone("EOF")
    h.pump()
    assert h.broker.connection.state & Endpoint.REMOTE_CLOSED
    assert not bdlv.settled and bdlv.local_state == 0


def test_transactional_state_and_declared_outcome_cross() -> None:
    """A coordinator link: the declare's 'declared' outcome (0x33) and a transfer's
    transactional-state (0x34) carry their raw fields across."""
    h = Harness()
    _, ssn = h.guest_session()
    coord = ssn.sender("txn")
    coord.target.type = Terminus.COORDINATOR
    coord.target.capabilities.put_object(symbol("amqp:local-transactions"))
    coord.open()
    h.pump()
    bcoord = h.broker_link("txn")
    assert bcoord.remote_target.type == Terminus.COORDINATOR
    bcoord.flow(1)
    h.pump()
    dlv = send_message(coord, "d", "declare")
    h.pump()
    bdlv = bcoord.current
    bcoord.advance()
    bdlv.local.data = [b"txn-1"]
    bdlv.update(0x33)
    bdlv.settle()
    h.pump()
    assert dlv.remote_state == 0x33
    assert dlv.remote.data == [b"txn-1"]
    assert dlv.settled


def _one_message_reaches_the_broker(h: Harness, snd: Link) -> None:
    """The broker grants one credit on the guest's attached sender ``snd``; a message sent
    on it arrives whole."""
    brcv = h.broker_link(snd.name)
    brcv.flow(1)
    h.pump()
    send_message(snd, "d", "through")
    h.pump()
    assert len(receive_all(brcv)) == 1


def test_open_begin_attach_pipelined_in_one_write() -> None:
    """Proton clients write open, begin and attach before any answer arrives."""
    h = Harness()
    ssn, snd = h.pipelined("fast", "q")
    assert ssn.state & Endpoint.REMOTE_ACTIVE
    assert snd.state & Endpoint.REMOTE_ACTIVE
    _one_message_reaches_the_broker(h, snd)


def test_deliveries_never_written_upstream_are_not_counted() -> None:
    h = Harness()
    # The broker's session window takes one transfer at a time: of the guest's three, the
    # upstream engine frames one and holds two until the broker's next flow.
    h.broker.transport.max_frame_size = 512

    def narrow_window(ev: Any) -> None:
        if ev.type.name == "PN_SESSION_REMOTE_OPEN":
            ev.session.incoming_capacity = 512
        h.broker_hook = None
        h._broker_default(ev)
        h.broker_hook = narrow_window

    h.broker_hook = narrow_window
    _, ssn = h.guest_session()
    snd = attach(ssn, "s", "q")
    h.pump()
    h.broker_link("s").flow(5)
    h.pump()
    for i in range(3):
        send_message(snd, f"u{i}", i)
    # The guest's bytes reach the router; the broker's answer never comes back.
    h.router.guest.push(h.guest.transport.peek(h.guest.transport.pending()))
    h.router.process()
    assert h.counters.deliveries_in == 3
    h.router.upstream_failed("broker gone")
    h.router.uncount_unsent(upstream=True)
    h.router.uncount_unsent(upstream=True)  # however often the engine's end is seen
    # The one proton framed for the broker stays counted, like one whose write failed.
    assert h.counters.deliveries_in == 1


def test_links_detached_without_closing_are_freed_on_both_sides() -> None:
    """A guest that detaches links (closed=false) and attaches new ones on one long-lived
    session leaves no link objects behind on either side of the connector."""
    h = Harness()
    h.answering(lambda ev: ev.link.detach(), "PN_LINK_REMOTE_DETACH")
    _, ssn = h.guest_session()
    for i in range(5):
        snd = attach(ssn, f"s{i}", "q")
        h.pump()
        snd.detach()
        h.pump()
        assert h.guest.types().count("PN_LINK_REMOTE_DETACH") == i + 1  # answered in kind
        assert snd.state & Endpoint.REMOTE_ACTIVE  # never closed
    assert h.router.routes == {}
    assert link_count(h.router.guest.connection) == 0
    assert link_count(h.router.upstream.connection) == 0


def test_a_source_without_an_address_reaches_the_broker() -> None:
    """Proton's clients attach every sender with a source that has no address; proton's
    engine takes such a source for none. Artemis then fails on the missing source (it
    closes the connection when it refuses a relayed message), so the source is carried
    whole: the attach frame the broker receives has it, with its fields."""
    h = Harness()
    _, ssn = h.guest_session()
    received = h.broker.trace()
    snd = ssn.sender("s")
    snd.target.address = "q"
    snd.source.durability = Terminus.DELIVERIES  # a field proton drops with the source
    snd.open()
    h.pump()
    (upstream,) = [line for line in received if "<- @attach" in line]
    assert "source=@source(40) [durable=0x2, timeout=0x0, dynamic=false]" in upstream


def test_links_of_an_ended_session_are_not_awaited_after_it_is_freed() -> None:
    """A session ended with links still attached takes its links with it: none is left
    waiting for a detach that will never come (the set would grow for the connection's
    life, and a freed link's address, reused by a new link, would swallow its detach)."""
    h = Harness()
    h.answering(lambda ev: ev.session.close(), "PN_SESSION_REMOTE_CLOSE")
    conn = h.open_guest()
    for i in range(3):
        ssn = conn.session()
        ssn.open()
        attach(ssn, f"s{i}", "q")
        attach(ssn, f"r{i}", "q", sending=False)
        h.pump()
        ssn.close()
        h.pump()
        assert ssn.state & Endpoint.REMOTE_CLOSED
    assert h.router.routes == {}
    assert h.router._awaiting_detach == set()


def test_each_received_progress_reaches_the_guest_once() -> None:
    """``received`` is a state a receiver sends again and again (how far it has got with a
    large message); each update crosses, not only the first, and one said twice crosses
    once (proton writes a disposition for every update we make, duplicates included)."""
    h = Harness()
    _, snd, brcv = h.sender("s1", "q", credit=1)
    dlv = send_message(snd, "t", "x" * 1000)
    h.pump()
    (bdlv, _), *_ = receive_all(brcv)
    received = h.guest.trace()
    for offset in (10, 10, 20):
        bdlv.local.section_offset = offset
        bdlv.update(Delivery.RECEIVED)
        h.pump()
        assert dlv.remote_state == Delivery.RECEIVED
        assert dlv.remote.section_offset == offset
    assert sum("<- @disposition" in line for line in received) == 2


def _sessions_with_senders(h: Harness, first: int, count: int) -> list[tuple[Any, Link]]:
    """Open ``count`` guest sessions, each with a sender ``s{i}`` to ``q{i}`` from
    ``i = first``, without pumping."""
    opened = []
    for i in range(first, first + count):
        ssn = h.guest.connection.session()
        ssn.open()
        opened.append((ssn, attach(ssn, f"s{i}", f"q{i}")))
    return opened


@pytest.mark.parametrize("pipelined", [False, True], ids=["after-open", "before-open"])
def test_sessions_over_the_brokers_channel_max_are_refused_alone(pipelined: bool) -> None:
    """A broker allowing two sessions (channel-max 1; RabbitMQ 4 allows 64): the guest's
    third begin, whether it came before the broker's open or after, is ended with
    resource-limit-exceeded, and the other two sessions go on. Proton's upstream engine
    stops writing anything at all once asked for a begin it has no channel for."""
    h = Harness()
    h.broker.transport.channel_max = 1
    if pipelined:
        h.guest.connection.open()  # the begins follow before the broker's open
    else:
        h.open_guest()
    opened = _sessions_with_senders(h, 0, 3)
    h.pump()
    assert h.broker.transport.condition is None  # no begin above its channel-max
    (ssn0, snd0), (ssn1, snd1), (ssn2, _) = opened
    assert ssn2.state & Endpoint.REMOTE_CLOSED
    assert ssn2.remote_condition.name == "amqp:resource-limit-exceeded"
    assert "2 sessions" in ssn2.remote_condition.description
    for ssn, snd in ((ssn0, snd0), (ssn1, snd1)):
        assert ssn.state & Endpoint.REMOTE_ACTIVE and snd.state & Endpoint.REMOTE_ACTIVE
    _one_message_reaches_the_broker(h, snd0)
    # Once a session has ended both ways, its channel serves the guest's next begin.
    ssn1.close()
    h.pump()
    h.broker.connection.session_head(Endpoint.LOCAL_ACTIVE | Endpoint.REMOTE_CLOSED).close()
    h.pump()
    [(ssn3, snd3)] = _sessions_with_senders(h, 3, 1)
    h.pump()
    assert ssn3.state & Endpoint.REMOTE_ACTIVE and snd3.state & Endpoint.REMOTE_ACTIVE


def test_a_guest_that_closes_before_the_broker_opens_is_answered_at_once() -> None:
    """A client that gives up before the broker's open (proton's own clients hold their
    close until they are answered; others do not) is answered with an open and a close
    at once: proton writes no close before an open, so the guest waited for the timeouts."""
    h = Harness(guest=False, broker_answers_open=False)
    h.router.guest.push(AMQP_HEADER + open_frame() + frame(performative(CLOSE)))
    h.pump()
    written = bytes(h.written)
    assert OPEN_DESCRIPTOR in written
    assert b"\x00S\x18" in written[written.index(OPEN_DESCRIPTOR) :]  # the close after it


def test_a_link_ended_before_the_broker_opens_is_answered_once_it_does() -> None:
    """Proton writes a link's frames only once its session's begin is written: a guest link
    ended before the broker's open (which the guest's begin waits for) must outlive the
    wait, or the guest never hears its attach or detach answered."""
    h = Harness(broker_answers_open=False)
    _, ssn = h.guest_session()  # its begin waits for the broker's open
    hasty = attach(ssn, "hasty", "q")
    h.pump()
    hasty.close()
    h.pump()
    assert not hasty.state & Endpoint.REMOTE_ACTIVE  # nothing answered yet
    h.broker.connection.open()
    h.pump()
    assert hasty.state & Endpoint.REMOTE_CLOSED
    assert link_count(h.router.guest.connection) == 0  # and then freed


def test_a_transfer_the_broker_sends_after_the_guest_closed_is_not_counted() -> None:
    """The guest closed its connection; the broker, not having read our close yet, sends one
    more message. It never reaches the guest (the broker redelivers it), so it is not
    counted as routed out."""
    h = Harness()
    _, rcv, blink = h.receiver("r", "q")
    rcv.flow(10)
    h.pump()
    h.guest.connection.close()
    move_bytes(h.guest.transport, h.router.guest)
    h.router.process()  # the router closes the upstream; the broker has not read that yet
    send_message(blink, "late", "late")
    move_bytes(h.broker.transport, h.router.upstream)
    h.router.process()
    assert h.counters.deliveries_out == 0


def test_a_session_the_guest_ends_before_the_brokers_begin_is_ended_when_that_comes() -> None:
    """The guest's begin is answered at once, so its end can overtake the broker's begin.
    Proton forgets a session's channel as its end goes out: the broker's begin arriving
    after it failed the whole upstream ("begin reply to unknown channel"), and with it every
    other link of the guest. The end goes upstream once the broker's begin has come."""
    h = Harness()
    conn, snd, _ = h.sender("s", "q")
    held: list[Any] = []
    h.answering(lambda ev: held.append(ev.session), "PN_SESSION_REMOTE_OPEN")
    brief = conn.session()
    brief.open()
    h.pump()
    assert brief.state & Endpoint.REMOTE_ACTIVE and len(held) == 1
    received = h.broker.trace()
    held[0].open()
    h.broker.transport.pending()  # the broker's begin is written, on its way
    brief.close()  # and the guest's end overtakes it
    move_bytes(h.guest.transport, h.router.guest)
    h.router.process()
    up = h.router.upstream
    move_bytes(up, h.broker.transport)
    move_bytes(h.broker.transport, up)
    h.router.process()
    h.pump()
    assert not h.router.upstream_dead and up.condition() is None
    assert brief.state & Endpoint.REMOTE_CLOSED
    assert any("<- @end" in line for line in received)  # the broker heard the end
    _one_message_reaches_the_broker(h, snd)


def test_a_session_begun_and_ended_before_the_brokers_open_never_reaches_the_broker() -> None:
    """Ended before the broker's open, the upstream twin had not been begun: it is freed
    unwritten. Written, its begin and end would race the broker's begin the same way."""
    h = Harness(guest=False, broker_answers_open=False)
    received = h.broker.trace()
    h.router.guest.push(AMQP_HEADER + open_frame() + begin_frame() + frame(performative(END)))
    h.pump()
    h.broker.connection.open()
    h.pump()
    assert not h.router.upstream_dead
    assert not [line for line in received if "@begin" in line or "@end" in line]
    assert h.router.session_count() == 0


def test_a_twin_freed_unbegun_is_not_touched_again() -> None:
    """A guest session ended before the broker's open has its upstream twin freed unwritten
    (``_end_upstream``); the end's handling then read that freed twin's state to decide
    whether to free it again: a use after free, and a double free should the freed memory
    read as ended. (tests/conftest.py's FreedWatch fails the call.)"""
    h = Harness(guest=False, broker_answers_open=False)
    h.router.guest.push(AMQP_HEADER + open_frame() + begin_frame() + frame(performative(END)))
    h.pump()
