"""Transactions and the anonymous relay when the connection fails, through the daemon to Artemis.

``tests/unit/test_router_failures.py`` has a guest's connection end (a violation, the
guest's close, the broker's close or redirect) meet transactional and relayed frames in
exact orders in the harness. Here the same ends go through the real daemon (under the
use-after-free watch) to Artemis 2.40, which runs transactions and the anonymous relay, to
show what a guest meets and what Artemis keeps: a transaction committed or not, messages
stored or not, and nothing that a guest was told accepted lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from proton import Delivery, Described, Link, Message

from connector.guest.client import AmqpError, GuestClient
from tests.brokers import Artemis
from tests.reliability.test_hostile_guests import _own_daemon
from tests.reliability.test_hostile_routing import (
    DECLARE,
    DECLARED,
    DISCHARGE,
    TRANSACTIONAL_STATE,
    _coordinator,
    _declare,
    _discharge,
    _link,
    _txn_send,
    _until,
)
from tests.support.connector import Connector, Qemu

pytestmark = pytest.mark.broker

# A guest that may send to htf.* only, each address under its own prefix at the broker: its
# anonymous-relay messages are read and checked one by one (deliveries._forward_relayed).
PREFIXED = "[policy.default]\naddresses = ['htf.#']\nprefix = 'vm.{guest}.'\n"


def _name(stem: str) -> str:
    return f"htf.{stem}-{uuid.uuid4().hex[:8]}"


def _txn_message(link: Link, txn: bytes, body: str, to: str | None = None) -> Delivery:
    """Send ``body`` (to ``to``, for the relay) in transaction ``txn`` without waiting."""
    dlv = Message(address=to, body=body).send(link)
    dlv.local.data = [txn]
    dlv.update(TRANSACTIONAL_STATE)
    return dlv


def _next_guest(channel: Qemu, container: str) -> GuestClient:
    """A new guest client on ``channel``, after the last one's connection was ended."""
    return GuestClient(channel.fd(), container_id=container, timeout=30.0)


@pytest.fixture
def cut(artemis: Artemis, tmp_path: Path) -> Iterator[tuple[Connector, Qemu]]:
    """A daemon whose guests may hold one unsettled delivery per link (guest htf-cut)."""
    with _own_daemon(artemis, tmp_path, "[limits]\nmax_unsettled_per_link = 1\n", "htf-cut") as d:
        yield d


@pytest.fixture
def prefixed(artemis: Artemis, tmp_path: Path) -> Iterator[tuple[Connector, Qemu]]:
    """A daemon whose guest htf-relay has the ``PREFIXED`` policy."""
    with _own_daemon(artemis, tmp_path, PREFIXED, "htf-relay") as d:
        yield d


# ---- bugs ---------------------------------------------------------------------------------


def test_a_guest_cut_for_a_violation_does_not_commit_what_it_wrote_after(
    cut: tuple[Connector, Qemu],
) -> None:
    """A guest allowed one unsettled delivery per link sends two messages in a transaction
    and its commit in one write. The second message breaks the limit: the daemon ends the
    guest's connection with ``amqp:resource-limit-exceeded`` and closes its upstream. The
    guest is never told whether its transaction committed, and the daemon cut it before its
    commit; Artemis should not commit. It does: the commit was copied upstream ahead of our
    close (``Router._drain`` forwards the guest's deliveries after ``violation``), so the
    first message is stored, for a guest that was told only that it broke a limit
    (``test_a_discharge_written_after_the_frame_a_guest_is_cut_for_does_not_commit`` in
    the harness shows the frames)."""
    daemon, channel = cut
    queue = _name("cut")
    guest = _next_guest(channel, "htf-cut")
    try:
        coord = _coordinator(guest)
        snd = _link(guest, queue, "cut-s", sending=True)
        txn = _declare(guest, coord)
        _until(guest, lambda: snd.credit >= 2 and coord.credit > 0, "credit", snd)
        _txn_message(snd, txn, "one")
        _txn_message(snd, txn, "two: one unsettled too many")
        Message(body=Described(DISCHARGE, [txn, False])).send(coord)  # all in one write
        with pytest.raises(AmqpError) as ended:
            _until(guest, lambda: False, "the connection's end", snd)
        assert (ended.value.where, ended.value.name) == (
            "connection",
            "amqp:resource-limit-exceeded",
        )
    finally:
        guest.driver.close_fd()
        channel.detach_fd()
    daemon.wait_state("htf-cut", "waiting")
    with _next_guest(channel, "htf-cut-after") as after:
        assert [m.body for m in after.receive(queue, 2, drain=True)] == []


# ---- what already holds --------------------------------------------------------------------


