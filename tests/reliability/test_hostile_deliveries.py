"""Deliveries in flight when frames cross, against the real daemon and a real Artemis.

tests/unit/test_router_delivery_crossings.py makes a drain or an early outcome meet a
message that is still streaming, in the harness. Here the same crossings go through the
daemon to Artemis with the guest's own proton client, to show what a guest really meets:
a JMS-style receive that drains while a large message is on its way.

The early outcome is not here: a guest that releases a 20 MB message half way makes
Artemis 2.40 itself fail (proton-j's ``SenderImpl.send`` throws in its large-message
writer) and detach the link with ``amqp:resource-deleted``, so the bytes the connector
would hold for the rest of it never come.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.reliability.test_hostile_guests import (
    HUGE,
    _accept_all,
    _drain_queue,
    _inbox,
    _link,
    _until,
)
from tests.support.connector import Routed, routed

pytestmark = pytest.mark.broker

# Bytes of a message the guest waits for before it acts: the message is then mid-stream.
FIRST = 100_000


def _queue(stem: str) -> str:
    return f"deliveries-{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def ctx(artemis: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    """One daemon on Artemis with a unix channel (guest hd-unix)."""
    with routed(artemis, tmp_path_factory.mktemp("hd"), ("unix",), "hd") as running:
        yield running


def _half_received(guest: Any, queue: str, name: str, credit: int) -> Any:
    """A receiver ``name`` on ``queue`` given ``credit``, once its first message has come
    ``FIRST`` bytes of the way; returns the receiver."""
    rcv = _link(guest, queue, name, sending=False)
    rcv.flow(credit)
    _until(guest, lambda: rcv.current is not None and rcv.current.pending > FIRST, "part", rcv)
    assert rcv.current.partial
    return rcv


def test_a_receive_draining_while_a_large_message_streams_gets_it_whole(ctx: Routed) -> None:
    """A guest grants one credit and drains while a 20 MB message is on its way (as a JMS
    ``receive(timeout)`` does when the timeout ends mid-message). The credit is the
    message's, so the drain should end with the message whole. The connector told the
    guest at once that it had drained (credit 0) while the message was half way; the rest
    then waited for the guest's next credit and cost it one (the harness test,
    ``test_a_drain_asked_while_a_message_streams_to_the_guest_ends_after_it``, shows
    each step)."""
    queue = _queue("drain")
    body = b"\x5a" * HUGE
    with ctx.client("unix", "drain-sender") as sender:
        assert {o.state for o in sender.send(queue, [body, "next"])} == {"accepted"}
    with ctx.client("unix", "drain-receiver") as guest:
        rcv = _half_received(guest, queue, "drain-r", 1)
        rcv.drain(0)
        # The guest's own proton counts the partial message against its credit, so it stops
        # "draining" at once either way: what tells is whether the message comes whole.
        _until(guest, lambda: len(_inbox(guest, rcv)) == 1, "the whole message", rcv)
        assert _accept_all(guest, rcv) == [body]
        rcv.flow(1)
        _until(guest, lambda: len(_inbox(guest, rcv)) == 1, "the next message", rcv)
        assert _accept_all(guest, rcv) == ["next"]
    assert _drain_queue(ctx, queue) == []
