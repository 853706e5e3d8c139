"""Frames that cross in flight: what the guest sends meets what the broker sends.

The router stands between two peers that each act without waiting for the other, and it
answers some frames itself (a begin, a detach) before the far side has. So any frame of
one side can cross any frame of the other, and proton's engine has rules of its own about
what it forgets when, and in what order it writes (every attach of one output pass before
every detach). Each test here makes frames cross in the harness: a side's frames are
written (``transport.pending()``) before it reads what the other side sent meanwhile.
"""

from __future__ import annotations

import pytest
from proton import Condition, Endpoint, Event, Link

from connector.policy import Policy
from tests.support.attach_peer import echo_flow
from tests.support.routing import Harness, attach, link_count, receive_all, send_message

# Larger than proton's output buffer can grow to for the scripted broker (its max-frame-size):
# while it waits to be read, proton produces nothing more for the broker.
LARGE = 2_000_000


def _link_frames(lines: list[str], name: str) -> list[str]:
    """The attaches of link ``name`` and every detach among frames a side received, by kind."""
    kinds = []
    for line in lines:
        if f'<- @attach(18) [name="{name}"' in line:
            kinds.append("attach")
        elif "<- @detach" in line:
            kinds.append("detach")
    return kinds


@pytest.mark.parametrize("how", ["in-one-write", "behind-a-large-message"])
def test_a_link_detached_and_attached_again_reaches_the_broker_in_that_order(how: str) -> None:
    """A guest detaches a link and attaches it again under the same name (JMS does so with
    a durable subscription). Proton's engine writes the attaches of one output pass before
    its detaches, so when both fall in one pass, because they came in one read or because
    the upstream was held up by a large message (proton produces nothing while its output
    is full), the broker got the second attach while the first link was still attached:
    a proton broker fails the whole connection ("link name already attached"), and Artemis
    never answers the attach. The second attach goes up once the broker has answered the
    detach."""
    h = Harness()
    h.answering(lambda ev: ev.link.close(), "PN_LINK_REMOTE_CLOSE")
    _, big, _ = h.sender("big", "q", credit=1)
    ssn = big.session
    first = attach(ssn, "sub", "topic", sending=False)
    h.pump()
    received = h.broker.trace()
    if how == "in-one-write":
        first.close()
        h.guest.transport.pending()  # the guest writes its detach, then its attach
    else:
        send_message(big, "big", "x" * LARGE)
        first.close()
        while h.guest.transport.pending() > 0:  # the broker reads none of it yet
            h.hops("guest>")
        h.hops(">guest")  # the detach is answered at once, as the guest waits for
        assert first.state & Endpoint.REMOTE_CLOSED
    again = attach(ssn, "sub", "topic", sending=False)
    h.pump(rounds=200)
    assert h.broker.transport.condition is None
    assert _link_frames(received, "sub") == ["detach", "attach"]
    assert again.state & Endpoint.REMOTE_ACTIVE


@pytest.mark.parametrize("gives_up", [False, True], ids=["waits", "gives-up"])
def test_a_link_attached_again_waits_for_the_brokers_answer_to_its_detach(
    gives_up: bool,
) -> None:
    """The guest's detach is answered at once, so the guest may attach the link again while
    the broker's answer to the detach is still on its way: until it comes, the broker's
    link of that name is attached, so the new attach waits for it. A guest that gives up
    on the new link meanwhile is answered at once, and the broker never hears of it."""
    h = Harness()
    detached = []
    h.answering(lambda ev: detached.append(ev.link), "PN_LINK_REMOTE_CLOSE")
    _, ssn = h.guest_session()
    first = attach(ssn, "sub", "q")
    h.pump()
    received = h.broker.trace()
    first.close()
    h.pump()
    again = attach(ssn, "sub", "q")
    h.pump()
    if gives_up:
        again.close()
        h.pump()
        assert again.state & Endpoint.REMOTE_CLOSED
    assert _link_frames(received, "sub") == ["detach"]
    detached[0].close()  # the broker answers the first detach at last
    h.pump()
    assert h.broker.transport.condition is None
    if gives_up:
        assert _link_frames(received, "sub") == ["detach"]
        assert h.router.routes == {}
        assert link_count(h.router.upstream.connection) == 0
    else:
        assert _link_frames(received, "sub") == ["detach", "attach"]
        assert again.state & Endpoint.REMOTE_ACTIVE


