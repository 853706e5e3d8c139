"""Refusals and limits that cross the guest's or the broker's other frames in flight.

The connector refuses some of the guest's attaches itself (the policy forbids the address,
or the guest is over a limit) and some of its sessions (beyond the broker's channel-max),
and it detaches a link over the message-size limit. Each refusal is frames of its own that
the guest did not wait for, so they meet whatever the guest sent meanwhile: its detach, its
end, an attach again under the same name, or the rest of a message. The harness makes them
meet in exact orders (``tests/support/routing.py``).
"""

from __future__ import annotations

import pytest
from cproton_ffi import lib
from proton import Condition, Delivery, Endpoint, Event, Message, uint

from connector.limits import GuestLimits
from connector.policy import Policy
from tests.reliability.amqp import TRANSFER, attach_frame, frame, handshake, performative
from tests.support.routing import Harness, attach, link_count, receive_all, send_message

# The guest vm1 may attach to q and q2 only.
POLICY = Policy.from_table({"default": {"addresses": ["q", "q2"]}})
FORBIDDEN = "forbidden"

# A data section of 30,000 bytes: a transfer frame well under the guest's 64 KiB frame size.
CHUNK = 30_000
SECTION = b"\x00Su\xb0" + (10 * CHUNK).to_bytes(4, "big")
# Ten times the message-size limit set below: far more than the connector may hold for a
# link it has refused or detached.
FLOOD_FRAMES = 100
MAX_MESSAGE = 100_000


def _refusing(**kwargs: object) -> Harness:
    """A harness whose guest (vm1) has ``POLICY``."""
    h = Harness(**kwargs)  # type: ignore[arg-type]
    h.router._policy = POLICY.for_guest("vm1")
    return h


def _answers(lines: list[str]) -> list[str]:
    """The attaches and detaches among frames the guest received, by kind."""
    return [
        "attach" if "<- @attach" in line else "detach"
        for line in lines
        if "<- @attach" in line or "<- @detach" in line
    ]


def _nothing_left(h: Harness) -> None:
    """No refusal, held answer, ended link or awaited detach is left in the router."""
    r = h.router
    assert not r._deferred_refusals and not r._answers_held and not r._ended_unbegun
    assert not r._unwritten_links and not r._awaiting_detach


def _buffered(h: Harness) -> int:
    """Message bytes the router's guest engine holds that nobody has read yet."""
    total, ssn = 0, lib.pn_session_head(h.router.guest.connection, 0)
    while ssn:
        total += lib.pn_session_incoming_bytes(ssn)
        ssn = lib.pn_session_next(ssn, 0)
    return total


def _transfer(first: bool) -> bytes:
    """One frame of a large unsettled message on channel 0, handle 0 (more follows)."""
    if first:
        fields = [uint(0), uint(0), b"t", uint(0), False, True]
        return frame(performative(TRANSFER, *fields, payload=SECTION + b"x" * CHUNK))
    return frame(
        performative(TRANSFER, uint(0), None, None, None, None, True, payload=b"x" * CHUNK)
    )


# ---- bugs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("address", [FORBIDDEN, "q"], ids=["refused", "routed"])
def test_namesakes_ended_before_the_brokers_open_are_answered_one_after_the_other(
    address: str,
) -> None:
    """Before the broker's open a guest attaches a link, detaches it, and attaches and
    detaches it again under the same name (a client retrying, say after a refusal it has
    not heard yet: none can come before our open). Nothing can be answered until the
    broker's open, so both links wait, and then both were answered at once. Proton writes
    every attach of an output pass before every detach, so the guest read two attaches of
    one name, its proton failed the connection ("link name already attached"), and every
    other link of the guest went with it. The second answer now waits for the first
    link's detach to be written, as it does once the session is begun
    (``_free_written``)."""
    h = _refusing(broker_answers_open=False)
    _, ssn = h.guest_session()  # its begin waits for the broker's open
    received = h.guest.trace()
    for _ in range(2):
        link = attach(ssn, "x", address)
        h.pump()
        link.close()
        h.pump()
    assert _answers(received) == []  # nothing can be answered yet
    h.broker.connection.open()
    h.pump()
    assert h.guest.transport.condition is None
    assert _answers(received) == ["attach", "detach", "attach", "detach"]
    assert link.state & Endpoint.REMOTE_CLOSED
    _nothing_left(h)
    assert link_count(h.router.guest.connection) == 0


@pytest.mark.parametrize("link", ["refused", "over-the-size-limit"])
def test_a_link_refused_or_cut_does_not_buffer_what_the_guest_sends_on_it(link: str) -> None:
    """A guest sends on a link that the connector refused (its policy forbids the address)
    or detached for a message over ``max_message_size``, before it has read that detach,
    or never reading it. The link has no route any more, so the router ignores its
    deliveries, and proton keeps each transfer's bytes in the delivery for as long as the
    link lives: with no credit given on the refused link and the size limit passed on the
    other, the guest grew the connector's memory as far as it liked (3 MB here, 30 times
    the size limit) while its connection stayed up. Its bytes are now dropped as they come,
    and a transfer without credit ends the connection, as it does on a routed link."""
    h = _refusing(guest=False, limits=GuestLimits(max_message_size=MAX_MESSAGE))
    address = FORBIDDEN if link == "refused" else "q"
    h.router.guest.push(handshake() + attach_frame("x", 0, sender=True, address=address))
    h.pump()
    if link == "over-the-size-limit":
        h.broker_link("x").flow(1)
        h.pump()
    for i in range(FLOOD_FRAMES):
        h.router.guest.push(_transfer(first=i == 0))
        h.pump()
    why = "refused attach" if link == "refused" else "amqp:link:message-size-exceeded"
    assert any(why in line for line in h.log.lines)
    assert _buffered(h) <= 2 * MAX_MESSAGE, _buffered(h)
    if link == "refused":  # it never had credit: the first transfer ends the connection
        assert h.router.error is not None
        assert "transfer without credit on x" in h.router.error[1]
    else:  # the rest of a message it had credit for: dropped, the connection goes on
        assert h.router.error is None


