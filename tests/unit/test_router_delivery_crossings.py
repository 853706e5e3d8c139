"""Deliveries in flight when frames cross: a message streamed in many frames meets a drain,
an early outcome, an abort or a detach from the other side.

The router copies each frame of a message to the far side as it arrives, so a delivery is
half way through on both of its hops for as long as it streams; proton counts credit, and
keeps the bytes of a delivery, by rules of its own for a delivery that is not complete.
Each test here has the far side act while a delivery is partial (or, for the transaction,
while a delivery is unsettled) and checks what crosses, what the counts say afterwards and
what the connector still holds.
"""

from __future__ import annotations

import os

import pytest
from cproton_ffi import lib
from proton import Delivery, Described, Endpoint, Link, Message, ulong

from connector.policy import Policy
from tests.support.routing import Harness, link_count, receive_all, send_message

# Large enough to take many frames and proton output passes, small enough to be quick.
BODY = b"x" * 300_000
# Bytes of a message that go through before the other side acts.
FIRST = 100_000
ACCEPTED = ulong(0x24)  # the accepted outcome's descriptor
TRANSACTIONAL_STATE = 0x34


def _start(link: Link, tag: str, payload: bytes) -> Delivery:
    """Begin a delivery on ``link`` with only the first ``FIRST`` bytes of ``payload``."""
    dlv = link.delivery(tag)
    link.send(payload[:FIRST])
    return dlv


def _finish(h: Harness, link: Link, payload: bytes) -> None:
    """Send the rest of the delivery begun by ``_start`` and pump it through, a megabyte
    at a time (as a client writes a large message)."""
    for start in range(FIRST, len(payload), 1 << 20):
        link.send(payload[start : start + (1 << 20)])
        h.pump(rounds=500)
    link.advance()
    h.pump(rounds=500)


# ---- drains crossing a message that is still streaming -----------------------------------


def _drain_mid_message(h: Harness, snd: Link, rcv: Link) -> None:
    """``snd`` starts a message to ``rcv``, which has one credit and drains it while the
    message is half way; the rest follows. ``rcv`` must get it whole and be drained."""
    payload = Message(body=BODY).encode()
    _start(snd, "big", payload)
    h.pump()
    assert rcv.current is not None and rcv.current.partial
    rcv.drain(0)
    h.pump()
    _finish(h, snd, payload)
    assert [body for _, body in receive_all(rcv)] == [payload]
    assert not rcv.draining()


def test_a_drain_asked_while_a_message_streams_to_the_guest_ends_after_it() -> None:
    """A guest with one credit drains (JMS's receive with a timeout does) while the broker's
    message is half way through. Nothing is left to drain: the credit is the message's. The
    guest should get the whole message and then hear it has drained, with its credit and the
    broker's in step after. The connector answered the drain at once instead: proton's
    ``pn_link_drained`` gave back the credit of the partial delivery, which proton counts
    only once the delivery is complete, so the rest of the message could not be written
    (no credit) and waited for the guest's next credit. With that credit the message came,
    but the guest then held one credit the broker never heard of, and the broker's next
    message never left it."""
    h = Harness()
    _, rcv, snd = h.receiver("r", "q")
    rcv.flow(1)
    h.pump()
    _drain_mid_message(h, snd, rcv)
    assert rcv.credit == 0
    rcv.flow(1)
    send_message(snd, "next", "after the drain")
    h.pump()
    assert len(receive_all(rcv)) == 1
    assert rcv.credit == snd.credit == 0


def test_a_drain_from_the_broker_while_a_guest_message_streams_ends_after_it() -> None:
    """The other way round: the broker drains the guest's sending link while the guest's
    message is half way through. The broker should get the whole message, then the drain's
    answer; then each credit it grants carries one message. The connector answered the
    drain at once, the rest of the message waited for the broker's next grant, and of a
    later grant of two only one message got through: the guest was told one credit less
    than the broker had given."""
    h = Harness()
    _, snd, rcv = h.sender("s", "q", credit=1)
    _drain_mid_message(h, snd, rcv)
    rcv.flow(2)
    h.pump()
    for i in range(2):
        send_message(snd, f"n{i}", i)
    h.pump()
    assert len(receive_all(rcv)) == 2
    assert snd.credit == rcv.credit == 0


# ---- an outcome that comes before the message is whole -----------------------------------


@pytest.mark.parametrize("settler", ["broker", "guest"])
def test_a_message_settled_half_way_is_settled_at_once_and_its_rest_dropped(settler: str) -> None:
    """The receiving side settles a message while it is still streaming (a broker that
    rejects it on its headers; a guest that releases it after its first frames, as
    ``test_hostile_guests.py`` has one do). The outcome and the settlement reach the sender
    at once (Artemis fails the connection if a release mid-message comes unsettled and the
    settlement later), the next message goes through, and the rest of the message is not
    kept: proton drops the content of a delivery its application settled ("Delivery is no
    more"), though it still adds it to ``pn_session_incoming_bytes``, a count that then
    never comes down and holds no memory (session flow control, which reads it, is off)."""
    h = Harness()
    payload = Message(body=b"x" * 20_000_000).encode()
    if settler == "broker":
        _, sender, receiver = h.sender("s", "q", credit=2)
    else:
        _, receiver, sender = h.receiver("r", "q")
        receiver.flow(2)
        h.pump()
    sent = _start(sender, "big", payload)
    h.pump()
    half = receiver.current
    assert half is not None and half.partial
    half.update(Delivery.REJECTED if settler == "broker" else Delivery.RELEASED)
    half.settle()
    h.pump()
    assert sent.settled and sent.remote_state == half.local_state
    before = _rss_mb()
    _finish(h, sender, payload)
    assert _rss_mb() - before < len(payload) / 2**20 / 2  # not the rest of the message
    send_message(sender, "next", "after")
    h.pump()
    (nxt, body), *more = receive_all(receiver)
    assert not more and Message().decode(body) is None
    nxt.update(Delivery.ACCEPTED)
    nxt.settle()
    h.pump()
    assert all(not r.inflight for r in h.router.routes.values())


