"""The broker side of the connector against an unlucky production broker, with real brokers.

Where test_hostile_routing.py and test_hostile_guests.py make the guest the hostile party,
here it is the broker: one that wants a frame more often than the guest sends one, one that
is frozen, killed and restarted under guests that reconnect, one that offers no login
mechanism we allow.
Each test checks what the guest is told, that nothing is acknowledged the broker did not
take, and what ``qpid-virtio-status`` shows afterwards.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proton import Connection, Endpoint, Message, Transport

from connector.guest.client import AmqpError, GuestClient
from connector.guest.port import drain
from tests.brokers import Artemis
from tests.reliability import harness
from tests.reliability.conftest import Report
from tests.reliability.harness import ChannelEnd, Fleet, read_until
from tests.reliability.procstat import cpu_seconds
from tests.support.connector import Connector, Qemu, wait_for

pytestmark = pytest.mark.broker

TIMEOUT = 30.0
# The strict broker wants a frame every STRICT_IDLE_MS (it advertises half of it, as proton
# does); a guest connection that stays quiet for a few of those must keep its upstream.
STRICT_IDLE_MS = 2000
QUIET_S = 3 * STRICT_IDLE_MS / 1000


@pytest.fixture(scope="module")
def strict_artemis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Artemis]:
    """A second Artemis whose acceptor closes a connection silent for STRICT_IDLE_MS
    (``amqpIdleTimeout``): the suite's Artemis waits 30 s, too long for a test."""
    broker = Artemis(tmp_path_factory.mktemp("strict-artemis"))
    xml = broker.instance / "etc" / "broker.xml"
    text = xml.read_text()
    assert "amqpCredits=" in text
    xml.write_text(text.replace("amqpCredits=", f"amqpIdleTimeout={STRICT_IDLE_MS};amqpCredits="))
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