def test_a_session_ended_and_begun_again_while_the_brokers_end_is_on_its_way() -> None:
    """The guest ends a session and begins another, which takes the same channel, before
    the broker has answered the end upstream; a link it attaches there under the name of
    one the end took waits for that answer (``_namesake_attached``: the end answers the
    detach too). Then the broker ends the new session while the guest attaches on it."""
    h = Harness()
    ends = []
    h.answering(ends.append, "PN_SESSION_REMOTE_CLOSE")
    conn, ssn = h.guest_session()
    attach(ssn, "a", "q")
    h.pump()
    ssn.close()
    h.pump()
    again = attach(conn.session(), "a", "q")
    again.session.open()
    h.pump()
    assert again.session.state & Endpoint.REMOTE_ACTIVE
    assert not again.state & Endpoint.REMOTE_ACTIVE
    ends[0].session.close()  # the broker's answer to the first end, at last
    h.pump()
    assert again.state & Endpoint.REMOTE_ACTIVE
    h.broker_link("a").session.close()  # the broker ends the second session...
    h.broker.transport.pending()
    late = attach(again.session, "late", "q")  # ...as the guest attaches on it
    h.pump()
    assert again.session.state & Endpoint.REMOTE_CLOSED and not late.state & Endpoint.REMOTE_ACTIVE
    again.session.close()
    h.pump()
    assert h.broker.transport.condition is None and h.guest.transport.condition is None
    assert h.router.routes == {} and h.router.session_count() == 0


def _reattach_behind_a_large_message(h: Harness, again_from: str = "q2") -> Link:
    """The guest detaches its link ``sub`` (from ``q2``) and attaches it again at once (from
    ``again_from``), while a large message on its way to it fills our output to it (the guest
    reads none of it); the broker answers the detach, then the new attach. Returns the new
    link."""
    _, big, far = h.receiver("big", "q")
    big.flow(1)
    h.pump()
    first = attach(big.session, "sub", "q2", sending=False)
    h.pump()
    send_message(far, "big", "x" * LARGE)
    for _ in range(200):  # we take the large message; the guest reads none of it
        h.hops(">broker", "broker>")
    first.close()
    h.guest.transport.pending()
    again = attach(big.session, "sub", again_from, sending=False)
    h.hops("guest>")
    for _ in range(3):  # the broker answers the detach, then the new attach
        h.hops(">broker", "broker>")
    return again


def test_a_slow_guest_attaching_again_at_once_hears_the_detach_first() -> None:
    """The guest side of the same proton rule: a guest that reads slowly (a
    large message on its way to it fills our output to it) detaches a link and attaches it
    again without waiting for our answer. Our answer to the detach cannot be produced until
    the guest reads; the broker answers the new attach meanwhile, and proton then writes our
    answers to both in one pass, the attach first: the guest's proton takes it for a second
    link of that name ("link name already attached") and fails the connection. Artemis,
    reached directly, answers the two in order."""
    h = Harness()
    h.answering(lambda ev: ev.link.close(), "PN_LINK_REMOTE_CLOSE")
    again = _reattach_behind_a_large_message(h)
    h.pump(rounds=2000)
    assert h.guest.transport.condition is None
    assert again.state & Endpoint.REMOTE_ACTIVE


@pytest.mark.parametrize("guest_gives_up", [False, True], ids=["answered", "guest-gives-up"])
def test_a_refused_reattach_waits_for_the_namesakes_detach(guest_gives_up: bool) -> None:
    """The same crossing, but the guest attaches the name again to an address its policy
    forbids: the refusal (an attach and a detach of ours) waits like the broker's answer
    would, since proton would write its attach before our answer to the namesake's detach
    and the guest's proton would fail the connection ("link name already attached"). A
    guest that detaches the link meanwhile is owed the attach and the detach once, not a
    refusal on top."""
    h = Harness()
    h.router._policy = Policy.from_table({"default": {"addresses": ["q", "q2"]}}).for_guest("vm1")
    h.answering(lambda ev: ev.link.close(), "PN_LINK_REMOTE_CLOSE")
    again = _reattach_behind_a_large_message(h, again_from="forbidden")
    received = h.guest.trace()
    if guest_gives_up:
        again.close()
        h.guest.transport.pending()
        h.hops("guest>")
    h.pump(rounds=2000)
    assert h.guest.transport.condition is None
    assert again.state & Endpoint.REMOTE_CLOSED
    if not guest_gives_up:
        assert again.remote_condition.name == "amqp:unauthorized-access"
        again.close()
        h.pump()
    answers = [line for line in received if "<- @attach" in line or "<- @detach" in line]
    assert len(answers) == 3, answers  # the namesake's detach; the new link's attach, detach
    assert not h.router._deferred_refusals and not h.router._ended_unbegun
    assert link_count(h.router.guest.connection) == 1  # "big" alone


