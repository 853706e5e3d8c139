"""Guests' AMQP connections routed through the real daemon to real brokers (issue 2 §7).

Every test runs the daemon as a subprocess with real channels — a pty, a unix socket that
the test listens on (qemu ``server=on``) and one the daemon listens on (``server=off``) —
and a guest client speaking AMQP over the test's end of the channel.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cproton_ffi import ffi, lib
from proton import UNDESCRIBED, Array, Data, Described, Message, symbol, ulong
from proton.handlers import MessagingHandler
from proton.reactor import Container

from connector.guest.client import AmqpError, Disconnected, LinkRefused
from connector.routing.engine import read_condition
from connector.routing.frames import LinkExtras
from tests.brokers.artemis import NO_AUTO_CREATE_PREFIX
from tests.support.attach_peer import AttachPeer, link_flows
from tests.support.connector import Routed, routed, wait_for

pytestmark = pytest.mark.broker

KINDS = ("pty", "unix", "unix-listen")
# Enough to cross many credit refills (Artemis grants 1000 at a time).
MANY = 10_000
BIG = 20 * 1024 * 1024
# Sessions begun and ended at once: each one a chance for the broker's begin to come late.
BRIEF_SESSIONS = 50
BRIEF_LINKS = 40
TIMEOUT = 60.0


def _queue(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def ctx(artemis: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    """One daemon on Artemis with one channel of each kind (guests g-pty, g-unix, g-unix-listen)."""
    with routed(artemis, tmp_path_factory.mktemp("routing"), KINDS) as running:
        yield running


@pytest.mark.parametrize("kind", KINDS)
def test_many_messages_at_least_once_counted_exactly(ctx: Routed, kind: str) -> None:
    daemon = ctx.daemon
    before = daemon.channel(f"g-{kind}")
    queue = _queue("many")
    with ctx.client(kind) as guest:
        outcomes = guest.send(queue, (f"m{i}" for i in range(MANY)))
        assert [o.state for o in outcomes].count("accepted") == MANY
        got = guest.receive(queue, MANY)
        assert [m.body for m in got] == [f"m{i}" for i in range(MANY)]
        # Nothing more is there: a drain returns no message.
        assert guest.receive(queue, 1, drain=True) == []
    after = daemon.channel(f"g-{kind}")
    assert after["deliveries_in"] - before["deliveries_in"] == MANY
    assert after["deliveries_out"] - before["deliveries_out"] == MANY
    assert after["bytes_in"] > before["bytes_in"]


class _Responder(MessagingHandler):
    """A service on the host, attached directly to the broker, answering requests."""

    def __init__(self, url: str, address: str, user: str | None, password: str | None) -> None:
        super().__init__()
        self.url, self.address, self.user, self.password = url, address, user, password
        self.ready = threading.Event()
        self.stop = threading.Event()

    def on_start(self, event: Any) -> None:
        conn = event.container.connect(self.url, user=self.user, password=self.password)
        event.container.create_receiver(conn, self.address)
        self.sender = event.container.create_sender(conn, None)
        self.timer = event.container.schedule(0.1, self)

    def on_link_opened(self, event: Any) -> None:
        if event.receiver:
            self.ready.set()

    def on_timer_task(self, event: Any) -> None:
        if self.stop.is_set():
            event.container.stop()
        else:
            event.container.schedule(0.1, self)

    def on_message(self, event: Any) -> None:
        msg = event.message
        self.sender.send(
            Message(address=msg.reply_to, body=f"re:{msg.body}", correlation_id=msg.correlation_id)
        )


def test_request_response_with_a_dynamic_reply_queue(ctx: Routed) -> None:
    broker = ctx.broker
    service = _queue("svc")
    responder = _Responder(broker.url, service, broker.user, broker.password)
    container = Container(responder)
    thread = threading.Thread(target=container.run, daemon=True)
    thread.start()
    try:
        assert responder.ready.wait(TIMEOUT)
        with ctx.client("unix") as guest:
            for i in range(3):
                reply = guest.request(service, f"ping{i}")
                assert reply.body == f"re:ping{i}"
    finally:
        responder.stop.set()
        thread.join(TIMEOUT)


def test_anonymous_relay(ctx: Routed) -> None:
    queue = _queue("relay")
    with ctx.client("pty") as guest:
        caps = [str(c) for c in guest.connection.remote_offered_capabilities or []]
        assert "ANONYMOUS-RELAY" in caps  # the broker's offer reached the guest
        outcomes = guest.send(None, [Message(address=queue, body=i) for i in range(5)])
        assert {o.state for o in outcomes} == {"accepted"}
        assert [m.body for m in guest.receive(queue, 5)] == list(range(5))


def test_drain_returns_what_is_there_and_gives_back_the_rest(ctx: Routed) -> None:
    queue = _queue("drain")
    with ctx.client("unix-listen") as guest:
        guest.send(queue, ["a", "b"])
        got = guest.receive(queue, 5, drain=True)
        assert [m.body for m in got] == ["a", "b"]
        assert guest.receive(queue, 3, drain=True) == []


@pytest.mark.parametrize(
    ("outcome", "comes_back", "counted"),
    [
        ("accepted", False, False),
        ("rejected", False, False),
        ("released", True, False),
        ("modified", True, True),  # modified with delivery-failed counts a delivery
    ],
)
def test_every_outcome_reaches_the_broker(
    ctx: Routed, outcome: str, comes_back: bool, counted: bool
) -> None:
    queue = _queue(outcome)
    with ctx.client("pty") as guest:
        guest.send(queue, [outcome])
        assert [m.body for m in guest.receive(queue, 1, outcome=outcome)] == [outcome]
        if comes_back:
            # The broker requeues asynchronously: wait for it rather than drain at once.
            again = guest.receive(queue, 1)
            assert [m.body for m in again] == [outcome]
            assert (again[0].delivery_count >= 1) == counted
        else:
            assert guest.receive(queue, 1, drain=True) == []


def test_a_20mb_message_streams_through(ctx: Routed) -> None:
    queue = _queue("big")
    body = bytes(range(256)) * (BIG // 256)
    with ctx.client("unix") as guest:
        assert guest.send(queue, [body])[0].state == "accepted"
        got = guest.receive(queue, 1)
        assert got[0].body == body


@pytest.mark.parametrize("kind", ["unix", "pty"])
def test_a_large_message_does_not_grow_the_daemon(artemis: Any, tmp_path: Path, kind: str) -> None:
    queue = _queue("huge")
    body = b"\x5a" * (3 * BIG)
    # A daemon of its own, so the baseline is a fresh one's, whatever ran before.
    with routed(artemis, tmp_path, (kind,), "huge") as own:
        pid = own.daemon.proc.pid
        before = _peak_rss_mb(pid)
        with own.client(kind) as guest:
            assert guest.send(queue, [body])[0].state == "accepted"
            assert len(guest.receive(queue, 1)[0].body) == len(body)
        grown = _peak_rss_mb(pid) - before
    # MB: the 4 MiB backlog bound in each direction and proton's buffers, not the 60 MB
    # message (it was +64 MB while proton's hidden output buffer went unbounded).
    assert grown < 16


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_link_capabilities_and_default_outcome_cross_both_ways(ctx: Routed) -> None:
    # Artemis offers DELAYED_DELIVERY on a link only when the client's attach desired it, so
    # its answer shows the guest's desired-capabilities reached it, and the guest seeing the
    # offer shows the broker's offered-capabilities came back. Artemis echoes a receiver's
    # source, so the default-outcome makes the same round trip.
    delayed = Array(UNDESCRIBED, Data.SYMBOL, symbol("DELAYED_DELIVERY"))
    released = Described(ulong(0x26), [])
    queue = _queue("caps")
    peer = AttachPeer(ctx.channels["unix"].fd(), "caps-guest")
    try:
        _, answer = peer.attach("s", queue, sending=True, extras=LinkExtras(desired=delayed))
        assert answer is not None and list(answer.offered.elements) == [delayed.elements[0]]
        _, plain = peer.attach("p", queue, sending=True, extras=LinkExtras())
        # Without the wish, no offer. (Artemis answers a sender with a source that has no
        # address, which proton drops and the connector carries: that may come back.)
        assert plain is None or (plain.offered, plain.desired) == (None, None)
        _, echoed = peer.attach(
            "r", queue, sending=False, extras=LinkExtras(default_outcome=released)
        )
        assert echoed is not None and echoed.default_outcome == released
    finally:
        peer.close()


def test_a_guests_echo_is_answered_with_the_links_end_to_end_state(ctx: Routed) -> None:
    # A flow with echo asks the connector for its end of the link's state; proton alone
    # never answers. The credit in the answer is what the broker granted, and the link
    # goes on consistently afterwards: exactly the messages the credit allows arrive.
    queue = _queue("echo")
    with ctx.client("unix") as guest:
        guest.send(queue, [f"e{i}" for i in range(10)])
    peer = AttachPeer(ctx.channels["unix"].fd(), "echo-guest")
    try:
        rcv, _ = peer.attach("r", queue, sending=False, extras=LinkExtras())
        lib.pn_link_flow(rcv, 4)
        peer.pump_until(lambda: lib.pn_link_queued(rcv) == 4, TIMEOUT)
        peer.ask_echo(rcv, incoming=4, outgoing=0, delivery_count=4, credit=0)
        peer.pump_until(lambda: link_flows(peer.received), TIMEOUT)
        (answer,) = link_flows(peer.received)
        assert answer["delivery-count"] == 4 and answer["link-credit"] == 0
        lib.pn_link_flow(rcv, 6)
        peer.pump_until(lambda: lib.pn_link_queued(rcv) == 10, TIMEOUT)

        snd, _ = peer.attach("s", _queue("echo-in"), sending=True, extras=LinkExtras())
        peer.pump_until(lambda: lib.pn_link_credit(snd) > 3, TIMEOUT)
        granted = lib.pn_link_credit(snd)
        sent = []
        for i in range(3):
            tag = ffi.new("pn_delivery_tag_t *", {"size": 1, "start": ffi.new("char[]", b"%d" % i)})
            sent.append(lib.pn_delivery(snd, tag[0]))
            body = bytes(Message(body=f"s{i}").encode())
            lib.pn_link_send(snd, body, len(body))
            lib.pn_link_advance(snd)
        peer.pump_until(lambda: all(lib.pn_delivery_remote_state(d) for d in sent), TIMEOUT)
        before = len(link_flows(peer.received))  # the connector's grants so far
        peer.ask_echo(snd, incoming=10, outgoing=3, delivery_count=3, credit=granted - 3)
        peer.pump_until(lambda: len(link_flows(peer.received)) > before, TIMEOUT)
        answer = link_flows(peer.received)[-1]
        assert answer["delivery-count"] == 3 and answer["link-credit"] == lib.pn_link_credit(snd)
        assert answer["link-credit"] >= granted - 3
    finally:
        peer.close()
    with ctx.client("unix") as guest:  # never settled, so the broker still has all ten
        assert sorted(m.body for m in guest.receive(queue, 10)) == [f"e{i}" for i in range(10)]


def test_refused_attach_error_reaches_the_guest(ctx: Routed) -> None:
    with ctx.client("unix-listen") as guest:
        with pytest.raises(LinkRefused) as refused:
            guest.receive(f"{NO_AUTO_CREATE_PREFIX}missing", 1)
        assert refused.value.name == "amqp:not-found"
        # The connection and session live on.
        assert guest.send(_queue("after"), ["ok"])[0].state == "accepted"


def _closed(conn: Any) -> bool:
    return bool(lib.pn_connection_state(conn) & lib.PN_REMOTE_CLOSED)


def _detaches(peer: AttachPeer) -> int:
    """Detach frames the peer has received."""
    return sum("<- @detach" in line for line in peer.received)


def _one_accepted(peer: AttachPeer, snd: Any) -> None:
    """A message sent on the peer's sender ``snd`` is accepted by the broker."""
    tag = ffi.new("pn_delivery_tag_t *", {"size": 1, "start": ffi.new("char[]", b"1")})
    dlv = lib.pn_delivery(snd, tag[0])
    body = bytes(Message(body="after").encode())
    lib.pn_link_send(snd, body, len(body))
    lib.pn_link_advance(snd)
    peer.pump_until(lambda: lib.pn_delivery_remote_state(dlv), TIMEOUT)
    assert lib.pn_delivery_remote_state(dlv) == lib.PN_ACCEPTED


