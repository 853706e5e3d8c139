"""Transactions, settle modes and link resume when frames cross, in the harness.

A transaction's work is deliveries like any other (a declare and a discharge on the
coordinator link, transactional-state on transfers and dispositions of the working links),
so what makes it go wrong is what makes any delivery go wrong: a delivery settled towards
one side before the far side settled it, an outcome lost on its way, a field dropped. Here
the transactional frames meet a session's end, a coordinator's detach, the policy and a
resumed attach, in exact orders (``tests/support/routing.py``), and each test checks what
each side is told and what the connector still holds afterwards.
"""

from __future__ import annotations

from typing import Any

import pytest
from proton import Delivery, Described, Endpoint, Link, Message, Terminus, symbol, uint, ulong

from connector.policy import Policy
from tests.reliability.amqp import (
    AMQP_HEADER,
    ATTACH,
    SOURCE,
    TARGET,
    begin_frame,
    frame,
    open_frame,
    performative,
)
from tests.support.routing import Harness, link_count, receive_all, send_message
from tests.unit.test_router_delivery_crossings import TRANSACTIONAL_STATE, _retire

DECLARE = symbol("amqp:declare:list")
DISCHARGE = symbol("amqp:discharge:list")
DECLARED = 0x33
TXN = b"txn-1"


def _received(lines: list[str], performative_name: str) -> list[str]:
    """The frames of one performative (``@disposition``, ``@attach``...) among those a side
    traced as received."""
    return [line for line in lines if f"<- {performative_name}(" in line]


def _coordinator(h: Harness, ssn: Any) -> tuple[Link, Link]:
    """Attach a coordinator link on the guest's session ``ssn``, given one credit by the
    broker; return the guest's end and the broker's."""
    coord = ssn.sender("coordinator")
    coord.target.type = Terminus.COORDINATOR
    coord.target.capabilities.put_object(symbol("amqp:local-transactions"))
    coord.open()
    h.pump()
    far = h.broker_link("coordinator")
    far.flow(1)
    h.pump()
    return coord, far


def _control(link: Link, tag: str, descriptor: Any, fields: list[Any]) -> Delivery:
    """Send a declare or a discharge (an amqp-value of a described list) on the guest's
    coordinator ``link``; not pumped."""
    dlv = link.delivery(tag)
    link.send(Message(body=Described(descriptor, fields)).encode())
    link.advance()
    return dlv


# ---- bugs ---------------------------------------------------------------------------------


def _declared(h: Harness, coord: Link, far: Link) -> None:
    """Declare transaction ``TXN`` on the guest's coordinator ``coord`` (the broker's end
    ``far`` answers ``declared``, settled) and give the coordinator one more credit."""
    declare = _control(coord, "declare", DECLARE, [None])
    h.pump()
    answer = far.current
    far.advance()
    answer.local.data = [TXN]
    answer.update(DECLARED)
    answer.settle()
    far.flow(1)
    h.pump()
    assert declare.remote_state == DECLARED and declare.settled
    declare.settle()


@pytest.mark.parametrize("ender", ["guest", "broker"])
def test_a_session_end_settles_nothing_on_the_far_sides_behalf(ender: str) -> None:
    """A peer ends a session while deliveries on it wait for the far side, inside a
    transaction: the guest has retired the broker's message within a transaction
    (transactional-state, unsettled: the discharge decides), or the broker holds the
    guest's transactional transfer without an outcome. Nothing may be settled towards the
    peer that ended the session on the far side's behalf: the far side settled nothing.

    The router freed the session it was ended on as soon as it closed its own end, before
    that end was written. Proton then settled the session's unsettled deliveries and wrote,
    for each of our sender deliveries, a disposition ``settled=true`` with no state before
    the end: the guest heard the broker forgot its transactional retirement's message, and
    the broker heard the guest gave up its transactional transfer. The session is now freed
    once its end is written, as a link is once its detach is
    (``test_a_detach_settles_nothing_on_the_far_sides_behalf``)."""
    h = Harness()
    if ender == "guest":
        _, rcv, far = h.receiver("r", "q")
        rcv.flow(1)
        h.pump()
        sent = send_message(far, "m", "retired in a transaction")
        h.pump()
        ((dlv, _),) = receive_all(rcv)
        _retire(dlv, TXN)
        h.pump()
        assert sent.remote_state == TRANSACTIONAL_STATE and not sent.settled
        received = h.guest.trace()
        rcv.session.close()
    else:
        _, snd, far = h.sender("s", "q", credit=1)
        dlv = snd.delivery("t")
        dlv.local.data = [TXN]
        dlv.update(TRANSACTIONAL_STATE)  # carried on the transfer
        snd.send(b"\x00Sw\xa1\x01t")  # an amqp-value "t"
        snd.advance()
        h.pump()
        held = far.current
        assert held is not None and held.remote_state == TRANSACTIONAL_STATE
        received = h.broker.trace()
        far.session.close()
    h.pump()
    ended = h.guest if ender == "guest" else h.broker
    assert _received(received, "@end"), "the end was not answered"
    assert not _received(received, "@disposition")
    if ender == "guest":
        assert not dlv.settled
    else:
        assert not held.settled
    assert h.router.error is None and ended.connection.state & Endpoint.REMOTE_ACTIVE