def test_a_broker_killed_under_an_open_transaction_keeps_none_of_it(
    artemis: Artemis, tmp_path: Path
) -> None:
    """Artemis is SIGKILLed while a guest holds a declared transaction with two messages
    sent in it (each answered with transactional-state) and a second coordinator's declare
    in flight. The guest is told ``amqp:connection:forced`` naming the broker, not
    ``transaction-rollback`` (the connector cannot know the transaction's fate); the declare
    is not settled without the broker's outcome; and after the restart Artemis holds
    nothing of the transaction, while a transaction on the next connection commits."""
    queue = _name("killed")
    with _own_daemon(artemis, tmp_path, "", "htf-kill") as (_, channel):
        guest = _next_guest(channel, "htf-kill")
        try:
            coord, other = _coordinator(guest), _coordinator(guest)
            snd = _link(guest, queue, "kill-s", sending=True)
            txn = _declare(guest, coord)
            sent = _txn_send(guest, snd, txn, ["k1", "k2"])
            assert [d.remote_state for d in sent] == [TRANSACTIONAL_STATE] * 2
            _until(guest, lambda: other.credit > 0, "credit", other)
            declare = Message(body=Described(DECLARE, [None])).send(other)
            guest.driver.process(0)  # written: in flight, or answered, as Artemis dies
            try:
                artemis.kill()
                with pytest.raises(AmqpError) as ended:
                    _until(guest, lambda: False, "the connection's end", snd)
            finally:
                artemis.start()
            assert (ended.value.where, ended.value.name) == ("connection", "amqp:connection:forced")
            assert artemis.url in (ended.value.description or ""), ended.value.description
            # Artemis settles a transactional transfer as it answers it; the declare has its
            # answer, settled, or none and stays unsettled.
            assert declare.remote_state in (0, DECLARED)
            assert declare.settled == (declare.remote_state == DECLARED)
        finally:
            guest.driver.close_fd()
            channel.detach_fd()
        with _next_guest(channel, "htf-kill-after") as after:
            assert [m.body for m in after.receive(queue, 3, drain=True)] == []
            coord = _coordinator(after)
            snd = _link(after, queue, "kill-s2", sending=True)
            txn = _declare(after, coord)
            for dlv in _txn_send(after, snd, txn, ["k3"]):
                dlv.settle()
            assert _discharge(after, coord, txn, fail=False) == Delivery.ACCEPTED
            assert [m.body for m in after.receive(queue, 2, drain=True)] == ["k3"]


def test_the_checked_relay_inside_a_transaction_maps_refuses_and_rolls_back(
    prefixed: tuple[Connector, Qemu], artemis: Artemis
) -> None:
    """A guest whose relayed messages the policy checks and maps (``PREFIXED``) sends
    through the anonymous relay inside transactions. An allowed message goes to the broker
    under the guest's prefix, carrying its transactional-state (answered in kind); one to a
    forbidden address is refused by the connector, plainly ``rejected`` and settled, since
    the broker never saw it, which ends no transaction (proton's ``Transaction`` takes such
    an outcome like any other); the first transaction rolled back stores nothing, the
    second, committed, stores its message once, under the prefix, and the forbidden
    address never reaches Artemis."""
    _, channel = prefixed
    queue, forbidden = _name("relay"), f"htf-forbidden-{uuid.uuid4().hex[:8]}"
    with _next_guest(channel, "htf-relay") as guest:
        coord = _coordinator(guest)
        relay = _link(guest, None, "relay-s", sending=True)
        txn = _declare(guest, coord)
        _until(guest, lambda: relay.credit >= 2, "credit", relay)
        allowed = _txn_message(relay, txn, "rolled back", to=queue)
        refused = _txn_message(relay, txn, "never sent", to=forbidden)
        _until(guest, lambda: allowed.remote_state and refused.settled, "outcomes", relay)
        assert allowed.remote_state == TRANSACTIONAL_STATE
        assert refused.remote_state == Delivery.REJECTED
        assert refused.remote.condition.name == "amqp:unauthorized-access"
        allowed.settle()
        assert _discharge(guest, coord, txn, fail=True) == Delivery.ACCEPTED
        assert guest.receive(queue, 1, drain=True) == []

        txn = _declare(guest, coord)
        _until(guest, lambda: relay.credit >= 1, "credit", relay)
        kept = _txn_message(relay, txn, "committed", to=queue)
        _until(guest, lambda: kept.remote_state, "the outcome", relay)
        kept.settle()
        assert _discharge(guest, coord, txn, fail=False) == Delivery.ACCEPTED
        assert [m.body for m in guest.receive(queue, 2, drain=True)] == ["committed"]
    names = set(artemis.management("getAddressNames"))
    assert f"vm.htf-relay.{queue}" in names and queue not in names
    assert not [n for n in names if forbidden in n]