def test_a_session_ended_as_soon_as_it_is_begun_leaves_the_connection_up(ctx: Routed) -> None:
    # The connector answers a guest's begin at once, so a guest may end the session before
    # the broker's begin has come back. Proton forgets a session's channel as its end goes
    # out, so a broker's begin arriving after that failed the whole upstream connection
    # ("begin reply to unknown channel"), and with it every other link of the guest.
    peer = AttachPeer(ctx.channels["unix"].fd(), "brief-sessions")
    try:
        snd, _ = peer.attach("s", _queue("brief"), sending=True, extras=LinkExtras())
        conn = peer.engine.connection
        for _ in range(BRIEF_SESSIONS):
            ssn = lib.pn_session(conn)
            lib.pn_session_open(ssn)
            peer.pump_until(lambda s=ssn: lib.pn_session_state(s) & lib.PN_REMOTE_ACTIVE, TIMEOUT)
            lib.pn_session_close(ssn)
            peer.pump_until(
                lambda s=ssn: lib.pn_session_state(s) & lib.PN_REMOTE_CLOSED or _closed(conn),
                TIMEOUT,
            )
            assert not _closed(conn), read_condition(lib.pn_connection_remote_condition(conn))
            lib.pn_session_free(ssn)
        _one_accepted(peer, snd)  # the first session and its link still work end to end
    finally:
        peer.close()


