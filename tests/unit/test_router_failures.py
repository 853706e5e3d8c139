"""Transactions and the anonymous relay when the connection fails under them, in the harness.

A guest's connection can end three ways while its transaction or its relayed messages are
in flight: the connector cuts it for breaking a rule, the guest closes it, or the broker
closes or redirects it. Each end is a decision taken at one frame, and what the guest had
written after that frame, or what the broker sends after its own close, must not act as if
the connection went on: a commit carried out for a guest already cut, a redirect that the
guest cannot follow passed to it on the way out. Here those ends meet the transactional
and relayed frames in exact orders (``tests/support/routing.py``), and each test checks
what each side is told.
"""

from __future__ import annotations

from typing import Any

from proton import Condition, Delivery, Link, Message, symbol

from connector.limits import GuestLimits
from connector.policy import Policy
from connector.redirect import REDIRECT
from connector.routing.engine import OUTPUT_FULL
from tests.support.routing import Harness, attach, receive_all, send_message
from tests.unit.test_router_delivery_crossings import TRANSACTIONAL_STATE
from tests.unit.test_router_transactions import (
    DISCHARGE,
    TXN,
    _control,
    _coordinator,
    _declared,
    _received,
)

# A message large enough that the router's output to a guest that reads nothing fills:
# proton then produces no frame for the guest until it reads (``engine.OUTPUT_FULL``).
LARGE = b"x" * 2_000_000


def _txn_send(link: Link, tag: str, body: Any) -> Delivery:
    """Send one message in transaction ``TXN`` on the guest's ``link``; not pumped."""
    dlv = link.delivery(tag)
    dlv.local.data = [TXN]
    dlv.update(TRANSACTIONAL_STATE)
    link.send(Message(body=body).encode())
    link.advance()
    return dlv


# ---- bugs ---------------------------------------------------------------------------------


def test_a_discharge_written_after_the_frame_a_guest_is_cut_for_does_not_commit() -> None:
    """A guest with ``max_unsettled_per_link = 1`` sends two messages in its transaction,
    then its commit, in one write (as a client that does not wait for outcomes does). The
    second message breaks the limit: the connector ends the guest's connection there, with
    ``amqp:resource-limit-exceeded``, and closes the upstream. What the guest wrote after
    that frame belongs to a connection the connector has ended: its endpoint frames already
    go unanswered (``Router._on_endpoint_event``). But its deliveries do not: the discharge
    is copied to the broker, ahead of our close (proton writes a pass's transfers before its
    close), and the broker commits the first message for a guest that was cut before its
    commit and never hears the outcome.

    Frames: guest -> transfer(m1, txn), transfer(m2, txn), transfer(discharge, fail=false);
    router -> guest close(resource-limit-exceeded); broker <- transfer(m1), transfer(the
    discharge), close. The broker should get nothing after m1 but the close.

    Cause: ``Router._drain`` forwards a guest's PN_DELIVERY while ``forward`` is true, and for
    the guest's own collector it always is (``forward = from_guest or ...``), also once
    ``violation`` has closed the guest's connection (``_violated``)."""
    h = Harness(limits=GuestLimits(max_unsettled_per_link=1))
    _, ssn = h.guest_session()
    coord, far = _coordinator(h, ssn)
    _declared(h, coord, far)
    work = attach(ssn, "work", "q")
    h.pump()
    h.broker_link("work").flow(2)
    h.pump()
    received = h.broker.trace()
    _txn_send(work, "m1", "one")
    _txn_send(work, "m2", "two: one unsettled too many")
    discharge = _control(coord, "commit", DISCHARGE, [TXN, False])
    h.pump()
    assert h.router.error == (
        "amqp:resource-limit-exceeded",
        "more than 1 unsettled deliveries on work",
    )
    assert h.guest.connection.remote_condition.name == "amqp:resource-limit-exceeded"
    assert not discharge.settled and not discharge.remote_state
    transfers = _received(received, "@transfer")
    assert [line for line in transfers if 'delivery-tag=b"commit"' in line] == [], transfers


