"""Faults while guests are mid-stream, each in its own test, with counts that must add up.

Every test runs its own daemon on the session's Artemis (a fault may kill it) and a fleet of
guests (tests/reliability/harness.py) sending and receiving numbered durable messages
at-least-once. The assertion common to all: no message a guest saw accepted is lost;
duplicates are counted and reported, not failed on.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proton import Endpoint, Message

from connector.guest.client import GuestClient, GuestClientError
from tests.reliability import amqp, harness
from tests.reliability.conftest import Report
from tests.reliability.harness import ChannelEnd, Fleet
from tests.reliability.procstat import rss_bytes
from tests.support.connector import Connector, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# Messages per guest: at BATCH=20 a few seconds of traffic, so a fault lands mid-stream.
TOTAL = 400
# How long a fleet may take, fault and recovery included (an Artemis restart is ~3 s).
FLEET_TIMEOUT = 120.0
# The fault is injected once every guest has this share of its messages accepted.
FAULT_AT = 0.3
KINDS = ("pty", "unix", "unix-listen")


def _prefix() -> str:
    return f"rel-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def setup(artemis: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A daemon with one channel of each kind; stopped (and Artemis running) afterwards."""
    ends = harness.channel_ends(KINDS, tmp_path, "g")
    daemon = Connector(tmp_path, artemis, list(ends)).start()
    try:
        yield {"daemon": daemon, "ends": ends, "broker": artemis, "work": tmp_path}
    finally:
        if not artemis.running():
            artemis.start()
        if daemon.proc is not None:
            daemon.stop()
        for end in ends:
            end.hang_up()


def _finish(fleet: Fleet, broker: Any, report: Report, case: str, did: str) -> dict[str, Any]:
    fleet.join(FLEET_TIMEOUT)
    ledgers = [g.ledger for g in fleet.guests]
    harness.drain_broker(broker, ledgers)
    counts = harness.check(ledgers)
    report.add(
        case,
        f"{did}; {counts['connections']} guest connections, "
        f"{counts['left_on_broker']} drained from the broker at the end; "
        f"guest errors {counts['errors'] or '-'}",
        **{k: counts[k] for k in ("sent", "accepted", "received", "lost", "duplicated")},
    )
    return counts


def test_no_fault_baseline(setup: dict[str, Any], report: Report) -> None:
    fleet = Fleet(setup["ends"], TOTAL, _prefix()).start(FLEET_TIMEOUT)
    counts = _finish(fleet, setup["broker"], report, "no fault (baseline)", "all routed")
    assert counts["duplicated"] == 0 and counts["left_on_broker"] == 0, counts
    assert all(g.ledger.done for g in fleet.guests)


def test_broker_killed_and_restarted(setup: dict[str, Any], report: Report) -> None:
    broker = setup["broker"]
    fleet = Fleet(setup["ends"], TOTAL, _prefix()).start(FLEET_TIMEOUT)
    fleet.wait_accepted(FAULT_AT, FLEET_TIMEOUT)
    broker.kill()
    down = time.monotonic()
    broker.start()
    outage = time.monotonic() - down
    counts = _finish(
        fleet,
        broker,
        report,
        "broker SIGKILLed and restarted mid-stream",
        f"guests forced off ({outage:.1f} s outage) and reconnected",
    )
    assert all(g.ledger.done for g in fleet.guests), counts


def test_connector_killed_and_restarted(setup: dict[str, Any], report: Report) -> None:
    daemon: Connector = setup["daemon"]
    fleet = Fleet(setup["ends"], TOTAL, _prefix()).start(FLEET_TIMEOUT)
    fleet.wait_accepted(FAULT_AT, FLEET_TIMEOUT)
    daemon.stop(signal.SIGKILL)
    daemon.start()
    counts = _finish(
        fleet,
        setup["broker"],
        report,
        "connector SIGKILLed and restarted mid-stream",
        "guests' next connections worked past stale bytes",
    )
    assert all(g.ledger.done for g in fleet.guests), counts


