"""Transactions and settlement when frames cross, through the real daemon to real brokers.

``tests/unit/test_router_transactions.py`` makes transactional deliveries meet a session's
end or a coordinator's detach in exact orders in the harness. Here the same crossings go
through the daemon (under the use-after-free watch) to Artemis 2.40, which runs
transactions, and to RabbitMQ 3.10, which refuses a coordinator by ending its session,
with the guest's own proton client, to show what a guest really meets and that nothing
it was told accepted is lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from proton import Delivery, Described, Endpoint, Message, Terminus, symbol

from tests.reliability.test_hostile_routing import (
    DISCHARGE,
    TIMEOUT,
    _coordinator,
    _declare,
    _every,
    _link,
    _rabbit_depth,
    _send,
    _session,
    _settle,
    _take,
    _txn_send,
    _until,
)
from tests.support.connector import Routed, routed, wait_for

pytestmark = pytest.mark.broker


def _name(stem: str) -> str:
    return f"htx-{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def art(artemis: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    """One daemon on Artemis with a unix channel (guest htx-unix)."""
    with routed(artemis, tmp_path_factory.mktemp("htx"), ("unix",), "htx") as running:
        yield running


@pytest.fixture(scope="module")
def rabbit(rabbitmq: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    """One daemon on RabbitMQ with a unix channel (guest htxr-unix)."""
    with routed(rabbitmq, tmp_path_factory.mktemp("htxr"), ("unix",), "htxr") as running:
        yield running


# ---- bugs ---------------------------------------------------------------------------------


def test_a_guest_ending_its_session_is_not_told_artemis_settled_what_it_held(
    art: Routed,
) -> None:
    """A guest holds a message from Artemis unsettled and ends the session it came on (a
    JMS consumer's session closed before its acknowledgement, or a transacted session
    whose transaction was never discharged). Artemis settled nothing: it gives the message
    to the next receiver. But the guest's delivery read as settled by the broker once the
    end was answered: the connector wrote a disposition ``settled=true``, with no outcome,
    before its end (``Router._on_session_remote_close`` freed the session before the end
    was written, and proton settles a freed link's deliveries on the wire). A client that
    takes the sender's settlement for the broker being done with the message was misled.
    The session is now freed once its end is written."""
    queue = _name("held")
    with art.client("unix", _name("end")) as guest:
        guest.send(queue, ["a"])
        rcv = _link(guest, queue, "held-r", sending=False)
        ((body, dlv),) = _take(guest, rcv, 1)
        assert body == "a" and not dlv.settled
        rcv.session.close()
        _until(guest, lambda: rcv.session.state & Endpoint.REMOTE_CLOSED, "the end's answer")
        # At-least-once holds: Artemis kept the message.
        assert [m.body for m in guest.receive(queue, 1)] == ["a"]
        assert not dlv.settled


# ---- what already holds --------------------------------------------------------------------


def test_a_discharge_and_the_coordinators_detach_in_one_write_commit(art: Routed) -> None:
    """A guest discharges (commit) and closes its coordinator in one write, without waiting
    for the outcome (an agent shutting down). The discharge reaches Artemis before the
    detach, so the transaction commits: the message sent in it is stored, once. The guest
    hears no outcome for the discharge (the detach answered it first), its connection goes
    on, and the status counts the coordinator gone."""
    queue = _name("commit")
    with art.client("unix", _name("commit")) as guest:
        coord = _coordinator(guest)
        snd = _link(guest, queue, "commit-s", sending=True)
        txn = _declare(guest, coord)
        for dlv in _txn_send(guest, snd, txn, ["t"]):
            dlv.settle()
        _until(guest, lambda: coord.credit > 0, "coordinator credit", coord)
        discharge = Message(body=Described(DISCHARGE, [txn, False])).send(coord)
        coord.close()
        _until(guest, lambda: coord.state & Endpoint.REMOTE_CLOSED, "the coordinator's detach")
        assert not discharge.settled
        wait_for(
            lambda: art.daemon.channel("htx-unix")["links"] == 1,
            TIMEOUT,
            "the status to count the working link alone",
        )
        assert [m.body for m in guest.receive(queue, 2, drain=True)] == ["t"]


def test_rabbit_refusing_a_coordinator_by_ending_its_session_settles_nothing_for_it(
    rabbit: Routed,
) -> None:
    """RabbitMQ 3.10 has no transactions and refuses a coordinator by ending its session
    (``amqp:not-implemented``). Here that end crosses 50 messages the guest sent on the
    same session, none of them answered yet. The guest must hear no settlement RabbitMQ
    did not give: each of its messages either has RabbitMQ's outcome or none and stays
    unsettled; what was accepted is on the queue; and its other session goes on."""
    queue = f"/queue/{_name('coord')}"
    with rabbit.client("unix", _name("coord")) as guest:
        other = _link(guest, queue, "other-s", sending=True)
        ssn = _session(guest)
        snd = _link(guest, queue, "work-s", sending=True, ssn=ssn)
        _until(guest, lambda: snd.credit >= 50, "credit", snd)
        sent = [Message(body=f"m{i}").send(snd) for i in range(50)]
        coord = ssn.sender("coordinator")
        coord.target.type = Terminus.COORDINATOR
        coord.target.capabilities.put_object(symbol("amqp:local-transactions"))
        coord.open()
        _until(guest, lambda: ssn.state & Endpoint.REMOTE_CLOSED, "RabbitMQ's end")
        assert ssn.remote_condition.name == "amqp:not-implemented"
        assert not [d for d in sent if d.settled and not d.remote_state]
        accepted = sum(1 for d in sent if d.remote_state == Delivery.ACCEPTED)
        ssn.close()
        after = _send(guest, other, ["after"])
        assert [d.remote_state for d in after] == [Delivery.ACCEPTED]
        _settle(after)
        _until(
            guest,
            _every(lambda: _rabbit_depth(rabbit.broker, queue) >= accepted + 1),
            "what RabbitMQ accepted to be on its queue",
        )
        assert guest.connection.state & Endpoint.REMOTE_ACTIVE
