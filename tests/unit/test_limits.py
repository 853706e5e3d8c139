"""Per-guest limits in the routing core: going over one ends that guest's connection with
the matching AMQP error, and the broker never sees the offending traffic."""

from __future__ import annotations

import pytest
from proton import Collector, Connection, Delivery, Endpoint, Transport

from connector.errors import ConfigError
from connector.limits import GuestLimits
from tests.support.routing import Harness, attach, send_message


def _closed_with(conn, condition: str) -> str:
    assert conn.state & Endpoint.REMOTE_CLOSED, "the guest's connection is still open"
    assert conn.remote_condition.name == condition
    return conn.remote_condition.description


def _stream_with_uncredited_transfer() -> tuple[bytes, bytes]:
    """What a guest client writes when it sends a transfer: recorded against a peer that
    granted credit, so it can be replayed to the router, where the broker granted none."""
    client, server = Transport(), Transport(Transport.SERVER)
    cconn, sconn = Connection(), Connection()
    client.bind(cconn)
    server.bind(sconn)
    collector = Collector()
    sconn.collect(collector)
    written = bytearray()

    def pump() -> None:
        while client.pending() > 0 or server.pending() > 0:
            if client.pending() > 0:
                out = client.peek(client.pending())
                client.pop(len(out))
                written.extend(out)
                server.push(out)
            if server.pending() > 0:
                out = server.peek(server.pending())
                server.pop(len(out))
                client.push(out)

    cconn.container = "guest-app"
    cconn.open()
    ssn = cconn.session()
    ssn.open()
    snd = attach(ssn, "s", "q")
    pump()
    sconn.open()
    ev = collector.peek()
    while ev is not None:
        if ev.type.name == "PN_SESSION_REMOTE_OPEN":
            ev.session.open()
        if ev.type.name == "PN_LINK_REMOTE_OPEN":
            ev.link.target.copy(ev.link.remote_target)
            ev.link.open()
            ev.link.flow(1)
        collector.pop()
        ev = collector.peek()
    pump()
    handshake = bytes(written)
    send_message(snd, "x", "no credit here")
    pump()
    return handshake, bytes(written[len(handshake) :])


def test_transfer_without_credit_ends_the_connection() -> None:
    h = Harness(guest=False)
    handshake, transfer = _stream_with_uncredited_transfer()
    h.router.guest.push(handshake)
    h.pump()
    assert h.router.error is None
    h.router.guest.push(transfer)
    h.pump()
    assert h.router.error[0] == "amqp:link:transfer-limit-exceeded"
    assert "without credit" in h.router.error[1]
    brcv = next(ev.link for ev in h.broker.events if ev.type.name == "PN_LINK_REMOTE_OPEN")
    assert brcv.current is None  # nothing reached the broker
    assert h.broker.connection.state & Endpoint.REMOTE_CLOSED


def test_unsettled_limit() -> None:
    h = Harness(limits=GuestLimits(max_unsettled_per_link=3))
    conn, snd, _ = h.sender("s", "q", credit=10)
    for i in range(4):
        send_message(snd, f"u{i}", i)
    h.pump()
    assert "more than 3 unsettled" in _closed_with(conn, "amqp:resource-limit-exceeded")


def test_a_guest_that_never_settles_is_sent_no_more_than_its_unsettled_limit() -> None:
    # The guest grants plenty of credit and settles nothing: the broker must not be given
    # credit for more than the limit, or the connector would hold the broker's whole queue
    # (each message a proton delivery in both engines until the guest settles it). What
    # the guest settles is given back to the broker as credit; nothing is violated.
    h = Harness(limits=GuestLimits(max_unsettled_per_link=3))
    _, rcv, bsnd = h.receiver("r", "q")
    rcv.flow(100)
    h.pump()
    assert bsnd.credit == 3
    for i in range(3):
        send_message(bsnd, f"m{i}", i)
    h.pump()
    assert bsnd.credit == 0  # three held for the guest: no more until it settles
    got = [ev.delivery for ev in h.guest.events if ev.type.name == "PN_DELIVERY"]
    assert len({d.tag for d in got}) == 3
    for dlv in list({d.tag: d for d in got}.values())[:2]:
        dlv.update(Delivery.ACCEPTED)
        dlv.settle()
    h.pump()
    assert bsnd.credit == 2  # two settled: two more may come
    assert not h.guest.connection.state & Endpoint.REMOTE_CLOSED


def test_message_size_limit_aborts_the_forwarded_part() -> None:
    h = Harness(limits=GuestLimits(max_message_size=100_000))
    conn, snd, brcv = h.sender("s", "q", credit=1)
    snd.delivery("big")
    snd.send(b"\x00" * 150_000)
    h.pump()
    # Only that link is detached; the connection goes on.
    assert snd.state & Endpoint.REMOTE_CLOSED
    assert snd.remote_condition.name == "amqp:link:message-size-exceeded"
    assert not conn.state & Endpoint.REMOTE_CLOSED
    dlv = brcv.current
    assert dlv is None or dlv.aborted  # the broker never gets a whole message
    assert brcv.state & Endpoint.REMOTE_CLOSED


def _attach_receivers(h: Harness, count: int, *, pump_each: bool) -> Connection:
    conn, ssn = h.guest_session()
    for i in range(count):
        attach(ssn, f"r{i}", "q", sending=False)
        if pump_each:
            h.pump()
    h.pump()
    return conn


def test_link_count_limit() -> None:
    h = Harness(limits=GuestLimits(max_links=2))
    conn = _attach_receivers(h, 3, pump_each=False)
    assert "more than 2 links" in _closed_with(conn, "amqp:resource-limit-exceeded")


def test_attach_rate_limit() -> None:
    h = Harness(limits=GuestLimits(attach_rate=0.001, attach_burst=5))
    conn = _attach_receivers(h, 6, pump_each=True)
    assert "links/s" in _closed_with(conn, "amqp:resource-limit-exceeded")


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"max_frame_size": 100}, "limits.max_frame_size"),
        ({"max_links": "many"}, "limits.max_links"),
        ({"max_links": 2.5}, "limits.max_links"),
        ({"no_such": 1}, "limits.no_such"),
        ({"idle_timeout_s": -1}, "limits.idle_timeout_s"),
        ({"idle_timeout_s": float("nan")}, "limits.idle_timeout_s"),
        ({"open_timeout_s": float("inf")}, "limits.open_timeout_s"),
    ],
)
def test_bad_limits_name_the_key(table: dict, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        GuestLimits.from_table(table)
    assert err.value.where == where


def test_a_guest_asking_for_a_tiny_idle_timeout_is_refused() -> None:
    h = Harness()
    h.guest.transport.idle_timeout = 0.01  # proton advertises half: 5 ms
    conn = h.open_guest()
    assert "below the minimum of 1000 ms" in _closed_with(conn, "amqp:resource-limit-exceeded")
    assert h.router.upstream is None  # no broker connection was made for it


def test_a_guest_that_never_opened_is_still_told_why_it_is_cut() -> None:
    h = Harness(guest=False)
    h.router.guest.push(b"AMQP\x00\x01\x00\x00")
    h.pump()
    h.router.violation("amqp:resource-limit-exceeded", "no AMQP open within 10s")
    h.pump()
    assert b"amqp:resource-limit-exceeded" in h.written
    assert b"no AMQP open within 10s" in h.written
