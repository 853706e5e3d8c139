"""Limits, echo and credit crossing the guest's or the broker's other frames in flight.

The connector bounds what one guest may cost (``[limits]``: links, attach rate, unsettled
deliveries, message size) and answers some frames itself (a flow's echo, a refusal, a
detach), so each of those meets whatever else is in flight: a link whose detach the broker
has not answered, a refusal the guest has not answered, a guest that reads nothing, a
message still streaming. The harness (``tests/support/routing.py``) makes them meet in
exact orders; the same cases through the daemon are in
``tests/reliability/test_hostile_limits.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from cproton_ffi import lib
from proton import uint

from connector.limits import GuestLimits
from connector.policy import Policy
from connector.routing.frames import DISPOSITIONS_UNREAD
from connector.routing.router import AFTER_VIOLATION_INPUT
from tests.reliability.amqp import AMQP_HEADER, END, begin_frame, frame, open_frame, performative
from tests.support.attach_peer import echo_flow, link_flows
from tests.support.routing import Harness, attach, link_count, receive_all, session_count

MAX_LINKS = 2
MAX_SESSIONS = 2
# Attaches far beyond MAX_LINKS, each within it (the link is gone before the next comes).
CHURN = 8
# The guest may attach as fast as it likes here: what is counted is links, not their rate.
NO_RATE_LIMIT = {"attach_rate": 1e9, "attach_burst": 10**9}
# Credit the receiver grants before a message starts to stream.
CREDIT = 5
# The start of one message of 200 data bytes, 100 of them: the rest comes later.
HALF_A_MESSAGE = b"\x00Su\xb0" + (200).to_bytes(4, "big") + b"x" * 100


def _policed(**limits: Any) -> Harness:
    """A harness whose guest (vm1) may attach to "q" only, with these limits."""
    h = Harness(limits=GuestLimits(**limits))
    h.router._policy = Policy.from_table({"default": {"addresses": ["q"]}}).for_guest("vm1")
    return h


# ---- bugs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("receiver", ["guest", "broker"])
def test_an_echo_while_a_message_streams_counts_that_message(receiver: str) -> None:
    """The receiver of a message that is still streaming (its first frame has come, the
    rest has not) asks for an echo. AMQP counts a delivery when its first transfer is
    sent: the receiver's proton has delivery-count 1 and link-credit 4 by then. Our answer
    (``EchoAnswers._sender_flow``) takes its link-credit as ``pn_link_credit +
    pn_link_queued`` and its delivery-count as the receiver's limit less that; proton
    counts a delivery on our sender only once it is advanced (whole), so the answer says
    delivery-count 0, link-credit 5. The receiver's proton takes the count going back by
    one as 2^32 - 1 deliveries (serial arithmetic) and adds one credit it never issued:
    once the message is whole the two ends of the link disagree by one credit for the
    link's life (the guest believes it has issued 5, the broker holds 4; or the reverse)."""
    h = Harness()
    if receiver == "guest":
        _, far, near = h.receiver("r", "q")  # far: the guest's receiver; near: the broker's
        far.flow(CREDIT)
        h.pump()
        ask = h.router.guest
    else:
        _, near, far = h.sender("s", "q", credit=CREDIT)
        ask = h.router.upstream
    side = h.guest if receiver == "guest" else h.broker
    received = side.trace()
    near.delivery("streaming")
    near.send(HALF_A_MESSAGE)
    h.pump()
    assert far.current is not None and far.current.partial
    # What the receiver counts now: one delivery (next-incoming-id 1), credit 4.
    ask.push(echo_flow(incoming=1, outgoing=0, count=1, credit=CREDIT - 1))
    h.pump()
    (answer,) = link_flows([line for line in received if "<- @flow" in line])
    assert (answer["delivery-count"], answer["link-credit"]) == (1, CREDIT - 1), answer
    near.send(b"y" * 100)
    near.advance()
    h.pump()
    assert len(receive_all(far)) == 1
    assert far.credit == near.credit == CREDIT - 1


def test_links_awaiting_the_brokers_detach_count_against_max_links() -> None:
    """A guest attaches a link and detaches it, again and again under new names, each
    within ``max_links`` (2). Its detach is answered at once; the broker's link stays
    until the broker answers our detach, and this broker never does (a slow or wedged
    one). ``Router._attach_allowed`` counted only routed links, and a detached link is
    routed no more, so every new attach went up: the broker held 8 links of this guest,
    the connector 8 upstream links, and with the attach rate (50/s) the only bound, a
    guest churning links grew both without end. The guest did nothing wrong, so it is not
    cut for this either: its attach waits for a detach to be answered (``_may_attach``)."""
    h = Harness(limits=GuestLimits(max_links=MAX_LINKS, **NO_RATE_LIMIT))
    h.answering(lambda _ev: None, "PN_LINK_REMOTE_CLOSE")  # detaches are never answered
    _, ssn = h.guest_session()
    for i in range(CHURN):
        link = attach(ssn, f"churn-{i}", "q")
        h.pump()
        link.close()
        h.pump()
        assert link_count(h.router.upstream.connection) <= MAX_LINKS, f"after {i + 1} links"
    assert h.router.error is None