@pytest.mark.parametrize("ender", ["broker-refuses", "guest-gives-up"])
def test_a_held_answer_stays_held_when_its_link_ends_meanwhile(ender: str) -> None:
    """As above, the answer to the guest's new attach waits for our answer to its detach
    of the namesake; but the new link ends while it waits: the broker refuses it (attach
    and detach), or the guest detaches it again. Either way the guest is owed an attach
    and a detach, and that attach, written with the namesake's detach, failed the guest's
    connection ("link name already attached") just as the held answer would have."""
    h = Harness()
    attaches = []

    def broker(ev: Event) -> None:
        link = ev.link
        if ev.type.name == "PN_LINK_REMOTE_CLOSE":
            link.close()
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.open()
        attaches.append(link.name)
        if ender == "broker-refuses" and attaches.count("sub") == 2:
            link.condition = Condition("amqp:resource-locked", "still in use")
            link.close()

    h.answering(broker, "PN_LINK_REMOTE_OPEN", "PN_LINK_REMOTE_CLOSE")
    again = _reattach_behind_a_large_message(h)
    if ender == "guest-gives-up":
        again.close()
        h.guest.transport.pending()
        h.hops("guest>", ">broker", "broker>")
    h.pump(rounds=2000)
    assert h.guest.transport.condition is None
    assert again.state & Endpoint.REMOTE_CLOSED
    if ender == "broker-refuses":
        assert again.remote_condition.name == "amqp:resource-locked"
        again.close()
        h.pump()
    assert not h.router._answers_held and not h.router._ended_unbegun
    assert link_count(h.router.guest.connection) == 1  # "big" alone


@pytest.mark.parametrize("receiving", [True, False], ids=["guest-receives", "guest-sends"])
def test_an_echo_crossing_the_brokers_detach_is_not_answered(receiving: bool) -> None:
    """The broker detaches a link without closing it; the guest, not having read the
    detach we passed on, asks for an echo on it. A link detached is owed no answer: the
    connector kept re-marking the session to have proton write one, and proton wrote a
    session flow on every output, for as long as the guest did not answer the detach."""
    h = Harness()
    if receiving:
        _, link, far = h.receiver("l", "q")
        link.flow(3)
        h.pump()
    else:
        _, link, far = h.sender("l", "q", credit=3)
    received = h.guest.trace()
    far.detach()
    h.broker.transport.pending()
    h.hops("broker>")  # the router detaches the guest's link
    h.router.guest.push(echo_flow(0, 0, 0, 3 if receiving else 0))  # sent before it read that
    h.pump()
    assert [line for line in received if "<- @" in line] == ["FRAME: 0 <- @detach(22) [handle=0x0]"]


@pytest.mark.parametrize("detaching", ["guest", "broker"])
def test_a_detach_settles_nothing_on_the_far_sides_behalf(detaching: str) -> None:
    """A peer detaches its sending link while a delivery on it waits for an outcome from
    the far side (the broker's for the guest's message, the guest's for the broker's).
    Nothing may be settled towards that peer for the far side: the connector freed its end
    of the link before writing its detach, and proton settled every unsettled delivery of a
    freed link on the wire: a disposition settled without an outcome. To the guest, its
    message looked done though the broker had said nothing (proton's BlockingSender takes
    it for sent); RabbitMQ 4's AMQP 1.0 code ends the session on one ("Unrecognised
    state")."""
    h = Harness()
    if detaching == "guest":
        _, snd, _ = h.sender("s", "q", credit=1)
        dlv = send_message(snd, "m", "waits for the broker")
        h.pump()
        received = h.guest.trace()
    else:
        _, rcv, snd = h.receiver("r", "q")
        rcv.flow(1)
        h.pump()
        dlv = send_message(snd, "m", "the guest holds it")
        h.pump()
        assert rcv.current is not None and not rcv.current.settled
        received = h.broker.trace()
    snd.close()
    h.pump()
    assert not [line for line in received if "<- @disposition" in line]
    assert not dlv.settled