@pytest.mark.parametrize("kind", ["unix", "pty"])
def test_qemu_exits_mid_frame(setup: dict[str, Any], report: Report, kind: str) -> None:
    """One guest's channel closes under it in the middle of a frame; the others go on."""
    daemon: Connector = setup["daemon"]
    victim = next(e for e in setup["ends"] if e.kind == kind)
    others = [e for e in setup["ends"] if e is not victim]
    prefix = _prefix()
    fleet = Fleet(others, TOTAL, prefix).start(FLEET_TIMEOUT)
    vguest = harness.Guest(victim, f"{prefix}-{victim.guest}", TOTAL, fleet.progress)
    for _ in range(5):
        vguest.send_batch()
        vguest.receive_batch()
    vguest.send_batch()  # accepted and not yet received: must stay on the broker
    # A frame header announcing 256 bytes, and only a few of them: qemu dies mid-frame.
    victim.write_raw(amqp.frame(bytes(248))[:20])
    victim.hang_up()
    state = "gone" if kind == "pty" else "waiting"
    ch = daemon.wait_state(victim.guest, state)
    assert ch["upstream"] is None, ch
    did = f"channel {state}, its upstream closed; other guests unaffected"
    if kind == "unix":
        # qemu comes back on the same socket: the daemon reconnects and routes again.
        os.unlink(victim.path)
        again = ChannelEnd("unix", setup["work"], victim.guest)
        try:
            with GuestClient(again.fd(), container_id="back", timeout=30) as guest:
                assert guest.send(f"{prefix}-back", ["hello"])[0].state == "accepted"
        finally:
            again.hang_up()
        did += "; qemu back on the same socket: routed again"
    counts = _finish(fleet, setup["broker"], report, f"qemu exits mid-frame ({kind} channel)", did)
    # The counts above cover the other guests; the victim's accepted messages are checked
    # the same way (received before the exit, or still on the broker).
    harness.drain_broker(setup["broker"], [vguest.ledger])
    vcounts = harness.check([vguest.ledger])
    assert vcounts["accepted"] == 6 * harness.BATCH
    assert all(g.ledger.done for g in fleet.guests), counts
    report.add(
        f"qemu exits mid-frame ({kind}): the victim's messages",
        f"{vcounts['left_on_broker']} accepted-unreceived found on the broker",
        **{k: vcounts[k] for k in ("sent", "accepted", "received", "lost", "duplicated")},
    )


# The slow consumer: this many messages of this size wait on its queue (24 MiB), far more
# than the daemon's per-direction backlog bound (connector/channel.py BACKLOG_HIGH, 4 MiB).
SLOW_MESSAGES = 1500
SLOW_SIZE = 16 * 1024
# What the daemon's RSS may grow by while the slow consumer holds credit for all of it:
# one backlog in each direction plus proton's and the kernel's buffers, with room to spare;
# below the 24 MiB it would take to buffer the queue.
RSS_GROWTH_LIMIT = 20 * 1024 * 1024


def test_slow_consumer_does_not_cost_the_daemon_memory_or_stop_others(
    setup: dict[str, Any], report: Report
) -> None:
    daemon: Connector = setup["daemon"]
    assert daemon.proc is not None
    broker = setup["broker"]
    slow_end, *others = setup["ends"]
    queue = f"slow-{uuid.uuid4().hex[:6]}"
    with broker.connection() as conn:
        snd = conn.create_sender(queue)
        for i in range(SLOW_MESSAGES):
            snd.send(Message(body=bytes(SLOW_SIZE), properties={"n": i}))
    rss0 = rss_bytes(daemon.proc.pid)
    slow = GuestClient(slow_end.fd(), container_id="slow", timeout=30)
    rcv = slow.driver.create_receiver(slow.connection, queue)
    rcv.flow(SLOW_MESSAGES)
    # Run the guest's side until its attach and credit are out, then never read again.
    end = time.monotonic() + 30
    while not rcv.state & Endpoint.REMOTE_ACTIVE and time.monotonic() < end:
        slow.driver.process(0.1)
    assert rcv.state & Endpoint.REMOTE_ACTIVE

    def stalled() -> int | None:
        """deliveries_out once it has stopped growing (the daemon stopped reading)."""
        first = daemon.channel(slow_end.guest)["deliveries_out"]
        time.sleep(0.5)  # sampling a counter twice, not synchronising
        second = daemon.channel(slow_end.guest)["deliveries_out"]
        return second if second == first and second > 0 else None

    routed = wait_for(stalled, 60, "the slow consumer's deliveries to stop growing")
    fleet = Fleet(others, TOTAL, _prefix()).start(FLEET_TIMEOUT)
    counts = _finish(
        fleet,
        broker,
        report,
        "a guest stops reading (slow consumer) with credit for 24 MiB",
        f"{routed} of {SLOW_MESSAGES} routed before the daemon stopped reading the broker",
    )
    growth = rss_bytes(daemon.proc.pid) - rss0
    report.rows[-1].connector_did += f"; daemon RSS grew {growth / 2**20:.1f} MiB"
    assert routed < SLOW_MESSAGES
    assert growth < RSS_GROWTH_LIMIT, growth
    assert all(g.ledger.done for g in fleet.guests), counts
    slow_end.hang_up()