def test_a_resumed_attach_carries_its_unsettled_map_to_the_broker() -> None:
    """A guest whose connection dropped attaches its receiver again under the same name to
    resume it (AMQP 1.0 §2.6.13): the attach's ``unsettled`` map names the deliveries it
    still holds and the state it gave each (here: one accepted, whose disposition was lost
    with the connection), and ``incomplete-unsettled`` says the map is not all of them. The
    broker decides from these what to resend and what to settle; without them it takes the
    link for a new one with nothing unsettled. The broker got neither field (proton's
    engine drops both, and ``frames.LinkExtras`` carries only capabilities, a source's
    default-outcome and an address-less source). No loss follows (a broker that resumes
    resends what it does not know was accepted: a duplicate at-least-once allows), but the
    attach does not cross unchanged, and nothing tells the guest its map was not heard."""
    h = Harness(guest=False)
    received = h.broker.trace()
    source = Described(ulong(SOURCE), ["q"])
    target = Described(ulong(TARGET), [None])
    unsettled = {b"tag-1": Described(ulong(0x24), [])}  # accepted
    # name, handle, role (receiver), snd/rcv settle modes, source, target, unsettled,
    # incomplete-unsettled, initial-delivery-count (a receiver sends none)
    fields = ["resumed", uint(0), True, None, None, source, target, unsettled, True]
    resumed = frame(performative(ATTACH, *fields))
    h.router.guest.push(AMQP_HEADER + open_frame() + begin_frame() + resumed)
    h.pump()
    (attach_line,) = _received(received, "@attach")
    assert "tag-1" in attach_line
    assert "incomplete-unsettled=true" in attach_line


# ---- what already holds --------------------------------------------------------------------


def test_a_guest_without_transactions_is_refused_its_coordinator_alone() -> None:
    """``transactions = false``: the guest's coordinator attach is refused by the connector
    (null target, then a detach with ``amqp:unauthorized-access`` naming transactions), the
    broker never sees a coordinator, and the guest's working link on the same session still
    carries a message and its outcome. No other test attaches a coordinator under a policy
    that forbids it."""
    h = Harness()
    policy = Policy.from_table({"default": {"transactions": False}})
    h.router._policy = policy.for_guest("vm1")
    _, snd, far = h.sender("work", "q", credit=1)
    coord = snd.session.sender("coordinator")
    coord.target.type = Terminus.COORDINATOR
    coord.open()
    h.pump()
    assert coord.state & Endpoint.REMOTE_CLOSED
    assert coord.remote_condition.name == "amqp:unauthorized-access"
    assert "transactions" in coord.remote_condition.description
    assert coord.remote_target.type != Terminus.COORDINATOR
    assert not [
        ev
        for ev in h.broker.events
        if ev.type.name == "PN_LINK_REMOTE_OPEN" and ev.link.name == "coordinator"
    ]
    dlv = send_message(snd, "m", "not in a transaction")
    h.pump()
    ((bdlv, _),) = receive_all(far)
    bdlv.update(Delivery.ACCEPTED)
    bdlv.settle()
    h.pump()
    assert dlv.remote_state == Delivery.ACCEPTED and dlv.settled
    coord.close()
    h.pump()
    assert link_count(h.router.guest.connection) == 1  # the working link alone


@pytest.mark.parametrize("detacher", ["guest", "broker"])
def test_a_discharge_crossing_the_coordinators_detach_is_answered_by_nobody(
    detacher: str,
) -> None:
    """A guest discharges its transaction as the coordinator link is detached, by the guest
    in the same write, or by the broker while the discharge is on its way. The discharge's
    fate is the broker's alone: the guest must not hear an outcome the broker did not
    give (a broker that detached first never read the discharge; the guest that detached
    first cannot be told), nothing may be settled on either side on the other's behalf,
    and afterwards no route, delivery or link is left and the connection is up."""
    h = Harness()
    _, ssn = h.guest_session()
    coord, far = _coordinator(h, ssn)
    _declared(h, coord, far)
    guest_got = h.guest.trace()
    broker_got = h.broker.trace()
    discharge = _control(coord, "c", DISCHARGE, [TXN, False])
    if detacher == "guest":
        coord.close()
        h.hops("guest>", ">broker")
        bdischarge = far.current
        assert bdischarge is not None and not bdischarge.partial
        bdischarge.update(Delivery.ACCEPTED)
        bdischarge.settle()
        far.close()
        h.pump()
    else:
        h.guest.transport.pending()  # the discharge is written: it crosses the detach
        far.close()
        h.broker.transport.pending()
        h.hops("broker>", "guest>", ">guest", ">broker")
        h.pump()
        assert coord.state & Endpoint.REMOTE_CLOSED
        coord.close()
        h.pump()
        assert far.current is None, "the broker got the discharge after its detach"
    assert discharge.remote_state == 0 and not discharge.settled
    assert not _received(guest_got, "@disposition")
    assert not [line for line in _received(broker_got, "@disposition") if "role=false" in line]
    assert h.router.error is None and h.guest.connection.state & Endpoint.REMOTE_ACTIVE
    assert h.router.routes == {}
    assert link_count(h.router.guest.connection) == link_count(h.router.upstream.connection) == 0