def _rss_mb() -> float:
    """This process's resident memory, in MB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---- aborts -------------------------------------------------------------------------------


def test_a_relayed_message_aborted_half_way_gives_its_credit_back() -> None:
    """On an anonymous-relay link whose messages the policy checks, a message is collected
    whole before anything goes to the broker. The guest aborts one half way: the broker
    never saw it and still grants the credit, so the guest should have it back, as it does
    for a message the policy refuses. It did not: with one credit, the guest could send
    nothing more until the broker happened to grant again."""
    policy = Policy.from_table({"default": {"addresses": ["guests.{guest}.#"]}})
    h = Harness()
    h.router._policy = policy.for_guest("web1")
    _, snd, rcv = h.sender("relay", None, credit=1)  # no target: the anonymous relay
    payload = Message(address="guests.web1.q", body=BODY).encode()
    half = _start(snd, "half", payload)
    h.pump()
    half.abort()
    h.pump()
    assert rcv.current is None  # nothing of it reached the broker
    assert snd.credit == rcv.credit == 1
    send_message(snd, "whole", "next", to="guests.web1.q")
    h.pump()
    assert len(receive_all(rcv)) == 1


def test_a_message_the_broker_aborts_half_way_keeps_credit_in_step() -> None:
    """The broker aborts a message to the guest half way: the guest gets the abort (not a
    truncated message), the aborted delivery uses one credit on both hops, and the next
    message comes whole and nothing is left in flight."""
    h = Harness()
    _, rcv, snd = h.receiver("r", "q")
    rcv.flow(3)
    h.pump()
    half = _start(snd, "half", Message(body=BODY).encode())
    h.pump()
    half.abort()
    h.pump()
    aborted = rcv.current
    assert aborted is not None and aborted.aborted
    aborted.settle()
    h.pump()
    assert rcv.credit == snd.credit == 2
    send_message(snd, "next", "whole")
    h.pump()
    ((dlv, body),) = receive_all(rcv)
    assert Message().decode(body) is None and not dlv.aborted
    dlv.update(Delivery.ACCEPTED)
    dlv.settle()
    h.pump()
    assert all(not r.inflight for r in h.router.routes.values())


# ---- a detach crossing the rest of a message ---------------------------------------------


def test_the_brokers_detach_crossing_the_rest_of_a_message_leaves_nothing_behind() -> None:
    """The broker detaches the guest's sending link (with an error) while the guest is half
    way through a 3 MB message, and the guest writes the rest before it reads the detach.
    The rest goes nowhere: the guest's message stays unsettled (the broker said nothing of
    it), the guest's connection stays up, and once the guest answers the detach no link, no
    delivery and no proton link object is left on either side."""
    h = Harness()
    _, snd, rcv = h.sender("s", "q", credit=2)
    payload = Message(body=b"x" * 3_000_000).encode()
    dlv = _start(snd, "big", payload)
    h.pump()
    rcv.close()
    h.broker.transport.pending()
    snd.send(payload[FIRST:])
    snd.advance()
    h.guest.transport.pending()
    h.hops("broker>", "guest>", ">guest", ">broker")
    h.pump(rounds=500)
    assert snd.state & Endpoint.REMOTE_CLOSED
    assert not dlv.settled and dlv.remote_state == 0
    assert h.router.error is None and h.guest.connection.state & Endpoint.REMOTE_ACTIVE
    snd.close()
    h.pump()
    assert h.router.routes == {}
    assert link_count(h.router.guest.connection) == link_count(h.router.upstream.connection) == 0


# ---- transactions -------------------------------------------------------------------------


def _retire(dlv: Delivery, txn: bytes) -> None:
    """Give ``dlv`` the outcome accepted within transaction ``txn`` (transactional-state),
    not settled: the transaction decides."""
    data = lib.pn_disposition_data(lib.pn_delivery_local(dlv._impl))
    lib.pn_data_clear(data)  # proton's Python setter appends to what is there
    dlv.local.data = [txn, Described(ACCEPTED, [])]
    dlv.update(TRANSACTIONAL_STATE)


def test_a_delivery_retired_again_in_a_second_transaction_tells_the_broker() -> None:
    """A guest accepts a message within transaction 1 (transactional-state, unsettled);
    the transaction is rolled back, which leaves the delivery unsettled with no outcome,
    and the guest accepts it again within transaction 2 (AMQP 1.0 §4.4.2). The guest's
    proton writes both dispositions; the broker got only the first, so transaction 2 would
    commit without the acceptance (the message comes back), and a broker that holds
    transaction 1's state against a delivery would apply it to a transaction already
    gone."""
    h = Harness()
    _, rcv, snd = h.receiver("r", "q")
    rcv.flow(1)
    h.pump()
    sent = send_message(snd, "m", "retired twice")
    h.pump()
    ((dlv, _),) = receive_all(rcv)
    for txn in (b"txn-1", b"txn-2"):
        _retire(dlv, txn)
        h.pump()
        assert sent.remote_state == TRANSACTIONAL_STATE
        assert bytes(sent.remote.data[0]) == txn
