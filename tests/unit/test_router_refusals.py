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
from proton import Delivery, Endpoint, Message, uint

from connector.limits import GuestLimits
from connector.policy import Policy
from tests.reliability.amqp import TRANSFER, attach_frame, frame, handshake, performative
from tests.support.routing import Harness, attach, link_count, receive_all

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


@pytest.mark.xfail(
    strict=True,
    reason="_begin answers every link ended before the broker's open in one output pass: "
    "attach, attach, detach, detach; the guest fails 'link name already attached'",
)
@pytest.mark.parametrize("address", [FORBIDDEN, "q"], ids=["refused", "routed"])
def test_namesakes_ended_before_the_brokers_open_are_answered_one_after_the_other(
    address: str,
) -> None:
    """Before the broker's open a guest attaches a link, detaches it, and attaches and
    detaches it again under the same name (a client retrying, say after a refusal it has
    not heard yet: none can come before our open). Nothing can be answered until the
    broker's open, so both links wait, and then both are answered at once. Proton writes
    every attach of an output pass before every detach, so the guest read two attaches of
    one name, its proton failed the connection ("link name already attached"), and every
    other link of the guest went with it. The second answer must wait for the first
    link's detach to be written, as it does once the session is begun
    (``_free_written_links``)."""
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


@pytest.mark.xfail(
    strict=True,
    reason="_drain ignores deliveries on a link that has no route (refused, or detached "
    "for a limit): proton keeps every byte the guest sends on it, without credit or bound",
)
@pytest.mark.parametrize("link", ["refused", "over-the-size-limit"])
def test_a_link_refused_or_cut_does_not_buffer_what_the_guest_sends_on_it(link: str) -> None:
    """A guest sends on a link that the connector refused (its policy forbids the address)
    or detached for a message over ``max_message_size``, before it has read that detach,
    or never reading it. The link has no route any more, so the router ignores its
    deliveries, and proton keeps each transfer's bytes in the delivery for as long as the
    link lives: with no credit given on the refused link and the size limit passed on the
    other, the guest grew the connector's memory as far as it liked (3 MB here, 30 times
    the size limit) while its connection stayed up. Its bytes must be dropped as they come,
    or the guest cut off (a transfer without credit ends a routed link's connection)."""
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
    assert h.router.error is not None or _buffered(h) <= 2 * MAX_MESSAGE, _buffered(h)


@pytest.mark.xfail(
    strict=True,
    reason="the relay check decodes the message with proton, whose last properties section "
    "wins; the raw bytes go on unchanged, and Artemis routes by the first",
)
def test_a_relayed_message_with_two_properties_sections_is_refused() -> None:
    """A guest whose policy restricts addresses sends on the anonymous relay one message
    made of two: properties naming a forbidden address and a body, then properties naming
    an allowed one and another body. The relay check reads the message with proton, which
    keeps the last properties section it meets (``to`` the allowed address), and passes the
    bytes on unchanged; Artemis reads the first (``tests/reliability/
    test_hostile_refusals.py``), so the message reaches the forbidden address. A message
    that is not one well-formed message cannot be checked, and must be rejected."""
    h = _refusing()
    _, snd, brcv = h.sender("relay", None, credit=1)
    two = Message(address=FORBIDDEN, body="in").encode() + Message(address="q", body="x").encode()
    dlv = snd.delivery("two")
    snd.send(two)
    snd.advance()
    h.pump()
    assert receive_all(brcv) == []
    assert dlv.remote_state == Delivery.REJECTED