@pytest.mark.parametrize("closing", [True, False], ids=["closed", "detached"])
def test_links_ended_before_the_broker_answered_leave_the_connection_up(
    ctx: Routed, closing: bool
) -> None:
    # The same race for links: a guest may end a link before its attach is answered, so
    # the connector's detach goes up right behind its attach. Proton finds the broker's late
    # answer by the link's name; the test shows Artemis takes the pair too, both kinds of
    # link, closed or only detached.
    peer = AttachPeer(ctx.channels["unix"].fd(), "brief-links")
    conn = peer.engine.connection
    try:
        snd, _ = peer.attach("s", _queue("brief"), sending=True, extras=LinkExtras())
        ssn = lib.pn_link_session(snd)
        for i in range(BRIEF_LINKS):
            link = (lib.pn_sender if i % 2 else lib.pn_receiver)(ssn, b"brief-%d" % i)
            node = lib.pn_link_target(link) if i % 2 else lib.pn_link_source(link)
            lib.pn_terminus_set_address(node, _queue("brief").encode())
            lib.pn_link_open(link)
            (lib.pn_link_close if closing else lib.pn_link_detach)(link)
            peer.pump_until(lambda n=i: _detaches(peer) > n or _closed(conn), TIMEOUT)
            assert not _closed(conn), read_condition(lib.pn_connection_remote_condition(conn))
        _one_accepted(peer, snd)
    finally:
        peer.close()


