"""Guests routed through the daemon to RabbitMQ 3.10's AMQP 1.0 plugin, quirks included.

RabbitMQ refuses many things by ending the whole session (docs/brokers.md); the guest must
see that end with RabbitMQ's error, and the connection must go on.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from proton import Endpoint, Message

from connector.guest.client import AmqpError
from tests.support.connector import Routed, routed

pytestmark = pytest.mark.broker

MANY = 10_000


def _queue(stem: str) -> str:
    return f"/queue/{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def ctx(rabbitmq: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    with routed(rabbitmq, tmp_path_factory.mktemp("rabbit"), ("pty", "unix"), "r") as running:
        yield running


@pytest.mark.parametrize("kind", ["pty", "unix"])
def test_many_messages_at_least_once(ctx: Routed, kind: str) -> None:
    queue = _queue("many")
    before = ctx.daemon.channel(f"r-{kind}")
    with ctx.client(kind) as guest:
        outcomes = guest.send(queue, (f"m{i}" for i in range(MANY)))
        assert [o.state for o in outcomes].count("accepted") == MANY
        got = guest.receive(queue, MANY)
        assert [m.body for m in got] == [f"m{i}" for i in range(MANY)]
    after = ctx.daemon.channel(f"r-{kind}")
    assert after["deliveries_in"] - before["deliveries_in"] == MANY
    assert after["deliveries_out"] - before["deliveries_out"] == MANY


def test_released_and_rejected(ctx: Routed) -> None:
    queue = _queue("outcomes")
    with ctx.client("pty") as guest:
        guest.send(queue, ["r"])
        assert [m.body for m in guest.receive(queue, 1, outcome="released")] == ["r"]
        assert [m.body for m in guest.receive(queue, 1, outcome="rejected")] == ["r"]
        guest.send(queue, ["next"])
        assert [m.body for m in guest.receive(queue, 1)] == ["next"]  # rejected one is gone


@pytest.mark.parametrize(
    ("what", "condition"),
    [
        ("missing exchange", "amqp:not-found"),
        ("dynamic", "amqp:not-implemented"),
    ],
)
def test_attach_refused_by_ending_the_session_reaches_the_guest(
    ctx: Routed, what: str, condition: str
) -> None:
    with ctx.client("unix") as guest:
        with pytest.raises(AmqpError) as ended:
            if what == "dynamic":
                guest.request(_queue("svc"), "ping")
            else:
                guest.send("/exchange/missing-exchange/key", ["x"])
        assert ended.value.name == condition
        # Only the session ended: the guest's connection is still up.
        assert guest.connection.state & Endpoint.REMOTE_ACTIVE
    with ctx.client("unix", container="app-after") as fresh:
        assert fresh.send(_queue("after"), ["ok"])[0].state == "accepted"


def test_modified_ends_the_session_and_nothing_is_lost(ctx: Routed) -> None:
    queue = _queue("modified")
    with ctx.client("pty") as guest:
        guest.send(queue, [Message(body="keep", durable=True)])
        assert [m.body for m in guest.receive(queue, 1, outcome="modified")] == ["keep"]
        # RabbitMQ answers the modified outcome by ending the session; the guest sees that.
        with pytest.raises(AmqpError) as ended:
            guest.receive(queue, 1)
        assert ended.value.name == "amqp:invalid-field"
    with ctx.client("pty", container="app-again") as again:
        assert [m.body for m in again.receive(queue, 1)] == ["keep"]


def test_each_guest_is_its_own_broker_connection(ctx: Routed) -> None:
    with ctx.client("pty", "agent-1") as a, ctx.client("unix", "agent-2") as b:
        a.send(_queue("id"), ["a"])
        b.send(_queue("id"), ["b"])
        rows = ctx.broker.list_connections()
        addresses = {r["remote_address"] for r in rows}
        for guest in ("r-pty", "r-unix"):
            local = ctx.daemon.channel(guest)["detail"]["upstream"]["local_address"]
            assert local in addresses, (local, addresses)