# ---- crossings that already worked, kept working ------------------------------------------


def _answering_in_kind(h: Harness) -> None:
    """The broker answers a detach or an end by closing its own end, as brokers do."""

    def close(ev: Event) -> None:
        endpoint = ev.link if ev.type.name == "PN_LINK_REMOTE_CLOSE" else ev.session
        if not endpoint.state & Endpoint.LOCAL_CLOSED:
            endpoint.close()

    h.answering(close, "PN_LINK_REMOTE_CLOSE", "PN_SESSION_REMOTE_CLOSE")


def _end(link: Link, what: str) -> None:
    """End ``link`` (close it) or its whole session."""
    (link if what == "link" else link.session).close()


@pytest.mark.parametrize("first", ["guests", "brokers"])
@pytest.mark.parametrize("broker_ends", ["link", "session"])
@pytest.mark.parametrize("guest_ends", ["link", "session"])
def test_ends_that_cross_leave_the_connection_up_and_nothing_behind(
    guest_ends: str, broker_ends: str, first: str
) -> None:
    """The guest and the broker end one link, or its session, at the same time, and the
    router gets ``first``'s frames first: each side's end crosses the router's answer to
    the other's. Nothing fails, each side hears its end answered, no link is left on
    either side, and the guest's other session still carries a message."""
    h = Harness()
    _answering_in_kind(h)
    conn, link, far = h.sender("s", "q", credit=1)
    other = attach(conn.session(), "other", "q2")
    other.session.open()
    h.pump()
    send_message(link, "m", "unsettled when the ends cross")
    h.pump()
    _end(far, broker_ends)
    h.broker.transport.pending()
    _end(link, guest_ends)
    h.guest.transport.pending()
    if first == "guests":
        h.hops("guest>", ">broker", "broker>", ">guest")
    else:
        h.hops("broker>", ">guest", "guest>", ">broker")
    h.pump()
    # An end answers a detach too: it ends every link of the session.
    answered = link.session if guest_ends == "session" or broker_ends == "session" else link
    assert answered.state & Endpoint.REMOTE_CLOSED
    if link.session.state & Endpoint.LOCAL_ACTIVE and answered is link.session:
        link.session.close()  # the guest answers the end we passed on
        h.pump()
    assert h.broker.transport.condition is None and h.guest.transport.condition is None
    assert {r.name for r in h.router.routes.values()} == {"other"}
    assert not h.router._awaiting_detach
    assert link_count(h.router.guest.connection) == link_count(h.router.upstream.connection) == 1
    h.broker_link("other").flow(1)
    h.pump()
    send_message(other, "o", "after")
    h.pump()
    assert len(receive_all(h.broker_link("other"))) == 1


@pytest.mark.parametrize("peer", ["guest", "broker"])
def test_a_detach_and_an_end_in_one_read_free_each_link_once(peer: str) -> None:
    """A peer detaches a link and ends its session in one write: the link, to be freed once
    our detach is out, goes with the session instead (freed again after that, it would
    crash the process)."""
    h = Harness()
    _answering_in_kind(h)
    _, link, far = h.receiver("r", "q")
    link.flow(1)
    h.pump()
    send_message(far, "m", "unsettled")
    h.pump()
    ending = link if peer == "guest" else far
    ending.close()
    ending.session.close()
    h.pump()
    if peer == "broker":
        link.session.close()
        h.pump()
    assert h.router.routes == {}
    assert link_count(h.router.guest.connection) == link_count(h.router.upstream.connection) == 0


def test_a_drain_crossing_the_brokers_transfers_ends_with_them() -> None:
    """The guest drains while the broker's transfers are on their way to it: the guest gets
    them, then hears it has drained, and later credit flows again."""
    h = Harness()
    _, rcv, snd = h.receiver("r", "q")
    rcv.flow(5)
    h.pump()
    for i in range(2):
        send_message(snd, f"m{i}", i)
    h.broker.transport.pending()
    rcv.drain(0)
    h.hops("guest>", ">broker", "broker>", ">guest")
    assert len(receive_all(rcv)) == 2 and rcv.draining()
    assert snd.drained() == 3
    h.pump()
    assert not rcv.draining() and rcv.credit == 0 and snd.credit == 0
    rcv.flow(1)
    h.pump()
    assert snd.credit == 1