def test_sessions_awaiting_the_brokers_end_count_against_max_sessions() -> None:
    """The session analogue: a guest begins a session and ends it, again and again, each
    within ``max_sessions`` (2). Its end is answered at once and its channel is free for
    its next begin; our session upstream stays until the broker answers our end, which
    this broker never does. ``max_sessions`` is only the guest engine's channel-max, and
    ``_begin`` held sessions only to the broker's channel-max (65535 for Artemis), so
    every begin went up: the broker held 8 sessions of this guest. Begins have no rate
    limit either, so a guest could grow both sides as fast as it wrote. A begin past
    ``max_sessions`` upstream sessions now waits for the broker to answer an end, the
    guest neither refused nor cut."""
    h = Harness(limits=GuestLimits(max_sessions=MAX_SESSIONS))
    h.answering(lambda _ev: None, "PN_SESSION_REMOTE_CLOSE")  # ends are never answered
    conn = h.open_guest()
    for i in range(CHURN):
        ssn = conn.session()
        ssn.open()
        h.pump()
        ssn.close()
        h.pump()
        held = session_count(h.router.upstream.connection)
        assert held <= MAX_SESSIONS, f"after {i + 1} sessions"
    assert h.guest.transport.condition is None and h.router.error is None


def test_refused_links_the_guest_never_detaches_count_against_max_links() -> None:
    """A guest attaches to an address its policy forbids, again and again under new
    names, and never answers our detach of them. Each refused link stays a proton link
    in the connector until the guest answers (it is only freed then:
    ``_link_ended``), yet was counted nowhere: ``_attach_allowed`` counted routed links.
    So the attach rate was the only bound, and at the default 50/s a guest grew the
    connector by some 100 MB an hour (``test_hostile_limits.py`` measures it). Every link
    the guest makes us hold counts now."""
    h = _policed(max_links=MAX_LINKS, **NO_RATE_LIMIT)
    _, ssn = h.guest_session()
    for i in range(CHURN):
        attach(ssn, f"refused-{i}", "forbidden")
        h.pump()
    held = link_count(h.router.guest.connection)
    assert h.router.error is not None or held <= MAX_LINKS, f"{held} refused links held"


def test_a_guest_that_reads_nothing_cannot_pile_up_ended_links() -> None:
    """A guest reads nothing (its port is full) and attaches and detaches links under new
    names. Our answers cannot be written, so each ended link waits in
    ``_unwritten_links`` to be freed once its detach is out; none of them is a route, so
    ``max_links`` never counted them, and the guest made the connector hold as many links
    as it attached, without bound. Every link the guest makes us hold counts now."""
    h = Harness(limits=GuestLimits(max_links=MAX_LINKS, **NO_RATE_LIMIT))
    _, ssn = h.guest_session()
    for i in range(50 * CHURN):
        link = attach(ssn, f"unread-{i}", "q")
        h.guest.transport.pending()
        h.hops("guest>", ">broker", "broker>")  # never ">guest"
        link.close()
        h.guest.transport.pending()
        h.hops("guest>", ">broker", "broker>")
    held = link_count(h.router.guest.connection)
    assert h.router.error is not None or held <= MAX_LINKS, f"{held} ended links held"


def test_a_guest_cut_for_churning_sessions_unread_is_told_why_and_read_no_further() -> None:
    """A guest that reads nothing begins and ends sessions, one at a time. Each ended one
    waits for our end to be written, so past ``max_sessions`` of them proton had no channel
    left to answer a begin and failed the connection with a framing error that said
    nothing. The guest is cut first, with ``amqp:resource-limit-exceeded`` naming sessions;
    its sessions are not answered any more, and of what it writes after our close only
    ``AFTER_VIOLATION_INPUT`` reaches proton, which would make a session object of every
    begin for as long as the close was awaited."""
    h = Harness(guest=False, limits=GuestLimits(max_sessions=MAX_SESSIONS))
    h.router.guest.set_limits(max_frame=512, channel_max=MAX_SESSIONS - 1, idle_timeout_ms=0)
    h.router.guest.push(AMQP_HEADER + open_frame() + begin_frame())
    h.pump()  # open and begin answered; from here the guest reads nothing
    pair = begin_frame(1) + frame(performative(END), 1)
    for _ in range(20):
        assert h.router.feed_guest(pair * 1000)
        h.router.process()
    assert h.router.error is not None
    assert h.router.error[0] == "amqp:resource-limit-exceeded" and "sessions" in h.router.error[1]
    held = session_count(h.router.guest.connection)
    assert held < AFTER_VIOLATION_INPUT // len(pair) + 1000, held


def test_dispositions_naming_more_than_any_settling_needs_end_the_connection() -> None:
    """A guest holding deliveries writes, in one read, dispositions that each name every
    delivery-id and change nothing. Pushed, each would have proton post an event for every
    delivery held (a million for 1000 frames over 1000 deliveries: 170 MB and seconds of
    the shared loop). Past ``DISPOSITION_SPAN_PER_READ`` the read is not pushed and the
    guest is cut; one naming a few deliveries each goes through as before."""
    h = Harness(guest=False)
    h.router.guest.push(AMQP_HEADER + open_frame() + begin_frame())
    h.pump()
    whole_range = frame(performative(0x15, True, uint(0), uint(2**31 - 1)))
    assert h.router.feed_guest(frame(performative(0x15, True, uint(0), uint(9))) * 100)
    h.router.process()
    assert h.router.error is None
    assert h.router.feed_guest(whole_range * (DISPOSITIONS_UNREAD + 1))
    h.router.process()
    assert h.router.error is not None and "dispositions naming more" in h.router.error[1]
    assert not lib.pn_collector_peek(h.router.guest.collector)  # nothing was pushed