def test_a_relayed_message_with_two_properties_sections_is_refused() -> None:
    """A guest whose policy restricts addresses sends on the anonymous relay one message
    made of two: properties naming a forbidden address and a body, then properties naming
    an allowed one and another body. The relay check read the message with proton, which
    keeps the last properties section it meets (``to`` the allowed address), and passed the
    bytes on unchanged; Artemis reads the first (``tests/reliability/
    test_hostile_refusals.py``), so the message reached the forbidden address. A message
    that is not one well-formed message cannot be checked, and is rejected."""
    h = _refusing()
    _, snd, brcv = h.sender("relay", None, credit=1)
    two = Message(address=FORBIDDEN, body="in").encode() + Message(address="q", body="x").encode()
    dlv = snd.delivery("two")
    snd.send(two)
    snd.advance()
    h.pump()
    assert receive_all(brcv) == []
    assert dlv.remote_state == Delivery.REJECTED


# ---- crossings that already work, kept working --------------------------------------------


@pytest.mark.parametrize("ender", ["session", "connection"])
def test_a_refusal_and_the_guests_end_in_one_write_leave_nothing(ender: str) -> None:
    """The guest attaches to a forbidden address and, in the same write, ends the link's
    session or closes its connection. The refusal's attach and detach go out before our
    end or close, and the refused link goes with its session: nothing is left behind,
    and the broker hears nothing of the link."""
    h = _refusing()
    conn, ssn = h.guest_session()
    received = h.guest.trace()
    refused = attach(ssn, "x", FORBIDDEN)
    (ssn if ender == "session" else conn).close()
    h.pump()
    assert h.guest.transport.condition is None
    assert _answers(received) == ["attach", "detach"]
    assert refused.remote_condition.name == "amqp:unauthorized-access"
    assert not any(ev.type.name == "PN_LINK_REMOTE_OPEN" for ev in h.broker.events)
    _nothing_left(h)
    if ender == "session":
        assert link_count(h.router.guest.connection) == 0


def test_a_brokers_end_crossing_a_detach_and_a_refused_reattach() -> None:
    """RabbitMQ refuses an attach by ending its session. Before the guest reads that end,
    it detaches the link and attaches it again under its name, now to a forbidden address,
    with another link beside it. The guest gets its detach answered, the refusal (which
    waited for that detach to be written), then the broker's end with its error; the other
    link, whose session is gone, gets nothing more than the end. Once the guest answers the
    end nothing is left, and the guest's connection stays up."""
    h = _refusing()

    def rabbit(ev: Event) -> None:
        ev.session.condition = Condition("amqp:not-found", "no such queue")
        ev.session.close()

    h.answering(rabbit, "PN_LINK_REMOTE_OPEN")
    _, ssn = h.guest_session()
    received = h.guest.trace()
    first = attach(ssn, "x", "q")
    h.guest.transport.pending()
    h.hops("guest>", ">broker")  # the broker ends the session; its end is on its way
    h.broker.transport.pending()
    first.close()
    h.guest.transport.pending()  # written alone: the guest's proton would put the attach first
    h.hops("guest>")
    again = attach(ssn, "x", FORBIDDEN)
    beside = attach(ssn, "y", "q2")
    h.guest.transport.pending()
    h.hops("guest>", "broker>", ">guest")
    h.pump()
    assert h.guest.transport.condition is None and h.broker.transport.condition is None
    assert _answers(received) == ["attach", "detach", "attach", "detach"]
    assert again.remote_condition.name == "amqp:unauthorized-access"
    assert not beside.state & Endpoint.REMOTE_ACTIVE
    assert ssn.remote_condition.name == "amqp:not-found"
    ssn.close()
    h.pump()
    _nothing_left(h)
    assert h.router.routes == {} and link_count(h.router.guest.connection) == 0


def test_links_on_a_session_over_the_channel_max_cross_its_refusal() -> None:
    """The broker allows one session; the guest begins a second one and, before reading
    our end of it, attaches an allowed link and a forbidden one there and detaches both.
    Nothing of it reaches the broker, the guest's connection and first session go on, and
    once the guest answers the end nothing is left of the refused session."""
    h = _refusing()
    h.broker.transport.channel_max = 0
    conn, snd, far = h.sender("s", "q", credit=1)
    extra = conn.session()
    extra.open()
    h.guest.transport.pending()
    h.hops("guest>")  # refused: our begin and end are on their way
    links = [attach(extra, "a", "q"), attach(extra, "b", FORBIDDEN)]
    h.guest.transport.pending()
    h.hops("guest>")
    for link in links:
        link.close()
    h.guest.transport.pending()
    h.hops("guest>", ">guest")
    h.pump()
    assert extra.remote_condition.name == "amqp:resource-limit-exceeded"
    extra.close()
    h.pump()
    assert h.guest.transport.condition is None and h.broker.transport.condition is None
    assert [ev.link.name for ev in h.broker.events if ev.type.name == "PN_LINK_REMOTE_OPEN"] == [
        "s"
    ]
    _nothing_left(h)
    assert link_count(h.router.guest.connection) == 1  # "s" alone
    send_message(snd, "m", "after")
    h.pump()
    assert len(receive_all(far)) == 1