# Links the attach flooder asks for in one go: far past attach_burst (100) and max_links (256).
ATTACH_FLOOD = 2000


def test_attach_flood_is_cut_off_while_others_go_on(setup: dict[str, Any], report: Report) -> None:
    daemon: Connector = setup["daemon"]
    flood_end, *others = setup["ends"]
    fleet = Fleet(others, TOTAL, _prefix()).start(FLEET_TIMEOUT)
    flooder = GuestClient(flood_end.fd(), container_id="flooder", timeout=30)
    conn = flooder.connection
    ssn = conn.session()
    ssn.open()
    links = []
    for i in range(ATTACH_FLOOD):
        link = ssn.receiver(f"flood-{i}")
        link.source.address = f"flood-{i}"
        link.open()
        links.append(link)
    end = time.monotonic() + 30
    while not conn.state & Endpoint.REMOTE_CLOSED and time.monotonic() < end:
        if not flooder.driver.process(0.1):
            break
    cond = conn.remote_condition
    attached = sum(1 for link in links if link.state & Endpoint.REMOTE_ACTIVE)
    flooder.close()
    ch = daemon.wait_state(flood_end.guest, "waiting")
    counts = _finish(
        fleet,
        setup["broker"],
        report,
        f"a guest attaches {ATTACH_FLOOD} links at once",
        f"flooder closed with {cond.name if cond else None} after {attached} attaches "
        f"(channel errors {ch['detail']['errors_by_condition']}); others went on",
    )
    assert cond is not None and cond.name == "amqp:resource-limit-exceeded", ch
    assert all(g.ledger.done for g in fleet.guests), counts


# Transfers the flooder writes at once: five times the credit Artemis grants (1000).
TRANSFER_FLOOD = 5000


def test_transfer_flood_is_cut_off_while_others_go_on(
    setup: dict[str, Any], report: Report
) -> None:
    """A guest that sends transfers it has no credit for."""
    daemon: Connector = setup["daemon"]
    flood_end, *others = setup["ends"]
    fleet = Fleet(others, TOTAL, _prefix()).start(FLEET_TIMEOUT)
    queue = f"tflood-{uuid.uuid4().hex[:6]}"
    fd = flood_end.fd()
    flood_end.write_raw(amqp.handshake() + amqp.attach_frame("f", 0, sender=True, address=queue))
    # Wait for the daemon's attach (the broker answered, credit follows), then ignore credit.
    assert amqp.ATTACH_DESCRIPTOR in harness.read_until(fd, amqp.ATTACH_DESCRIPTOR)
    flood_end.write_raw(b"".join(amqp.transfer_frame(0, i) for i in range(TRANSFER_FLOOD)))
    ch = wait_for(
        lambda: (
            (c := daemon.channel(flood_end.guest))["state"] == "waiting" and c["last_error"] and c
        ),
        30,
        "the flooder to be cut off",
    )
    counts = _finish(
        fleet,
        setup["broker"],
        report,
        f"a guest sends {TRANSFER_FLOOD} transfers, ignoring credit",
        f"flooder cut off: last_error `{ch['last_error']}`, {ch['deliveries_in']} "
        "deliveries routed; others went on",
    )
    assert "amqp:" in ch["last_error"], ch
    assert all(g.ledger.done for g in fleet.guests), counts


# Guest connections in the churn test, after a warm-up of CHURN_WARMUP: each one opens,
# sends one message, and closes, as a guest agent that reconnects for every report would.
CHURN = 400
CHURN_WARMUP = 50
# What the daemon's RSS may grow by over CHURN connections: a leak of even 10 KiB per
# connection (a proton transport and connection) would show as 4 MiB.
CHURN_RSS_LIMIT = 2 * 1024 * 1024


