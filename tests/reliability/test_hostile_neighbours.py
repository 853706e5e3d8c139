"""One hostile guest and a quiet neighbour on the same daemon, against a real Artemis.

The daemon serves every guest on one asyncio loop, so whatever one guest makes it do
between two turns of that loop, every other guest waits for. ``READ_BATCH`` bounds the
bytes read from a guest per turn, ``FLOW_DECODES_PER_READ`` the flows looked at, and
``[limits]`` what a guest may hold; these tests look for frames that are cheap for a guest
to send and dear for the daemon to handle within those bounds.

Each test runs its own daemon with two unix channels: a quiet guest doing request/response
round trips (a message sent, its outcome awaited, then received back) and a hostile one.
The quiet guest's round trips are timed before and during the hostile guest's act, in the
same run, and compared: the machine is shared and small, so no absolute speed is asserted.
"""

from __future__ import annotations

import contextlib
import os
import select
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from proton import uint

from connector.guest.client import GuestClient
from connector.status.client import ControlClient
from tests.reliability.amqp import DISPOSITION, FLOW, frame, handshake, performative
from tests.reliability.harness import read_until
from tests.reliability.procstat import rss_bytes
from tests.reliability.test_hostile_guests import _inbox, _link, _until
from tests.support.connector import Connector, Qemu, serving, wait_for

pytestmark = pytest.mark.broker

TIMEOUT = 60.0
QUIET, HOSTILE = "n-quiet", "n-hostile"
# Round trips the quiet guest times before the hostile guest starts: its baseline.
BASELINE_TRIPS = 10
# How much slower the quiet guest's round trips may get while a neighbour misbehaves, and
# a floor for a baseline of a few milliseconds (scheduling noise on a shared 2-core host).
SLOWDOWN = 5.0
SLACK_S = 0.5
BEGIN_DESCRIPTOR = b"\x00S\x11"


@contextlib.contextmanager
def _neighbours(
    artemis: Any, tmp_path: Path, toml: str = ""
) -> Iterator[tuple[Connector, GuestClient, int]]:
    """A daemon of the test's own on ``artemis`` with the quiet and the hostile guest's
    unix channels; yields it, the quiet guest's client (connected) and the hostile
    guest's fd, which each test drives as its case needs."""
    conf = tmp_path / "connector.toml"
    conf.write_text(toml)
    channels = [Qemu("unix", tmp_path, QUIET), Qemu("unix", tmp_path, HOSTILE)]
    daemon = Connector(tmp_path, artemis, channels, "--config", str(conf))
    # The quiet guest's channel is connected to once the daemon has started.
    with (
        serving(daemon),
        GuestClient(channels[0].fd(), container_id="quiet", timeout=TIMEOUT) as quiet,
    ):
        yield daemon, quiet, channels[1].fd()


def _round_trip(guest: GuestClient, queue: str, n: int) -> float:
    """One request/response through the daemon and the broker: seconds it took."""
    start = time.monotonic()
    assert guest.send(queue, [n])[0].state == "accepted"
    assert guest.receive(queue, 1)[0].body == n
    return time.monotonic() - start


def _trips(guest: GuestClient, queue: str, more: Callable[[list[float]], bool]) -> list[float]:
    """Round trips for as long as ``more(trips so far)``."""
    trips: list[float] = []
    while more(trips):
        trips.append(_round_trip(guest, queue, len(trips)))
    return trips


def _snapshot_s(daemon: Connector) -> float:
    """How long the daemon takes to answer ``qpid-virtio-status``'s request."""
    start = time.monotonic()
    ControlClient(daemon.control, timeout=TIMEOUT).request("snapshot")
    return time.monotonic() - start


def _queue(stem: str) -> str:
    return f"neighbours-{stem}-{uuid.uuid4().hex[:8]}"


# ---- a disposition storm over deliveries the guest holds -----------------------------------

# Messages the hostile guest takes and holds unsettled: far below max_unsettled_per_link.
HELD = 1000
# Disposition frames it then writes in one go, each naming every delivery of its session.
STORM_FRAMES = 1000
# What the daemon may grow by for the storm: allocator noise. 1000 frames of 22 bytes
# naming 1000 deliveries each made it hold a million proton events (~150 MB).
STORM_GROWTH = 32 * 1024 * 1024


def _storm() -> bytes:
    """Dispositions from a receiver for delivery-ids 0 to 2^31-1 on channel 0, unsettled,
    with no state: they change nothing, and AMQP allows any number of them. Proton posts a
    PN_DELIVERY event for every delivery of the session in the range, for every frame."""
    one = frame(performative(DISPOSITION, True, uint(0), uint(2**31 - 1), False, None))
    return one * STORM_FRAMES