def _quiet(guest: GuestClient, seconds: float) -> None:
    """Serve the guest's connection without sending anything for ``seconds``: the silence is
    what is under test, and a close from the connector meanwhile is read and kept."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        guest.driver.process(left)


def _daemon(broker: Any, workdir: Path, guests: list[Qemu], *extra: str) -> Connector:
    return Connector(workdir, broker, guests, *extra).start()


def test_a_quiet_guest_keeps_its_upstream_past_the_brokers_idle_timeout(
    strict_artemis: Artemis, tmp_path: Path
) -> None:
    """A guest that asked for no heartbeats sends nothing for three of the broker's idle
    timeouts. The connector owes the broker a frame every half of its advertised timeout,
    whatever the guest does: the broker must not cut the connection, and the guest's next
    message must go through on the same upstream."""
    qemu = Qemu("unix", tmp_path, "quiet")
    daemon = _daemon(strict_artemis, tmp_path, [qemu])
    try:
        guest = GuestClient(qemu.fd(), container_id="quiet", timeout=TIMEOUT, idle_timeout=None)
        assert guest.send("quiet.q", ["before"])[0].state == "accepted"
        _quiet(guest, QUIET_S)
        assert guest.send("quiet.q", ["after"])[0].state == "accepted"
        entry = daemon.channel("quiet")
        assert entry["detail"]["guest_connections"] == 1
        assert entry["last_error"] is None, entry["detail"]["errors"]
        assert [m.body for m in guest.receive("quiet.q", 2)] == ["before", "after"]
        guest.close()
    finally:
        assert daemon.stop() == 0
        qemu.hang_up()


# -- authentication ------------------------------------------------------------------------------


def test_a_broker_offering_no_mechanism_we_allow_is_named_at_once(
    artemis: Artemis, tmp_path: Path
) -> None:
    """The connector may use only GSSAPI; Artemis offers PLAIN and ANONYMOUS. Proton's SASL
    client gives up as it writes, so the failure is known at once: the guest (which asked
    for no heartbeats, so nothing else wakes its channel) must be told that authentication
    failed at that broker, not, ten seconds on, that the broker never answered."""
    conf = tmp_path / "connector.toml"
    conf.write_text('[broker]\nsasl_mechanisms = "GSSAPI"\n')
    qemu = Qemu("unix", tmp_path, "nomech")
    daemon = _daemon(artemis, tmp_path, [qemu], "--config", str(conf))
    try:
        with pytest.raises(AmqpError) as told:
            GuestClient(qemu.fd(), container_id="nomech", timeout=TIMEOUT, idle_timeout=None)
        err = told.value
        assert err.name == "amqp:connection:forced"
        assert f"no AMQP open from {artemis.url}" in (err.description or ""), err.description
        assert "amqp:unauthorized-access" in (err.description or ""), err.description
    finally:
        assert daemon.stop() == 0
        qemu.hang_up()


# -- a broker frozen ---------------------------------------------------------------------------

FROZEN_IDLE_S = 2  # [broker] idle_timeout_s: how long the connector waits on a silent broker
HUGE = 20 * 1024 * 1024


def test_a_frozen_broker_is_named_and_the_next_connection_works(
    artemis: Artemis, tmp_path: Path, report: Report
) -> None:
    """Artemis is SIGSTOPped under a guest that then sends a 20 MB message: the broker's
    sockets stay open and nothing answers, so the connector soon stops reading the guest
    (backpressure). Past the connector's broker idle timeout the guest is forced off and
    told which broker went silent (not proton's 'local-idle-timeout expired', which reads
    as the guest's own silence), the message is not reported accepted, and once the
    broker is resumed the guest's next connection on the channel works."""
    conf = tmp_path / "connector.toml"
    conf.write_text(f"[broker]\nidle_timeout_s = {FROZEN_IDLE_S}\n")
    qemu = Qemu("unix", tmp_path, "frozen")
    daemon = _daemon(artemis, tmp_path, [qemu], "--config", str(conf))
    queue = f"frozen-{uuid.uuid4().hex[:6]}"
    try:
        guest = GuestClient(qemu.fd(), container_id="frozen", timeout=TIMEOUT)
        assert guest.send(queue, ["before"])[0].state == "accepted"
        assert daemon.proc is not None
        cpu = cpu_seconds(daemon.proc.pid)
        artemis.pause()
        try:
            with pytest.raises(AmqpError) as told:
                guest.send(queue, [Message(body=b"\x5a" * HUGE)])
            cpu_frozen = cpu_seconds(daemon.proc.pid) - cpu
        finally:
            artemis.resume()
        guest.driver.close_fd()  # the guest's client gives up; the next one comes
        qemu.detach_fd()
        with GuestClient(qemu.fd(TIMEOUT), container_id="frozen", timeout=TIMEOUT) as again:
            assert again.send(queue, ["after"])[0].state == "accepted"
            bodies = [m.body for m in again.receive(queue, 3, drain=True)]
        err = told.value
        report.add(
            "Artemis SIGSTOPped under a guest sending 20 MB, then resumed",
            f"guest told {err.name}: {err.description}; daemon CPU {cpu_frozen:.2f} s while "
            f"frozen; next connection routed; on the queue {[str(b)[:12] for b in bodies]}",
        )
        assert err.name == "amqp:connection:forced"
        assert artemis.url in (err.description or ""), err.description
        assert "local-idle-timeout" not in (err.description or ""), err.description
        assert bodies[0] == "before" and bodies[-1] == "after"
    finally:
        assert daemon.stop() == 0
        qemu.hang_up()


# -- a broker killed under many guests ---------------------------------------------------------

FLEET = 16  # guests, each on its own unix channel (qemu server=on)
FLEET_TOTAL = 60  # numbered durable messages per guest
FLEET_TIMEOUT = 120.0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _closed_by_peer(guest: GuestClient) -> tuple[str | None, str | None]:
    """Serve a quiet guest's connection until the connector closes it; its condition."""
    conn = guest.connection
    end = time.monotonic() + TIMEOUT
    while not conn.state & Endpoint.REMOTE_CLOSED and time.monotonic() < end:
        guest.driver.process(end - time.monotonic())
    assert conn.state & Endpoint.REMOTE_CLOSED, "the connector never closed the guest"
    cond = conn.remote_condition
    return (cond.name, cond.description) if cond else (None, None)


def _unheard(qemu: Qemu, name: str) -> GuestClient:
    """A guest client that the test leaves alone for a while: it asks for no heartbeats."""
    return GuestClient(qemu.fd(), container_id=name, timeout=TIMEOUT, idle_timeout=None)


def test_many_guests_come_back_after_a_broker_kill(
    artemis: Artemis, tmp_path: Path, report: Report
) -> None:
    """16 guests stream both ways when Artemis is SIGKILLed; they retry while it is down
    (every URL refused) and reconnect when it is back. Nothing a guest saw accepted is lost,
    each channel's counters say what happened, and the daemon holds no more descriptors,
    upstreams or lingering connections than before.

    A 17th guest is quiet when the broker dies, so its upstream reads the end of stream
    (the busy ones mostly read a reset): it must be told, as for every other upstream
    failure, which broker hung up, not proton's framing-error."""
    ends = [ChannelEnd("unix", tmp_path, f"many-{i}") for i in range(FLEET)]
    quiet = Qemu("unix", tmp_path, "many-quiet")
    conf = tmp_path / "connector.toml"
    conf.write_text("[limits]\nidle_timeout_s = 600\n")  # the quiet one is not served
    daemon = Connector(tmp_path, artemis, [*ends, quiet], "--config", str(conf)).start()
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        fds_before = _fds(pid)
        idle = _unheard(quiet, "many-quiet")
        assert idle.send("many-quiet", ["one"])[0].state == "accepted"
        fleet = Fleet(ends, FLEET_TOTAL, f"many-{uuid.uuid4().hex[:6]}").start(FLEET_TIMEOUT)
        fleet.wait_accepted(0.3, FLEET_TIMEOUT)
        # Hit: guests whose connection is open as the broker dies and who still have work
        # then. One that is between connections (closing one after a client-side timeout,
        # say) has no connection to be told about, and a broker that hangs up on our close
        # is no failure. "Still have work" is read after the kill: a guest read as busy
        # before it may finish and close cleanly in the moment before the kill.
        before = daemon.snapshot() or {"channels": []}
        connected = {c["guest"] for c in before["channels"] if c["state"] == "connected"}
        cpu = cpu_seconds(pid)
        artemis.kill()
        hit = {g.end.guest for g in fleet.guests if not g.ledger.done} & connected
        down = time.monotonic()
        artemis.start()
        outage = time.monotonic() - down
        cpu_down = cpu_seconds(pid) - cpu
        fleet.join(FLEET_TIMEOUT)
        ledgers = [g.ledger for g in fleet.guests]
        harness.drain_broker(artemis, ledgers)
        counts = harness.check(ledgers)
        assert all(g.ledger.done for g in fleet.guests), counts
        told = _closed_by_peer(idle)
        idle.close()
        snap = wait_for(
            lambda: (
                (s := daemon.snapshot())
                and all(c["state"] == "waiting" and c["upstream"] is None for c in s["channels"])
                and s
            ),
            TIMEOUT,
            "every guest connection and upstream to end",
        )
        for entry in snap["channels"]:
            if entry["guest"] in hit:
                detail = entry["detail"]
                assert detail["errors_by_condition"].get("amqp:connection:forced"), entry
                assert detail["upstream_reconnects"] >= 1, entry
        wait_for(lambda: _fds(pid) <= fds_before, TIMEOUT, "the daemon's descriptors")
        report.add(
            f"Artemis SIGKILLed under {FLEET} guests and restarted",
            f"{outage:.1f} s outage; daemon CPU {cpu_down:.2f} s meanwhile; "
            f"{counts['connections']} guest connections; guest errors {counts['errors']}; "
            f"daemon fds back to {_fds(pid)} (from {fds_before}); a quiet guest was told {told}",
            **{k: counts[k] for k in ("sent", "accepted", "received", "lost", "duplicated")},
        )
        assert told[0] == "amqp:connection:forced", told
        assert artemis.url in (told[1] or "") and "framing-error" not in (told[1] or ""), told
    finally:
        if not artemis.running():
            artemis.start()
        daemon.stop()
        for end in [*ends, quiet]:
            end.hang_up()


# -- a guest that stops reading while its broker streams to it --------------------------------

STREAMED = 60  # messages of 64 KiB on the queue: far more than a unix socket buffers
SPIN_CPU_S = 0.5  # daemon CPU over the second the guest then reads: a spin takes the second


def test_a_guest_that_stops_reading_and_falls_silent_is_cut_and_costs_nothing_after(
    artemis: Artemis, tmp_path: Path, report: Report
) -> None:
    """The broker streams 3.75 MiB to a guest that granted credit for it, then reads and
    sends nothing more: the port fills. At the connector's idle timeout of the guest the
    connection must end within the close timeout, though its close cannot be written: the
    upstream is closed and the broker gets every message back. When the guest reads its
    port again the connector has nothing to write and spends no CPU, and the guest's next
    client receives all the messages."""
    queue = f"stops-reading-{uuid.uuid4().hex[:6]}"
    with artemis.connection() as direct:
        snd = direct.create_sender(queue)
        for i in range(STREAMED):
            snd.send(Message(body=f"{i:04d}".encode() * (16 * 1024)))
    conf = tmp_path / "connector.toml"
    conf.write_text("[limits]\nidle_timeout_s = 1\n")
    qemu = Qemu("unix", tmp_path, "stops")
    daemon = _daemon(artemis, tmp_path, [qemu], "--config", str(conf))
    try:
        assert daemon.proc is not None
        guest = _unheard(qemu, "stops")
        assert len(guest.receive(queue, 1, outcome="none")) == 1
        rcv = guest._receivers[queue]
        rcv.flow(STREAMED - 1)
        while guest.driver.transport.pending() > 0:  # the flow goes out; then nothing
            guest.driver.process(0.1)
        entry = daemon.wait_state("stops", "waiting", TIMEOUT)
        assert entry["upstream"] is None
        fd = qemu.fd()
        cpu = cpu_seconds(daemon.proc.pid)
        drained = drain(fd, quiet=1.0)  # the guest reads its port again, a second at least
        spent = cpu_seconds(daemon.proc.pid) - cpu
        guest.driver.close_fd()
        qemu.detach_fd()
        with GuestClient(qemu.fd(TIMEOUT), container_id="stops", timeout=TIMEOUT) as again:
            bodies = [bytes(m.body)[:4] for m in again.receive(queue, STREAMED)]
        report.add(
            "a guest stops reading with 3.75 MiB coming, then falls silent",
            f"cut: {entry['last_error']}; {drained} bytes then read from its port; daemon CPU "
            f"{spent:.2f} s meanwhile; the next client got all {len(bodies)} messages",
        )
        assert "idle" in (entry["last_error"] or ""), entry["last_error"]
        assert spent < SPIN_CPU_S, f"{spent:.2f} s of CPU while the guest only read"
        assert sorted(bodies) == [f"{i:04d}".encode() for i in range(STREAMED)]
    finally:
        assert daemon.stop() == 0
        qemu.hang_up()


# -- a new client inside the old connection's stream -------------------------------------------


def test_a_client_that_replaces_one_between_frames_reads_its_own_header_first(
    artemis: Artemis, tmp_path: Path
) -> None:
    """A guest's client dies between frames and the next one writes its header and open at
    once: the old connection takes that header for a frame and fails, and the connector
    starts the new connection from the header. The old connection's close is for a client
    that is gone: the new client must read the new connection's header first (its proton
    fails on anything else), and the connection must work."""
    qemu = Qemu("unix", tmp_path, "resync")
    daemon = _daemon(artemis, tmp_path, [qemu])
    try:
        fd = qemu.fd()
        _unheard(qemu, "resync-old")  # opened, then it dies between frames
        transport = Transport()
        conn = Connection()
        conn.container = "resync-new"
        transport.bind(conn)
        conn.open()
        os.write(fd, transport.peek(transport.pending()))
        got = read_until(fd, b"AMQP\x00\x01\x00\x00")
        assert got[:8] == b"AMQP\x00\x01\x00\x00", got[:32]
        assert "new protocol header inside the old connection" in daemon.log_text()
    finally:
        assert daemon.stop() == 0
        qemu.hang_up()
