"""Bad input from a guest, case by case: the AMQP condition the guest sees, or that it is
harmless, through the routing core (where only proton and the router matter).

The cases that need the channel layer (wrong protocols, floods, timeouts) are in
test_bad_input_daemon.py, through the real daemon.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from cproton_ffi import lib
from proton import Condition, symbol, uint

from tests.reliability import amqp, rig
from tests.reliability.conftest import Report

FRAMING_ERROR = "amqp:connection:framing-error"
INVALID_FIELD = "amqp:invalid-field"
# A message payload: one data section holding "x".
PAYLOAD = b"\x00Sw\xa1\x01x"


@dataclass(frozen=True)
class Case:
    """A bad frame sent after a good header, open and begin."""

    name: str
    frame: bytes
    condition: str | None  # the error the guest must see; None: ignored, connection usable


CASES = [
    Case("frame larger than max-frame-size (200 kB)", amqp.frame(bytes(200_000)), FRAMING_ERROR),
    Case("frame size field below 8", b"\x00\x00\x00\x04\x02\x00\x00\x00", FRAMING_ERROR),
    Case("data offset below 2", b"\x00\x00\x00\x10\x01\x00\x00\x00" + bytes(8), FRAMING_ERROR),
    Case("begin on channel 500 (above channel-max)", amqp.begin_frame(500), FRAMING_ERROR),
    Case(
        "transfer on an unattached handle",
        amqp.frame(
            amqp.performative(
                amqp.TRANSFER, uint(5), uint(0), b"t", uint(0), False, payload=PAYLOAD
            )
        ),
        INVALID_FIELD,
    ),
    Case(
        "flow on an unattached handle",
        amqp.frame(
            amqp.performative(
                amqp.FLOW, uint(0), uint(100), uint(0), uint(100), uint(7), uint(0), uint(10)
            )
        ),
        INVALID_FIELD,
    ),
    Case(
        "detach of an unknown handle",
        amqp.frame(amqp.performative(amqp.DETACH, uint(9), True)),
        INVALID_FIELD,
    ),
    Case(
        "end on a channel with no session",
        amqp.frame(amqp.performative(amqp.END), channel=3),
        "amqp:not-allowed",
    ),
    Case(
        "disposition for a delivery that does not exist",
        amqp.frame(amqp.performative(amqp.DISPOSITION, False, uint(77), uint(99), True, None)),
        None,
    ),
    # Proton stops reading here without an error; Router.feed_guest turns that into one.
    Case(
        "unknown performative (descriptor 0x77)",
        amqp.frame(amqp.performative(amqp.UNKNOWN_PERFORMATIVE, "x")),
        FRAMING_ERROR,
    ),
    Case("a second open", amqp.open_frame(), "amqp:illegal-state"),
    Case("attach with a null name", amqp.null_name_attach(), INVALID_FIELD),
    Case(
        "SASL frame after the AMQP header",
        amqp.frame(amqp.performative(0x41, symbol("ANONYMOUS")), ftype=1),
        None,
    ),
]


def _handshaken() -> tuple[rig.FeedingHarness, rig.RawGuest]:
    h, guest = rig.raw_rig()
    rig.feed(h, amqp.handshake())
    assert not rig.outcome(h, guest).ended
    assert h.router.session_count() == 1
    return h, guest


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_frame(case: Case, report: Report) -> None:
    h, guest = _handshaken()
    rig.feed(h, case.frame)
    result = rig.outcome(h, guest)
    if case.condition is None:
        # Ignored: the connection is still open and still answers a close cleanly.
        assert not result.ended, result
        rig.feed(h, amqp.frame(amqp.performative(amqp.CLOSE)))
        result = rig.outcome(h, guest)
        assert result.ended and result.condition is None, result
        report.add(f"core: {case.name}", "ignored; connection still usable")
        return
    # Proton's own errors are transport conditions; the router's are on its close frame.
    cond = result.condition or result.close_condition
    assert cond is not None and cond[0] == case.condition, result
    # The guest is told: the close frame carries the condition.
    assert case.condition.encode() in result.reply
    # The upstream connection is closed too, and there was only ever one.
    assert h.broker.connection.state & h.broker.connection.REMOTE_CLOSED
    assert len(h.upstreams) == 1
    report.add(f"core: {case.name}", "guest closed with {}: {}".format(*cond))


def test_peer_max_frame_below_the_minimum_is_raised_to_512(report: Report) -> None:
    h, guest = rig.raw_rig()
    rig.feed(h, amqp.AMQP_HEADER + amqp.open_frame(max_frame=100) + amqp.begin_frame())
    result = rig.outcome(h, guest)
    assert not result.ended, result
    # Proton forces 512 (and says so on stderr); every frame it writes then fits in 512.
    assert h.router.guest.transport is not None
    assert lib.pn_transport_get_remote_max_frame(h.router.guest.transport) == 512
    report.add("core: open with max-frame-size 100", "treated as 512 (AMQP minimum)")


def test_truncated_stream_ends_at_the_idle_timeout(report: Report) -> None:
    h, guest = _handshaken()
    rig.feed(h, amqp.frame(bytes(100))[:20])
    assert not rig.outcome(h, guest).ended
    rig.expire_timers(h)
    result = rig.outcome(h, guest)
    assert result.condition == ("amqp:resource-limit-exceeded", "local-idle-timeout expired")
    report.add("core: stream stops mid-frame", "closed at idle timeout (resource-limit-exceeded)")


def test_the_guests_violation_stays_the_recorded_cause() -> None:
    h, _guest = _handshaken()
    h.router.violation("amqp:resource-limit-exceeded", "attaching faster than 50 links/s")
    h.pump()
    broker = h.broker.connection
    broker.condition = Condition("amqp:internal-error", "AMQ119027: Invalid Remote State: CLOSED")
    broker.close()
    h.pump()
    assert h.router.error is not None
    assert h.router.error[0] == "amqp:resource-limit-exceeded", h.router.error


def test_a_clean_close_is_not_recorded_as_an_error() -> None:
    conn_close = amqp.frame(amqp.performative(amqp.CLOSE))
    h, guest = _handshaken()
    rig.feed(h, conn_close)
    result = rig.outcome(h, guest)
    assert result.ended
    assert h.router.error is None and result.close_condition is None, h.router.error