def test_a_redirect_crossing_the_guests_close_is_not_passed_on() -> None:
    """A guest that reads nothing for the moment (a large message is on its way to it, so
    the router's output to it is full) closes its connection, and the broker, before it
    reads our close, closes with ``amqp:connection:redirect``. The guest cannot follow a
    redirect (its network has only its port), and the connector never passes one on
    (routing.md, Redirects). But the redirect, being a close that answers ours, is taken
    for the broker's answer and its condition copied onto the guest's connection; proton
    had not produced our answer to the guest's close yet (its output was full), so that
    answer carries the redirect, with the broker's ``network-host`` and ``port``.

    Frames: broker -> transfer(2 MB) (the guest's output fills); guest -> close; router ->
    broker close; broker -> close(amqp:connection:redirect, network-host, port); guest reads
    -> close(amqp:connection:redirect, info). It should get a close without the redirect
    (no condition, as for any close of its own that the broker answers). That the
    connection's recorded error is the redirect is right: every redirect is recorded.

    Cause: ``Router._on_connection_remote_close`` for the broker: when ``answered`` it skips
    the redirect branch and runs ``copy_condition`` onto the guest's connection, though we
    had closed it already; only a close proton has not yet produced is changed by that.

    The daemon does not meet this order today: while the guest's output is full it stops
    reading the broker (``Channel._apply_backpressure``), and by the time it reads again
    our close to the guest has been produced. The router, which is sans-IO, relies on that."""
    h = Harness()
    _, rcv, far = h.receiver("r", "q")
    rcv.flow(1)
    h.pump()
    got = h.guest.trace()
    send_message(far, "large", LARGE)
    for _ in range(50):  # the broker's frames into the router; the guest reads none
        h.hops(">broker", "broker>")
    assert h.router.guest.backlog() >= OUTPUT_FULL  # proton produces nothing more for now
    h.guest.connection.close()
    h.hops("guest>")
    broker = h.broker.connection
    info = {symbol("network-host"): "10.0.0.9", symbol("port"): 5673}
    broker.condition = Condition(REDIRECT, "elsewhere", info)
    broker.close()
    for _ in range(50):  # the rest of the message, then the redirect, into the router
        h.hops(">broker", "broker>")
    assert h.router.broker_closed() and h.router.guest.backlog() >= OUTPUT_FULL
    h.pump(rounds=500)
    (answer,) = _received(got, "@close")
    assert REDIRECT not in answer and "network-host" not in answer, answer


def test_a_checked_relay_without_an_unsettled_limit_carries_messages() -> None:
    """``max_unsettled_per_link = 0`` means no limit to the routing core: a guest's own link
    takes any number of unsettled messages (``deliveries._forward`` admits only when the
    limit is set), and credit to a receiving guest is not held back (``credit.sync_credit``).
    On an anonymous-relay link whose messages the policy checks (the guest's addresses are
    restricted, or mapped by a prefix) the same setting ends the guest's connection at its
    first message, "more than 0 unsettled deliveries on relay", and the message never
    reaches the broker.

    Frames: guest -> transfer(to=q) on the relay link; router -> guest
    close(amqp:resource-limit-exceeded). It should be: broker <- transfer(to=q).

    Cause: ``deliveries._forward_relayed`` calls ``_admit`` for each new message whatever
    ``route.max_unsettled`` is, and ``_admit`` takes 0 for a limit of none."""
    h = Harness(limits=GuestLimits(max_unsettled_per_link=0))
    h.router._policy = Policy.from_table({"default": {"addresses": ["q"]}}).for_guest("vm1")
    _, relay, far = h.sender("relay", None, credit=1)
    send_message(relay, "m", "relayed", to="q")
    h.pump()
    assert h.router.error is None, h.router.error
    ((_, body),) = receive_all(far)
    relayed = Message()
    relayed.decode(body)
    assert (relayed.address, relayed.body) == ("q", "relayed")