def test_a_disposition_storm_over_held_deliveries_stalls_no_neighbour(
    artemis: Any, tmp_path: Path
) -> None:
    """A guest takes 1000 messages and holds them unsettled (within its limits), then
    writes 1000 disposition frames of 22 bytes each, every one naming the whole range of
    delivery-ids and changing nothing. Proton posts one event per delivery held for each
    frame, all from one read, before the router sees any: a million events, which the
    daemon holds (proton keeps them pooled for the connection's life) and then handles one
    by one in Python while every other guest waited. The quiet guest's round trip during
    the storm must stay within a factor of its own baseline, and the daemon must not grow
    by more than allocator noise. Now the reader counts the deliveries a read's
    dispositions name, and past ``DISPOSITION_SPAN_PER_READ`` the read is not pushed and
    the guest is cut."""
    queue, rr = _queue("held"), _queue("rr")
    with _neighbours(artemis, tmp_path) as (daemon, quiet, fd):
        assert {o.state for o in quiet.send(queue, ["h"] * HELD)} == {"accepted"}
        baseline = _trips(quiet, rr, lambda t: len(t) < BASELINE_TRIPS)
        with GuestClient(fd, container_id="hoarder", timeout=TIMEOUT) as hoarder:
            # Its only link, so its only session: channel 0.
            rcv = _link(hoarder, queue, "hoard", sending=False)
            rcv.flow(HELD)
            _until(hoarder, lambda: len(_inbox(hoarder, rcv)) >= HELD, "the held messages", rcv)
            _until(hoarder, lambda: hoarder.driver.transport.pending() <= 0, "a frame boundary")
            pid = daemon.proc.pid
            before = rss_bytes(pid)
            os.write(fd, _storm())
            during = _trips(quiet, rr, lambda t: len(t) < 3)
            status_s = _snapshot_s(daemon)
            grown = rss_bytes(pid) - before
        # Well-formed, but naming more deliveries than any settling needs: the hoarder is
        # cut for it, its storm never pushed into proton.
        entry = wait_for(
            lambda: (e := daemon.channel(HOSTILE))["detail"]["errors"] and e,
            TIMEOUT,
            "the hoarder's connection to end",
        )
        error = entry["detail"]["errors"][-1]
        assert error["condition"] == "amqp:resource-limit-exceeded", error
        assert "dispositions" in error["description"], error
    limit = SLOWDOWN * max(baseline) + SLACK_S
    assert grown < STORM_GROWTH and max(during) < limit, (
        f"the daemon grew by {grown / 1e6:.0f} MB; the quiet guest's round trip took "
        f"{max(during):.2f}s during the storm (baseline max {max(baseline):.3f}s); the "
        f"status request then took {status_s:.2f}s"
    )


# ---- flows that ask for an echo and carry a large properties map ---------------------------

# How long the hostile guest floods.
FLOOD_S = 3.0
# Empty lists in one flow's properties: a frame just under the default max_frame_size
# (65536), which proton's C codec takes in well under a millisecond.
LIST0S = 65_000
ECHO = 9  # the flow field asking for an echo (AMQP 1.0 §2.7.4)


def _long_echo_flow() -> bytes:
    """A session flow on channel 0 asking for an echo (which proton ignores for a session
    flow) and carrying ``properties`` of one key whose value is a list of ``LIST0S``
    empty lists: legal, and one byte per element."""
    items = b"\x45" * LIST0S
    value = b"\xd0" + (len(items) + 4).to_bytes(4, "big") + LIST0S.to_bytes(4, "big") + items
    entry = b"\xa3\x01x" + value
    props = b"\xd1" + (len(entry) + 4).to_bytes(4, "big") + (2).to_bytes(4, "big") + entry
    head = performative(FLOW, uint(0), uint(100), uint(0), uint(100), None, None, None, None,
                        False, True)  # fmt: skip
    # The performative's list (list8 or list32), with the properties appended as its
    # eleventh field.
    fields = (head[6:] if head[3] == 0xC0 else head[12:]) + props
    body = head[:3] + b"\xd0" + (len(fields) + 4).to_bytes(4, "big") + (11).to_bytes(4, "big")
    return frame(body + fields)


def _flood(fd: int, chunk: bytes, stop: threading.Event, errors: list[BaseException]) -> None:
    """Write ``chunk`` again and again until ``stop``, reading and dropping whatever the
    daemon writes back (so its answers never fill the port)."""
    try:
        while not stop.is_set():
            readable, writable, _ = select.select([fd], [fd], [], 0.1)
            if readable and not os.read(fd, 1 << 16):
                raise AssertionError("the daemon hung up on the hostile guest")
            if writable:
                os.write(fd, chunk)
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def test_long_echo_flows_do_not_slow_a_neighbour(artemis: Any, tmp_path: Path) -> None:
    """A guest opens a session and then writes nothing but session flows that ask for an
    echo, each carrying 64 KB of properties: 65,000 empty lists. Proton's C codec takes
    such a frame in under a millisecond, and ignores the echo of a session flow; but the
    frame reader decodes every flow asking for an echo into Python objects
    (``FrameReader._keep``: ``decode``), up to ``FLOW_DECODES_PER_READ`` a read, and a
    read of ``READ_BATCH`` holds four of them. The quiet guest's round trips during the
    flood must stay within a factor of its baseline, and so must the status request."""
    rr = _queue("rr")
    flow = _long_echo_flow()
    with _neighbours(artemis, tmp_path) as (daemon, quiet, fd):
        baseline = _trips(quiet, rr, lambda t: len(t) < BASELINE_TRIPS)
        status_before = _snapshot_s(daemon)
        os.write(fd, handshake())
        read_until(fd, BEGIN_DESCRIPTOR)
        stop = threading.Event()
        errors: list[BaseException] = []
        flooder = threading.Thread(target=_flood, args=(fd, flow * 4, stop, errors), daemon=True)
        flooder.start()
        try:
            started = time.monotonic()
            during = _trips(quiet, rr, lambda t: time.monotonic() - started < FLOOD_S)
            status_during = _snapshot_s(daemon)
        finally:
            stop.set()
            flooder.join(TIMEOUT)
        assert not errors, errors
        hostile = daemon.channel(HOSTILE)
    # The flood was well-formed: the daemon kept the hostile guest's connection.
    assert hostile["state"] == "connected" and hostile["last_error"] is None, hostile
    typical = statistics.median(during)
    limit = SLOWDOWN * statistics.median(baseline) + SLACK_S / 5
    assert typical < limit, (
        f"median round trip {typical:.3f}s during the flood ({len(during)} trips), "
        f"baseline {statistics.median(baseline):.3f}s; status {status_during:.2f}s "
        f"(before {status_before:.3f}s)"
    )