def test_guests_are_separate_broker_connections_with_their_identity(
    ctx: Routed,
) -> None:
    daemon = ctx.daemon
    broker = ctx.broker
    with ctx.client("pty", "agent-a") as a, ctx.client("unix", "agent-b") as b:
        a.send(_queue("id"), ["a"])
        b.send(_queue("id"), ["b"])
        conns = {c["container_id"]: c for c in broker.list_connections()}
        assert {"agent-a", "agent-b"} <= set(conns)
        for guest, container in (("g-pty", "agent-a"), ("g-unix", "agent-b")):
            entry = daemon.channel(guest)
            assert entry["detail"]["upstream"]["container_id"] == container
            local = entry["detail"]["upstream"]["local_address"]
            # The broker's peer address for that connection is our upstream socket.
            assert conns[container]["remote_address"].endswith(local.split(":")[-1])


def test_reconnect_on_the_same_channel_discards_stale_bytes(ctx: Routed) -> None:
    daemon = ctx.daemon
    ch = ctx.channels["unix"]
    queue = _queue("again")
    with ctx.client("unix") as first:
        first.send(queue, ["one"])
    daemon.wait_state("g-unix", "waiting")
    before = daemon.channel("g-unix")["discarded_bytes"]
    ch.write_raw(b"\x00stale frame bytes from a dead client\x00")
    with ctx.client("unix") as second:
        assert [m.body for m in second.receive(queue, 1)] == ["one"]
    discarded = daemon.channel("g-unix")["discarded_bytes"] - before
    assert discarded == len(b"\x00stale frame bytes from a dead client\x00")


