"""Bad input on a real channel, through the real daemon: what the guest sees, what the
channel's status and log say, and that the next well-behaved connection works.

One daemon on Artemis serves a pty and a unix channel (qemu's two chardev kinds); its open
timeout is shortened so the timeout cases finish quickly.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from proton import Timeout, uint

from connector.guest.client import AmqpError, GuestClient
from connector.guest.port import drain
from tests.reliability import amqp, harness
from tests.reliability.conftest import Report
from tests.reliability.procstat import cpu_seconds
from tests.support.connector import Connector, Qemu, wait_for

pytestmark = pytest.mark.broker

KINDS = ("pty", "unix")
# Short, so a guest that never opens is cut off within the test's patience.
OPEN_TIMEOUT_S = 2.0
# How long a guest waits for the daemon's answer to a bad input.
ANSWER_TIMEOUT = 10.0
CLIENT_TIMEOUT = 30.0
# A small message limit, so an oversize message is cheap to send.
MAX_MESSAGE = 1024 * 1024
# The heartbeat flood: empty frames per second, for how long.
FLOOD_RATE = 10_000
FLOOD_SECONDS = 1.0
# Daemon CPU a second of flood may cost: proton handles an empty frame in C, so a flood is
# harmless if it costs well under a core.
FLOOD_CPU_LIMIT_S = 0.5


@pytest.fixture(scope="module")
def daemon(artemis: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("badinput")
    conf = work / "connector.toml"
    conf.write_text(
        f"[limits]\nopen_timeout_s = {OPEN_TIMEOUT_S}\nmax_message_size = {MAX_MESSAGE}\n"
    )
    channels = {kind: Qemu(kind, work, f"bad-{kind}") for kind in KINDS}
    d = Connector(work, artemis, list(channels.values()), "--config", str(conf)).start()
    try:
        for kind in KINDS:
            channels[kind].fd()
            d.wait_state(f"bad-{kind}", "waiting")
        yield {"daemon": d, "channels": channels, "broker": artemis}
    finally:
        status = d.stop()
        for ch in channels.values():
            ch.hang_up()
        assert status == 0, d.log_text()[-4000:]


def _works(fd: int) -> None:
    """A well-behaved guest connection on the channel: one message there and back."""
    queue = f"after-bad-{uuid.uuid4().hex[:8]}"
    drain(fd, quiet=0.05)  # what a real guest does first: stale bytes are not ours
    with GuestClient(fd, container_id="good-after-bad", timeout=CLIENT_TIMEOUT) as guest:
        assert [o.state for o in guest.send(queue, ["ok"])] == ["accepted"]
        assert [m.body for m in guest.receive(queue, 1)] == ["ok"]


def _wait_error(d: Connector, guest: str, text: str) -> dict[str, Any]:
    """Wait until the channel is waiting again and its last_error mentions ``text``."""

    def seen() -> dict[str, Any] | None:
        ch = d.channel(guest)
        ok = ch["state"] == "waiting" and text in (ch["last_error"] or "")
        return ch if ok else None

    return wait_for(seen, ANSWER_TIMEOUT, f"{guest} waiting with last_error ~ {text!r}")


WRONG = [
    ("AMQP 0-10 header", amqp.AMQP_010_HEADER, "AMQP 0-10 header"),
    ("HTTP request", amqp.HTTP_REQUEST, "HTTP request"),
    ("TLS ClientHello", amqp.TLS_CLIENT_HELLO, "TLS ClientHello"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("what", "garbage", "named"), WRONG, ids=[w[0] for w in WRONG])
def test_wrong_protocol_is_discarded_named_and_a_valid_header_still_works(
    daemon: dict[str, Any], report: Report, kind: str, what: str, garbage: bytes, named: str
) -> None:
    d: Connector = daemon["daemon"]
    qemu: Qemu = daemon["channels"][kind]
    guest = f"bad-{kind}"
    before = d.channel(guest)["discarded_bytes"]
    qemu.write_raw(garbage)
    ch = wait_for(
        lambda: (c := d.channel(guest))["discarded_bytes"] == before + len(garbage) and c,
        ANSWER_TIMEOUT,
        f"{len(garbage)} discarded bytes",
    )
    assert named in (ch["last_error"] or ""), ch
    assert ch["state"] == "waiting"
    assert any(
        f"guest {guest}/" in line and " sent " in line and named in line
        for line in d.log_text().splitlines()
    ), "no log line names the guest and what it sent"
    _works(qemu.fd())
    report.add(
        f"daemon/{kind}: {what} instead of the AMQP header",
        f"{len(garbage)} bytes discarded and counted; last_error `{ch['last_error']}`; "
        "next valid header routed",
    )


def test_oversize_frame_is_a_framing_error_and_the_channel_recovers(
    daemon: dict[str, Any], report: Report
) -> None:
    d: Connector = daemon["daemon"]
    qemu: Qemu = daemon["channels"]["unix"]
    qemu.write_raw(amqp.handshake() + amqp.frame(bytes(200_000)))
    reply = harness.read_until(qemu.fd(), b"amqp:connection:framing-error")
    assert b"amqp:connection:framing-error" in reply
    ch = _wait_error(d, "bad-unix", "framing-error")
    _works(qemu.fd())
    report.add(
        "daemon/unix: 200 kB frame (max-frame-size 64 KiB)",
        f"guest closed with framing-error; last_error `{ch['last_error']}`; "
        f"{ch['discarded_bytes']} bytes discarded in all; next connection routed",
    )


def test_attach_with_a_null_name_ends_only_that_connection(
    daemon: dict[str, Any], report: Report
) -> None:
    d: Connector = daemon["daemon"]
    qemu: Qemu = daemon["channels"]["pty"]
    qemu.write_raw(amqp.handshake() + amqp.null_name_attach())
    reply = harness.read_until(qemu.fd(), b"amqp:invalid-field")
    assert b"amqp:invalid-field" in reply
    ch = _wait_error(d, "bad-pty", "amqp:invalid-field")
    _works(qemu.fd())
    _works(daemon["channels"]["unix"].fd())
    report.add(
        "daemon/pty: attach with a null name",
        f"guest closed with invalid-field; last_error `{ch['last_error']}`; "
        "channel and other guests unharmed",
    )


@pytest.mark.parametrize(
    ("what", "header"),
    [("SASL header, then silence", amqp.SASL_HEADER), ("AMQP header, no open", amqp.AMQP_HEADER)],
)
def test_guest_that_never_opens_is_cut_at_the_open_timeout(
    daemon: dict[str, Any], report: Report, what: str, header: bytes
) -> None:
    d: Connector = daemon["daemon"]
    qemu: Qemu = daemon["channels"]["unix"]
    start = time.monotonic()
    qemu.write_raw(header)
    ch = _wait_error(d, "bad-unix", f"no AMQP open within {OPEN_TIMEOUT_S:g}s")
    took = time.monotonic() - start
    assert OPEN_TIMEOUT_S * 0.9 <= took <= OPEN_TIMEOUT_S + 5, took
    # What the guest was told before the cut.
    told = harness.read_until(qemu.fd(), b"amqp:", timeout=0.5)
    _works(qemu.fd())
    report.add(
        f"daemon/unix: {what} (open_timeout_s={OPEN_TIMEOUT_S:g})",
        f"dropped after {took:.1f} s; last_error `{ch['last_error']}`; the guest got "
        f"{len(told)} bytes ({'a close' if b'amqp:' in told else 'no AMQP close'})",
    )


def test_heartbeat_flood_is_harmless(daemon: dict[str, Any], report: Report) -> None:
    """10,000 empty frames a second on an open connection: the connection goes on working
    and the daemon spends well under a core on them."""
    d: Connector = daemon["daemon"]
    assert d.proc is not None
    qemu: Qemu = daemon["channels"]["pty"]
    fd = qemu.fd()
    queue = f"flood-{uuid.uuid4().hex[:8]}"
    batch = 100
    interval = batch / FLOOD_RATE
    frames = int(FLOOD_RATE * FLOOD_SECONDS)
    drain(fd, quiet=0.05)
    with GuestClient(fd, container_id="flooder", timeout=CLIENT_TIMEOUT) as guest:
        guest.send(queue, ["before"])
        cpu0, t0 = cpu_seconds(d.proc.pid), time.monotonic()
        for i in range(frames // batch):
            # Whole frames only, between client calls: the daemon sees them between frames.
            os.write(fd, amqp.EMPTY_FRAME * batch)
            delay = t0 + (i + 1) * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the flood, not synchronising
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(d.proc.pid) - cpu0
        guest.send(queue, ["after"])
        assert [m.body for m in guest.receive(queue, 2)] == ["before", "after"]
    _works(daemon["channels"]["unix"].fd())
    assert cpu < FLOOD_CPU_LIMIT_S * max(elapsed, FLOOD_SECONDS), (cpu, elapsed)
    report.add(
        f"daemon/pty: {frames} empty frames in {elapsed:.2f} s",
        f"harmless: connection kept working; daemon CPU {cpu:.2f} s",
    )


# The daemon CPU a hostile open may cost over TINY_IDLE_SECONDS (seconds of CPU): far below
# a core, which a heartbeat every half millisecond would cost.
TINY_IDLE_CPU_LIMIT_S = 0.3
TINY_IDLE_SECONDS = 2.0


def test_tiny_idle_timeout_is_refused_and_costs_no_cpu(
    daemon: dict[str, Any], report: Report
) -> None:
    """A guest asking for a heartbeat every half millisecond (idle-time-out 1 ms) would make
    the daemon spin a core on the loop every guest shares; it is refused instead."""
    d: Connector = daemon["daemon"]
    assert d.proc is not None
    qemu: Qemu = daemon["channels"]["unix"]
    fd = qemu.fd()
    drain(fd, quiet=0.05)
    cpu0 = cpu_seconds(d.proc.pid)
    qemu.write_raw(
        amqp.AMQP_HEADER
        + amqp.frame(amqp.performative(amqp.OPEN, "tiny-idle", None, None, None, uint(1)))
    )
    told = harness.read_until(fd, b"never", timeout=TINY_IDLE_SECONDS)
    cpu = cpu_seconds(d.proc.pid) - cpu0
    ch = _wait_error(d, "bad-unix", "amqp:resource-limit-exceeded")
    assert b"amqp:resource-limit-exceeded" in told
    assert cpu < TINY_IDLE_CPU_LIMIT_S, cpu
    _works(fd)
    report.add(
        "daemon/unix: open with idle-time-out 1 ms",
        f"refused: guest closed with resource-limit-exceeded, last_error `{ch['last_error']}`; "
        f"daemon CPU {cpu:.2f} s over {TINY_IDLE_SECONDS:g} s",
    )


def test_guest_cut_at_the_open_timeout_is_told_why(daemon: dict[str, Any]) -> None:
    d: Connector = daemon["daemon"]
    qemu: Qemu = daemon["channels"]["unix"]
    fd = qemu.fd()
    drain(fd, quiet=0.05)
    qemu.write_raw(amqp.AMQP_HEADER)
    told = harness.read_until(fd, b"amqp:resource-limit-exceeded", timeout=OPEN_TIMEOUT_S + 3)
    _wait_error(d, "bad-unix", "no AMQP open")
    assert b"amqp:resource-limit-exceeded" in told
    _works(fd)


def test_oversize_message_is_refused_and_the_next_one_goes_through(
    daemon: dict[str, Any], report: Report
) -> None:
    d: Connector = daemon["daemon"]
    qemu: Qemu = daemon["channels"]["pty"]
    fd = qemu.fd()
    drain(fd, quiet=0.05)
    queue = f"big-{uuid.uuid4().hex[:8]}"
    with GuestClient(fd, container_id="big", timeout=CLIENT_TIMEOUT) as guest:
        with pytest.raises(AmqpError) as refused:
            guest.send(queue, [bytes(2 * MAX_MESSAGE)])
        assert refused.value.name == "amqp:link:message-size-exceeded", refused.value
    # The refused client stopped in the middle of its message's frames, so the next client
    # retries until the daemon has given up on the old connection (bug stuck-mid-frame).
    attempts, took = harness.send_one_retrying(fd, f"{queue}-next", every=1.0, patience=30)
    ch = d.channel("bad-pty")
    with daemon["broker"].connection() as conn:
        rcv = conn.create_receiver(queue)
        with pytest.raises(Timeout):
            rcv.receive(timeout=1.0)  # nothing of the oversize message reached the queue
    report.add(
        f"daemon/pty: a {2 * MAX_MESSAGE >> 20} MiB message (max_message_size 1 MiB)",
        f"refused with {refused.value.where} closed: {refused.value.name}; nothing on the "
        f"queue; last_error `{ch['last_error']}`; the next client got through after "
        f"{took:.1f} s and {attempts} attempts (the refused one died mid-frame)",
    )


# A pause inside a frame longer than the daemon's restart-detection silence (0.25 s).
MID_FRAME_PAUSE_S = 0.5


def test_a_message_body_that_starts_with_a_protocol_header_after_a_pause(
    daemon: dict[str, Any], report: Report
) -> None:
    """A slow guest (TCG guests are slow) pauses in the middle of a transfer, and the next
    write happens to begin with the bytes of an AMQP header: a message whose body is itself
    an AMQP capture. The message must still be routed and the connection stay up."""
    d: Connector = daemon["daemon"]
    qemu: Qemu = daemon["channels"]["unix"]
    fd = qemu.fd()
    drain(fd, quiet=0.05)
    queue = f"capture-{uuid.uuid4().hex[:8]}"
    qemu.write_raw(amqp.handshake() + amqp.attach_frame("cap", 0, sender=True, address=queue))
    assert amqp.FLOW_DESCRIPTOR in harness.read_until(fd, amqp.FLOW_DESCRIPTOR)
    body = amqp.AMQP_HEADER + bytes(100)
    frame = amqp.transfer_frame(0, 0, body)
    split = len(frame) - len(body)
    qemu.write_raw(frame[:split])
    time.sleep(MID_FRAME_PAUSE_S)  # the guest is slow: this pause is the input under test
    qemu.write_raw(frame[split:])
    told = harness.read_until(fd, amqp.DISPOSITION_DESCRIPTOR, timeout=3.0)
    routed = amqp.DISPOSITION_DESCRIPTOR in told
    qemu.write_raw(amqp.frame(amqp.performative(amqp.CLOSE)))
    ch = d.wait_state("bad-unix", "waiting")
    report.add(
        "daemon/unix: a transfer paused 0.5 s mid-frame, resuming with an AMQP header's bytes",
        ("message accepted, connection kept" if routed else "BUG: connection dropped as a "
         "restarted client; the message got no outcome")
        + f"; last_error `{ch['last_error']}`",
    )  # fmt: skip
    assert routed, told