def test_connection_churn_leaks_nothing(setup: dict[str, Any], report: Report) -> None:
    daemon: Connector = setup["daemon"]
    assert daemon.proc is not None
    end = setup["ends"][1]
    ledger = harness.Ledger(end.guest, f"churn-{uuid.uuid4().hex[:6]}", CHURN_WARMUP + CHURN)

    def connections(numbers: range) -> None:
        fd = end.fd()
        for n in numbers:
            with GuestClient(fd, container_id=f"churn-{n}", timeout=30) as guest:
                ledger.sent += 1
                if guest.send(ledger.queue, [Message(body=n, durable=True)])[0].state == "accepted":
                    ledger.accepted.add(n)
            ledger.connections += 1

    connections(range(CHURN_WARMUP))
    rss0 = rss_bytes(daemon.proc.pid)
    connections(range(CHURN_WARMUP, CHURN_WARMUP + CHURN))
    growth = rss_bytes(daemon.proc.pid) - rss0
    harness.drain_broker(setup["broker"], [ledger])
    counts = harness.check([ledger])
    report.add(
        f"{CHURN_WARMUP + CHURN} guest connections one after another on one channel",
        f"daemon RSS grew {growth / 2**10:.0f} KiB over the last {CHURN}",
        **{k: counts[k] for k in ("sent", "accepted", "received", "lost", "duplicated")},
    )
    assert counts["accepted"] == CHURN_WARMUP + CHURN
    assert growth < CHURN_RSS_LIMIT, growth


# The daemon's idle timeout in the mid-frame test: how long a channel whose guest died in
# the middle of a frame stays stuck, so kept short here (the default is 60 s).
STUCK_IDLE_S = 2.0
# How often the next guest retries, and how long each attempt waits for the open.
RETRY_EVERY_S = 0.5


@pytest.mark.parametrize(
    ("violation", "frame_size"),
    [
        pytest.param(False, 1000, id="open-1kB-frame"),
        pytest.param(True, 1000, id="after-violation"),
        pytest.param(False, 65536, id="open-64KiB-frame"),
    ],
)
def test_guest_app_dies_mid_frame_then_the_next_one_connects(
    artemis: Any, tmp_path: Path, report: Report, violation: bool, frame_size: int
) -> None:
    """The guest's client dies in the middle of a frame (the host sees no port close), and a
    new client opens the port. Its header lands inside the dead client's unfinished frame,
    so the daemon cannot see it; the channel is stuck until the connection's idle timeout
    (or, after a violation, the close timeout) ends it, and the new client's retries get
    through after that. The test measures how long that takes."""
    conf = tmp_path / "connector.toml"
    conf.write_text(f"[limits]\nidle_timeout_s = {STUCK_IDLE_S}\n")
    end = ChannelEnd("unix", tmp_path, "mid")
    daemon = Connector(tmp_path, artemis, [end], "--config", str(conf)).start()
    try:
        fd = end.fd()
        queue = f"mid-{uuid.uuid4().hex[:6]}"
        stream = amqp.handshake() + amqp.attach_frame("m", 0, sender=True, address=queue)
        end.write_raw(stream)
        assert amqp.ATTACH_DESCRIPTOR in harness.read_until(fd, amqp.ATTACH_DESCRIPTOR)
        if violation:  # a second open: the daemon ends the connection (illegal-state)
            end.write_raw(amqp.open_frame())
            assert b"amqp:illegal-state" in harness.read_until(fd, b"amqp:illegal-state")
        end.write_raw(amqp.frame(bytes(frame_size - 8))[:100])  # 100 bytes of it, then death
        try:
            attempts, took = harness.send_one_retrying(
                fd, queue, every=RETRY_EVERY_S, patience=STUCK_IDLE_S + 10
            )
        except GuestClientError:
            report.add(
                f"guest client dies in a {frame_size}-byte frame; a new client retries",
                f"BUG: channel still stuck after {STUCK_IDLE_S + 10:g} s of retries",
            )
            raise
        ch = daemon.channel("mid")
    finally:
        daemon.stop()
        end.hang_up()
    what = "after a violation" if violation else "with its connection open"
    report.add(
        f"guest client dies in a {frame_size}-byte frame {what}; a new client retries every "
        f"{RETRY_EVERY_S:g} s (idle_timeout_s={STUCK_IDLE_S:g})",
        f"new client routed after {took:.1f} s and {attempts} attempts; "
        f"last_error `{ch['last_error']}`",
    )