def test_broker_stopped_mid_stream_forces_the_guest_and_loses_nothing(
    ctx: Routed, tmp_path: Path
) -> None:
    daemon = ctx.daemon
    broker = ctx.broker
    queue = _queue("outage")
    accepted: list[str] = []
    guest = ctx.client("unix-listen")
    try:
        # Durable, so that what the broker accepted survives its SIGKILL.
        outcomes = guest.send(queue, [Message(body=b, durable=True) for b in ("p0", "p1")])
        accepted += [
            body for body, o in zip(["p0", "p1"], outcomes, strict=True) if o.state == "accepted"
        ]
        broker.kill()
        with pytest.raises((Disconnected, AmqpError)) as dropped:
            guest.send(queue, [Message(body="lost?", durable=True)])
        assert "amqp:connection:forced" in str(dropped.value)
    finally:
        guest.driver.close_fd()
        broker.start()
    entry = daemon.wait_state("g-unix-listen", "waiting")
    assert "amqp:connection:forced" in (entry["last_error"] or "")
    with ctx.client("unix-listen") as again:
        got = again.receive(queue, len(accepted))
        assert [m.body for m in got] == accepted  # all the broker accepted is there
        assert daemon.channel("g-unix-listen")["detail"]["upstream_reconnects"] >= 1
        extra = again.receive(queue, 5, drain=True)
        assert [m.body for m in extra] in ([], ["lost?"])  # never acknowledged, maybe stored
    wait_for(lambda: daemon.snapshot(), 10, "daemon alive")


@pytest.mark.parametrize("mechanism", [None, "ANONYMOUS", "EXTERNAL"])
def test_guest_sasl_choices_all_get_the_channels_identity(
    ctx: Routed, mechanism: str | None
) -> None:
    """A bare AMQP header, SASL ANONYMOUS or SASL EXTERNAL: whatever the guest does, it is
    the channel's guest on the broker."""
    from connector.guest.client import GuestClient

    ch = ctx.channels["unix-listen"]
    with GuestClient(
        ch.fd(), container_id=f"sasl-{mechanism}", timeout=TIMEOUT, sasl_mechanisms=mechanism
    ) as guest:
        assert guest.send(_queue("sasl"), ["hi"])[0].state == "accepted"
        entry = ctx.daemon.channel("g-unix-listen")
        assert entry["detail"]["upstream"]["container_id"] == f"sasl-{mechanism}"
