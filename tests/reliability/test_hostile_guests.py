"""Hostile and unusual guests against the real daemon and a real Artemis, over real channels.

Each test plays a guest that does what a well-behaved client rarely does (detaches with a
delivery in flight and comes back under the same link name, takes credit back, gives up a
large message half way, ends a session with deliveries unsettled both ways, ...) or meets a
fault in the middle of a 20 MB transfer, and checks what an operator relies on: nothing is
acknowledged early, nothing is lost, the connection or the channel goes on, and
``qpid-virtio-status`` reads right afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cproton_ffi import ffi, lib
from proton import Data, Delivery, Described, Endpoint, Link, Message, uint, ulong

from connector.guest.client import AmqpError, Disconnected, GuestClient
from connector.limits import GuestLimits
from connector.routing.engine import read_condition
from connector.routing.frames import FLOW, TRANSFER, LinkExtras, encode
from tests.support.attach_peer import AttachPeer, link_flows
from tests.support.connector import Connector, Qemu, Routed, routed, wait_for

pytestmark = pytest.mark.broker

KINDS = ("unix", "pty")
TIMEOUT = 30.0
BIG = 2 * 1024 * 1024  # many frames at the guest's 64 KiB max-frame-size
HUGE = 20 * 1024 * 1024
WINDOW = uint(2**31 - 1)
BEGIN = 0x11


def _queue(stem: str) -> str:
    return f"hostile-{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def ctx(artemis: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    """One daemon on Artemis with a unix and a pty channel (guests h-unix, h-pty)."""
    with routed(artemis, tmp_path_factory.mktemp("hostile"), KINDS, "h") as running:
        yield running


# ---- a guest driven by hand: proton's objects, through the guest client's driver ----------


def _until(guest: GuestClient, cond: Callable[[], Any], what: str, link: Any = None) -> None:
    """Drive the guest's connection until ``cond()``; the peer's errors are raised."""
    guest._wait(lambda: bool(cond()), link, what, list, TIMEOUT)


def _link(guest: GuestClient, address: str, name: str, *, sending: bool) -> Link:
    """A link named ``name`` on a session of its own, attached."""
    ssn = guest.connection.session()
    ssn.open()
    link = ssn.sender(name) if sending else ssn.receiver(name)
    (link.target if sending else link.source).address = address
    link.open()
    _until(guest, lambda: link.state & Endpoint.REMOTE_ACTIVE, f"attach of {name}", link)
    return link


def _inbox(guest: GuestClient, link: Link) -> list[tuple[Message, Delivery]]:
    """Whole messages the guest client has taken off ``link``: (message, delivery)."""
    return guest._tracker.inbox.setdefault(link.name, [])


def _accept_all(guest: GuestClient, link: Link) -> list[Any]:
    """Accept and settle what ``link`` has received; return the bodies (a binary body as
    bytes: proton's is a view into the message, gone with it)."""
    got = _inbox(guest, link)[:]
    _inbox(guest, link).clear()
    for _, dlv in got:
        dlv.update(Delivery.ACCEPTED)
        dlv.settle()
    return [bytes(m.body) if isinstance(m.body, memoryview) else m.body for m, _ in got]


def _drain_queue(ctx: Routed, queue: str, expect: int = 0) -> list[Any]:
    """Everything on ``queue`` (accepted), read through the unix channel: ``expect``
    messages waited for (the broker puts back what a closed connection held
    asynchronously), then whatever else is there."""
    with ctx.client("unix", f"reader-{uuid.uuid4().hex[:6]}") as reader:
        got = reader.receive(queue, expect) if expect else []
        return [m.body for m in got + reader.receive(queue, 1000, drain=True)]


def _polled(daemon: Connector, guest: str, key: str, above: int) -> Callable[[], bool]:
    """A condition on the daemon's status (another process: it can only be polled), asked
    at most every 0.1 s so that the guest's driver keeps streaming in between."""
    asked = [0.0]

    def cond() -> bool:
        if time.monotonic() - asked[0] < 0.1:
            return False
        asked[0] = time.monotonic()
        return daemon.channel(guest)[key] > above

    return cond


def _start_huge_send(guest: GuestClient, queue: str) -> tuple[Link, Delivery, bytes]:
    """Start a 20 MB durable message (at-least-once) and give proton its first half, which
    streams as the driver runs; returns the link, the delivery and the second half. Until
    the test sends that, the message is certainly in mid-stream."""
    snd = _link(guest, queue, f"huge-{uuid.uuid4().hex[:6]}", sending=True)
    _until(guest, lambda: snd.credit > 0, "credit", snd)
    encoded = Message(body=b"\x5a" * HUGE, durable=True).encode()
    dlv = snd.delivery(uuid.uuid4().bytes)
    snd.send(encoded[: HUGE // 2])
    return snd, dlv, encoded[HUGE // 2 :]


# ---- a raw peer, for the frames proton will not write -------------------------------------


def _write_raw(peer: AttachPeer, frame: bytes) -> None:
    """Write what proton has queued, then ``frame``."""
    while out := peer.engine.peek_output():
        peer.engine.pop_output(os.write(peer._fd, out))
    assert os.write(peer._fd, frame) == len(frame)


def _where(peer: AttachPeer, link: Any) -> tuple[int, int]:
    key = (ffi.string(lib.pn_link_name(link)).decode(), bool(lib.pn_link_is_receiver(link)))
    return peer.engine.writer.links.by_key[key]


def _flow(peer: AttachPeer, link: Any, *, delivery_count: int, credit: int) -> None:
    """A flow for the peer's receiver ``link`` setting its link-credit, written raw: proton can
    only add credit, and AMQP lets a receiver take credit back (§2.6.7)."""
    channel, handle = _where(peer, link)
    fields = [
        uint(lib.pn_link_queued(link)), WINDOW, uint(0), WINDOW,
        uint(handle), uint(delivery_count), uint(credit), None, False, False,
    ]  # fmt: skip
    _write_raw(peer, encode(FLOW, channel, fields))


def _barrier(peer: AttachPeer, link: Any, *, delivery_count: int, credit: int) -> None:
    """Ask the connector to echo the link's state and wait for the answer: the connector
    writes it after every frame it had produced, so any transfer it sent is here by then."""
    before = len(link_flows(peer.received))
    incoming = lib.pn_link_queued(link)
    peer.ask_echo(link, incoming=incoming, outgoing=0, delivery_count=delivery_count, credit=credit)
    peer.pump_until(lambda: len(link_flows(peer.received)) > before, TIMEOUT)


def _frame(code: int, channel: int, fields: list[Any], payload: bytes = b"") -> bytes:
    """A raw frame carrying performative ``code`` (any, unlike ``frames.encode``)."""
    data = Data()
    data.put_object(Described(ulong(code), fields))
    body = data.encode() + payload
    return (8 + len(body)).to_bytes(4, "big") + bytes((2, 0)) + channel.to_bytes(2, "big") + body


def _transfer(
    where: tuple[int, int],
    delivery_id: int,
    tag: bytes | None,
    payload: bytes,
    *,
    more: bool,
    aborted: bool = False,
) -> bytes:
    """A raw transfer frame (proton never writes an abort whose first frame is unsent)."""
    channel, handle = where
    fields = [uint(handle), uint(delivery_id), tag, uint(0), False, more]
    fields += [None, None, False, aborted]
    return _frame(TRANSFER, channel, fields, payload)


def _revoked_receiver(ctx: Routed, queue: str, held: int) -> tuple[AttachPeer, Any, int]:
    """A raw guest on the pty channel whose receiver was granted 10 credits, then took them
    all back; then ``held`` messages are put on ``queue``, and the connector takes them from
    the broker (it cannot take credit back upstream, so it holds them for the guest).
    Returns the peer, its receiver and the channel's ``deliveries_out`` before all this."""
    daemon = ctx.daemon
    base = daemon.channel("h-pty")["deliveries_out"]
    peer = AttachPeer(ctx.channels["pty"].fd(), f"revoker-{uuid.uuid4().hex[:6]}")
    rcv, _ = peer.attach("r", queue, sending=False, extras=LinkExtras())
    lib.pn_link_flow(rcv, 10)
    # Once the connector has answered, it has passed the 10 credits to the broker (in the
    # same pump): taken back in the same read, they would never have left it.
    _barrier(peer, rcv, delivery_count=0, credit=10)
    _flow(peer, rcv, delivery_count=0, credit=0)
    _barrier(peer, rcv, delivery_count=0, credit=0)
    assert link_flows(peer.received)[-1]["link-credit"] == 0  # the connector took it back
    with ctx.client("unix", "filler") as filler:
        outcomes = filler.send(queue, [f"m{i}" for i in range(held)])
        assert {o.state for o in outcomes} == {"accepted"}
    wait_for(
        lambda: any(
            lk["name"] == "r" and lk["deliveries"] >= held
            for lk in daemon.channel("h-pty")["detail"]["links"]
        ),
        TIMEOUT,
        "the connector to take the messages from the broker",
    )
    return peer, rcv, base


# ---- link recovery, sessions, settlement ---------------------------------------------------


def test_a_receiver_detached_with_a_message_unsettled_gets_it_again_on_reattach(
    ctx: Routed,
) -> None:
    """A guest that detaches (closed=false) a receiver holding an unsettled message and
    attaches again under the same link name gets that message again, with the rest, on the
    new link: the detach acknowledged nothing, and the name is free for reuse."""
    queue = _queue("resume")
    with ctx.client("unix", "resume") as guest:
        assert {o.state for o in guest.send(queue, ["one", "two"])} == {"accepted"}
        rcv = _link(guest, queue, "resume-link", sending=False)
        rcv.flow(1)
        _until(guest, lambda: _inbox(guest, rcv), "a message", rcv)
        assert [m.body for m, _ in _inbox(guest, rcv)] == ["one"]  # left unsettled
        _inbox(guest, rcv).clear()
        rcv.detach()
        again = _link(guest, queue, "resume-link", sending=False)
        again.flow(2)
        _until(guest, lambda: len(_inbox(guest, again)) >= 2, "two messages", again)
        assert sorted(_accept_all(guest, again)) == ["one", "two"]
        links = wait_for(
            lambda: (e := ctx.daemon.channel("h-unix"))["links"] == 2 and e["detail"]["links"],
            TIMEOUT,
            "the status to list the sender and the one re-attached receiver",
        )
        assert sorted(lk["name"] for lk in links)[1] == "resume-link"
    assert _drain_queue(ctx, queue) == []  # both were accepted, once


def test_a_session_ended_with_deliveries_unsettled_both_ways_loses_nothing(
    ctx: Routed,
) -> None:
    """A guest that ends its sessions while holding unsettled messages from the broker and
    with a message of its own still unsettled: the broker redelivers what the guest held,
    and the connection goes on with new sessions."""
    queue = _queue("endssn")
    with ctx.client("pty", "endssn") as guest:
        guest.send(queue, ["a", "b"])
        rcv = _link(guest, queue, "endssn-r", sending=False)
        rcv.flow(2)
        _until(guest, lambda: len(_inbox(guest, rcv)) >= 2, "two messages", rcv)
        snd = _link(guest, queue, "endssn-s", sending=True)
        _until(guest, lambda: snd.credit > 0, "credit", snd)
        Message(body="c").send(snd)  # never settled by the guest
        for ssn in (rcv.session, snd.session):
            ssn.close()
        _until(
            guest,
            lambda: all(s.state & Endpoint.REMOTE_CLOSED for s in (rcv.session, snd.session)),
            "the sessions' ends",
        )
        # Left: the session and link the client sent "a" and "b" on.
        entry = wait_for(
            lambda: (e := ctx.daemon.channel("h-pty"))["sessions"] == 1 and e,
            TIMEOUT,
            "the status to show the one session left",
        )
        assert entry["links"] == 1
        # "c" was transferred whole before the end, so the broker may have stored it.
        got = guest.receive(queue, 2)
        assert sorted(m.body for m in got) == ["a", "b"]
    assert _drain_queue(ctx, queue) in ([], ["c"])


# ---- credit --------------------------------------------------------------------------------


def test_credit_taken_back_is_honoured_and_held_messages_are_not_lost(ctx: Routed) -> None:
    """A guest that lowers its credit to 0 gets nothing, even though the broker had already
    granted (and used) the old credit through the connector; granting 2 then brings exactly
    2; and what the connector held for the guest goes back to the broker when it leaves."""
    queue = _queue("revoke")
    peer, rcv, _ = _revoked_receiver(ctx, queue, held=5)
    try:
        _barrier(peer, rcv, delivery_count=0, credit=0)
        assert lib.pn_link_queued(rcv) == 0
        _flow(peer, rcv, delivery_count=0, credit=2)
        peer.pump_until(lambda: lib.pn_link_queued(rcv) >= 2, TIMEOUT)
        _barrier(peer, rcv, delivery_count=2, credit=0)
        assert lib.pn_link_queued(rcv) == 2
    finally:
        peer.close()
    # Two were sent but never settled, three never left the connector: all five come back.
    assert sorted(_drain_queue(ctx, queue, 5)) == [f"m{i}" for i in range(5)]


def test_the_deliveries_counter_counts_what_reached_the_guest_and_never_goes_down(
    ctx: Routed,
) -> None:
    """``deliveries_out`` is a counter (``qpid_virtio_deliveries_total`` in Prometheus): it
    adds up over the channel's life and never decreases, whatever the guest did. A decrease
    reads as a counter reset, so rate() and increase() jump by the whole count. Messages the
    connector holds for a guest without credit count once they reach it, not before."""
    queue = _queue("counter")
    daemon = ctx.daemon
    peer, rcv, base = _revoked_receiver(ctx, queue, held=5)
    try:
        assert daemon.channel("h-pty")["deliveries_out"] == base  # five held, none delivered
        _flow(peer, rcv, delivery_count=0, credit=2)
        peer.pump_until(lambda: lib.pn_link_queued(rcv) >= 2, TIMEOUT)
        assert daemon.channel("h-pty")["deliveries_out"] == base + 2
    finally:
        peer.close()
    assert daemon.wait_state("h-pty", "waiting")["deliveries_out"] == base + 2
    _drain_queue(ctx, queue, 5)


def test_messages_held_for_a_receiver_that_detaches_are_not_counted(ctx: Routed) -> None:
    """Messages held for a receiver without credit never reach the guest when it closes
    the link: they go back to the broker and are not counted as delivered, then or later."""
    queue = _queue("held-detach")
    daemon = ctx.daemon
    peer, rcv, base = _revoked_receiver(ctx, queue, held=5)
    try:
        lib.pn_link_close(rcv)
        peer.pump_until(lambda: lib.pn_link_state(rcv) & lib.PN_REMOTE_CLOSED, TIMEOUT)
        assert daemon.channel("h-pty")["deliveries_out"] == base
    finally:
        peer.close()
    assert daemon.wait_state("h-pty", "waiting")["deliveries_out"] == base
    assert sorted(_drain_queue(ctx, queue, 5)) == [f"m{i}" for i in range(5)]


# ---- multi-frame messages given up half way -----------------------------------------------


def test_a_guest_that_releases_a_large_message_half_received_gets_it_again_whole(
    ctx: Routed,
) -> None:
    """A guest receiving a 2 MB message settles it (released) after its first frames: the
    rest of it is not sent, the broker gets the release, and the message comes back whole,
    as does the one behind it."""
    queue = _queue("midrel")
    body = bytes(range(256)) * (BIG // 256)
    with ctx.client("unix", "midrel") as guest:
        assert {o.state for o in guest.send(queue, [body, "small"])} == {"accepted"}
        rcv = _link(guest, queue, "midrel-r", sending=False)
        rcv.flow(1)
        _until(guest, lambda: rcv.current is not None and rcv.current.pending > 100_000, "part")
        first = rcv.current
        assert first.partial
        first.update(Delivery.RELEASED)
        first.settle()
        rcv.flow(2)
        _until(guest, lambda: len(_inbox(guest, rcv)) >= 2, "two whole messages", rcv)
        got = _accept_all(guest, rcv)
        assert sorted(got, key=len) == ["small", body]
    assert _drain_queue(ctx, queue) == []


def test_a_message_aborted_half_way_is_dropped_and_the_link_goes_on(ctx: Routed) -> None:
    """A guest aborts a 2 MB message after 1 MB has gone through: the broker never stores
    it, the next message on the same link is accepted, and only that one is counted."""
    queue = _queue("midabort")
    before = ctx.daemon.channel("h-unix")
    with ctx.client("unix", "midabort") as guest:
        snd = _link(guest, queue, "midabort-s", sending=True)
        _until(guest, lambda: snd.credit > 0, "credit", snd)
        dlv = snd.delivery(b"t1")
        snd.send(Message(body=b"x" * BIG).encode()[: BIG // 2])
        _until(guest, lambda: guest.driver.transport.pending() <= 0, "half the message written")
        dlv.abort()
        assert [o.state for o in guest.send(queue, ["after"])] == ["accepted"]
    assert _drain_queue(ctx, queue) == ["after"]
    after = ctx.daemon.channel("h-unix")
    # One in ("after"), one out (to the reader): the aborted message is not a delivery.
    assert after["deliveries_in"] - before["deliveries_in"] == 1
    assert after["deliveries_out"] - before["deliveries_out"] == 1


def test_an_abort_arriving_with_its_first_frame_keeps_credit_in_step(ctx: Routed) -> None:
    """A raw guest writes a message's first frame and its abort in one write, then a whole
    message: the connector forwards nothing of the aborted one (proton drops it unsent), the
    next is accepted, and the credit the guest is told stays what the broker has left."""
    queue = _queue("abort1")
    before = ctx.daemon.channel("h-pty")
    peer = AttachPeer(ctx.channels["pty"].fd(), "abort1")
    try:
        snd, _ = peer.attach("s", queue, sending=True, extras=LinkExtras())
        peer.pump_until(lambda: lib.pn_link_credit(snd) > 0, TIMEOUT)
        granted = lib.pn_link_credit(snd)
        where = _where(peer, snd)
        aborted = bytes(Message(body="aborted").encode())
        good = bytes(Message(body="good").encode())
        frames = _transfer(where, 0, b"a", aborted[:10], more=True)
        frames += _transfer(where, 0, None, b"", more=False, aborted=True)
        frames += _transfer(where, 1, b"b", good, more=False)
        _write_raw(peer, frames)
        peer.pump_until(lambda: any("@disposition" in f for f in peer.received), TIMEOUT)
        (disposition,) = [f for f in peer.received if "@disposition" in f]
        assert "first=0x1" in disposition and "@accepted" in disposition
        # The guest has used two deliveries of its credit, the broker saw one: the last limit
        # the guest was given (delivery-count + link-credit) is still the broker's grant.
        last = link_flows(peer.received)[-1]
        assert last["delivery-count"] + last["link-credit"] == granted + 1
    finally:
        peer.close()
    assert _drain_queue(ctx, queue) == ["good"]
    after = ctx.daemon.wait_state("h-pty", "waiting")
    assert after["deliveries_in"] - before["deliveries_in"] == 1


# ---- faults in the middle of a 20 MB transfer ---------------------------------------------


def test_the_broker_closing_the_upstream_mid_20mb_forces_the_guest_and_stores_nothing(
    ctx: Routed,
) -> None:
    """The broker (an administrator, through its management) closes the upstream while a
    guest's 20 MB message streams through: the guest is closed with connection:forced at
    once, no outcome is invented, the half message is not stored, and the channel serves
    the next connection, counted as an upstream reconnect."""
    queue = _queue("bclose")
    daemon = ctx.daemon
    before = daemon.channel("h-unix")
    guest = ctx.client("unix", "bclose")
    try:
        snd, dlv, _ = _start_huge_send(guest, queue)
        _until(guest, _polled(daemon, "h-unix", "bytes_in", before["bytes_in"] + BIG), "2 MB")
        (conn,) = [c for c in ctx.broker.list_connections() if c["container_id"] == "bclose"]
        ctx.broker.management("closeConnectionWithID", conn["connection_id"])
        with pytest.raises((AmqpError, Disconnected)) as closed:
            _until(guest, lambda: dlv.remote_state, "an outcome", snd)
        assert "amqp:connection:forced" in str(closed.value)
        assert not dlv.remote_state
    finally:
        guest.driver.close_fd()
        ctx.channels["unix"].detach_fd()
    entry = daemon.wait_state("h-unix", "waiting")
    assert "amqp:connection:forced" in (entry["last_error"] or "")
    assert _drain_queue(ctx, queue) == []
    detail = daemon.channel("h-unix")["detail"]
    assert detail["upstream_reconnects"] == before["detail"]["upstream_reconnects"] + 1
    assert detail["guest_connections"] == before["detail"]["guest_connections"] + 2


def test_sighup_mid_20mb_leaves_the_transfer_alone(ctx: Routed) -> None:
    """A reload (SIGHUP) while a guest's 20 MB message streams through an unchanged channel
    does not disturb it: the message is accepted and arrives whole."""
    queue = _queue("hup")
    daemon = ctx.daemon
    before = daemon.channel("h-pty")
    with ctx.client("pty", "hup") as guest:
        snd, dlv, rest = _start_huge_send(guest, queue)
        _until(guest, _polled(daemon, "h-pty", "bytes_in", before["bytes_in"] + BIG), "2 MB")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in daemon.log_text(), TIMEOUT, "the reload")
        snd.send(rest)
        snd.advance()
        _until(guest, lambda: dlv.remote_state, "the outcome", snd)
        assert dlv.remote_state == Delivery.ACCEPTED
        dlv.settle()
        assert len(guest.receive(queue, 1)[0].body) == HUGE


def test_sigterm_mid_20mb_tells_the_guest_and_stores_nothing(artemis: Any, tmp_path: Path) -> None:
    """SIGTERM while a guest's 20 MB message streams through: the guest is told
    connection:forced at once and gets no outcome, the daemon exits 0, and the broker has
    not stored the half message."""
    queue = _queue("term")
    with routed(artemis, tmp_path, ("unix",), "t") as own:
        daemon = own.daemon
        guest = own.client("unix", "term")
        try:
            snd, dlv, _ = _start_huge_send(guest, queue)
            _until(guest, _polled(daemon, "t-unix", "bytes_in", BIG), "2 MB")
            daemon.proc.send_signal(signal.SIGTERM)
            with pytest.raises((AmqpError, Disconnected)) as closed:
                _until(guest, lambda: dlv.remote_state, "an outcome", snd)
            assert "amqp:connection:forced" in str(closed.value)
            assert daemon.proc.wait(TIMEOUT) == 0
        finally:
            guest.driver.close_fd()
            own.channels["unix"].detach_fd()
        daemon.start()
        with own.client("unix", "term2") as again:
            assert again.receive(queue, 1, drain=True) == []


# How long the broker stalls, against the guest idle timeout of the daemon below.
STALL_S = 4.0
STALL_IDLE_TIMEOUT_S = 2.0


@contextlib.contextmanager
def _own_daemon(
    artemis: Any, tmp_path: Path, toml: str, guest: str
) -> Iterator[tuple[Connector, Qemu]]:
    """A daemon of the test's own, configured by ``toml``, with one unix channel."""
    conf = tmp_path / "connector.toml"
    conf.write_text(toml)
    channel = Qemu("unix", tmp_path, guest)
    daemon = Connector(tmp_path, artemis, [channel], "--config", str(conf)).start()
    try:
        yield daemon, channel
    finally:
        assert daemon.stop() == 0
        channel.hang_up()


def test_a_stalled_broker_does_not_get_a_live_guest_cut_for_idleness(
    artemis: Any, tmp_path: Path
) -> None:
    """A broker that stops reading for a while (GC pause, slow disk; SIGSTOP here) while a
    guest streams a 20 MB message: the daemon stops reading the guest (backpressure), so the
    guest's heartbeats wait unread behind its message. The guest is live, so its idle
    timeout (how a dead guest is noticed) must not cut it: when the broker is back, the
    message is accepted."""
    queue = _queue("stall")
    toml = f"[limits]\nidle_timeout_s = {STALL_IDLE_TIMEOUT_S}\n"
    with (
        _own_daemon(artemis, tmp_path, toml, "s-unix") as (_, channel),
        GuestClient(channel.fd(), container_id="stall", timeout=TIMEOUT) as guest,
    ):
        snd = _link(guest, queue, "stall-s", sending=True)
        _until(guest, lambda: snd.credit > 0, "credit", snd)
        artemis.pause()
        try:
            dlv = Message(body=b"\x5a" * HUGE).send(snd)
            stalled = time.monotonic()
            # The stall is the fault under test, its length the point: drive the guest
            # (writing, heartbeating) for that long.
            _until(guest, lambda: time.monotonic() - stalled > STALL_S, "the stall", snd)
        finally:
            artemis.resume()
        _until(guest, lambda: dlv.remote_state, "the outcome", snd)
        assert dlv.remote_state == Delivery.ACCEPTED
        dlv.settle()


def test_a_guest_slow_to_read_does_not_get_its_broker_cut_for_idleness(
    artemis: Any, tmp_path: Path
) -> None:
    """A guest that stops reading for a while (its VM paused; here its client is simply not
    driven) while a 20 MB message comes to it: the daemon stops reading the broker
    (backpressure), so the broker's heartbeats wait unread behind the message. The broker
    is live, so our idle timeout towards it (how a dead broker is noticed) must not cut it:
    when the guest reads again, the message arrives whole."""
    queue = _queue("slowreader")
    toml = f"[broker]\nidle_timeout_s = {STALL_IDLE_TIMEOUT_S}\n"
    with _own_daemon(artemis, tmp_path, toml, "r-unix") as (daemon, channel):
        with GuestClient(channel.fd(), container_id="slowreader", timeout=TIMEOUT) as guest:
            body = b"\x5a" * HUGE
            assert guest.send(queue, [body])[0].state == "accepted"
            rcv = _link(guest, queue, "slow-r", sending=False)
            rcv.flow(1)
            base = daemon.channel("r-unix")["bytes_out"]
            _until(guest, _polled(daemon, "r-unix", "bytes_out", base), "the message", rcv)
            # The guest not reading is the fault under test, its length the point.
            time.sleep(STALL_S)
            _until(guest, lambda: _inbox(guest, rcv), "the whole message", rcv)
            assert _accept_all(guest, rcv) == [body]
        assert daemon.channel("r-unix")["last_error"] is None


# ---- limits --------------------------------------------------------------------------------


def test_sessions_up_to_the_limit_work_and_one_past_it_ends_only_that_connection(
    ctx: Routed,
) -> None:
    """A guest may begin ``max_sessions`` (32) sessions, each routed with a link that works;
    a begin on one channel past the limit ends that guest's connection with a framing error
    (the limit is its channel-max), and the channel serves the next connection."""
    queue = _queue("sessions")
    max_sessions = GuestLimits().max_sessions
    with ctx.client("pty", "sessions-f") as filler:
        filler.send(queue, [f"m{i}" for i in range(max_sessions)])
    peer = AttachPeer(ctx.channels["pty"].fd(), "sessions")
    links = [peer.attach("r0", queue, sending=False, extras=LinkExtras())[0]]
    conn = peer.engine.connection
    for n in range(1, max_sessions):
        ssn = lib.pn_session(conn)
        lib.pn_session_open(ssn)
        rcv = lib.pn_receiver(ssn, f"r{n}".encode())
        lib.pn_terminus_set_address(lib.pn_link_source(rcv), queue.encode())
        lib.pn_link_open(rcv)
        links.append(rcv)
    peer.pump_until(
        lambda: all(lib.pn_link_state(lk) & lib.PN_REMOTE_ACTIVE for lk in links), TIMEOUT
    )
    for rcv in links:
        lib.pn_link_flow(rcv, 1)
    peer.pump_until(lambda: sum(lib.pn_link_queued(lk) for lk in links) == max_sessions, TIMEOUT)
    entry = ctx.daemon.channel("h-pty")
    assert (entry["sessions"], entry["links"]) == (max_sessions, max_sessions)
    # Channels are numbered from 0: a begin on channel 32 is the 33rd session.
    _write_raw(peer, _frame(BEGIN, max_sessions, [None, uint(0), WINDOW, WINDOW]))
    peer.pump_until(lambda: lib.pn_connection_state(conn) & lib.PN_REMOTE_CLOSED, TIMEOUT)
    cond = read_condition(lib.pn_connection_remote_condition(conn))
    peer.engine.free()
    assert cond is not None and cond[0] == "amqp:connection:framing-error"
    assert "channel_max 31" in cond[1]
    entry = ctx.daemon.wait_state("h-pty", "waiting")
    assert (entry["sessions"], entry["links"]) == (0, 0)
    assert "amqp:connection:framing-error" in (entry["last_error"] or "")
    # Each session's link held one message unsettled: all come back.
    expected = sorted(f"m{i}" for i in range(max_sessions))
    assert sorted(_drain_queue(ctx, queue, max_sessions)) == expected


def test_a_guest_that_never_settles_holds_no_more_than_its_unsettled_limit(
    artemis: Any, tmp_path: Path
) -> None:
    """A guest grants plenty of credit and settles nothing. The broker must be given credit
    for no more than the guest's unsettled limit, or the connector would hold the broker's
    queue in memory for it: with the limit at 10, a second consumer on the same queue gets
    the other 40 messages, and the guest's 10 go back to the queue when it leaves."""
    queue = _queue("hoard")
    with artemis.connection() as direct:
        snd = direct.create_sender(queue)
        for i in range(50):
            snd.send(Message(body=f"m{i}"))
    toml = "[limits]\nmax_unsettled_per_link = 10\n"
    with _own_daemon(artemis, tmp_path, toml, "hoarder") as (_, channel):
        with GuestClient(channel.fd(), container_id="hoarder", timeout=TIMEOUT) as guest:
            rcv = _link(guest, queue, "hoard-r", sending=False)
            rcv.flow(1000)
            _until(guest, lambda: len(_inbox(guest, rcv)) >= 10, "ten messages", rcv)
            with artemis.connection() as other:
                second = other.create_receiver(queue, credit=50)
                bodies = []
                for _ in range(40):
                    bodies.append(second.receive(TIMEOUT).body)
                    second.accept()
            assert len(_inbox(guest, rcv)) == 10
        # The guest left without settling: its ten are the broker's to deliver again.
        assert sorted(bodies + _drain_queue_direct(artemis, queue, 10)) == sorted(
            f"m{i}" for i in range(50)
        )


def _drain_queue_direct(artemis: Any, queue: str, count: int) -> list[Any]:
    with artemis.connection() as conn:
        rcv = conn.create_receiver(queue, credit=count)
        got = []
        for _ in range(count):
            got.append(rcv.receive(TIMEOUT).body)
            rcv.accept()
        return got
