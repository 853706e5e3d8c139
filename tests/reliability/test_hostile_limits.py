"""Limits crossing a guest's other frames, against the real daemon and a real Artemis.

tests/unit/test_router_limits_crossings.py shows in the harness which links ``max_links``
does not count. Here the same guests go through the daemon, and what is measured is what
the limit is for: the daemon's memory (its RSS, from /proc), which one guest must not be
able to grow without bound. One more crosses a refusal with a redirect the daemon
follows, through a real Artemis connection router (the ``redirecting`` fixture).
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import termios
import time
from pathlib import Path
from typing import Any

import pytest
from cproton_ffi import lib
from proton import uint

from connector.routing.engine import Engine, read_condition
from tests.brokers.artemis import RedirectingArtemis
from tests.reliability.amqp import (
    AMQP_HEADER,
    DETACH,
    END,
    OPEN,
    attach_frame,
    begin_frame,
    frame,
    performative,
)
from tests.reliability.harness import read_until
from tests.reliability.procstat import cpu_seconds, rss_bytes
from tests.reliability.test_hostile_guests import _own_daemon
from tests.reliability.test_hostile_redirect_reload import TIMEOUT, _pump, _sender
from tests.support.connector import Connector, Qemu, serving, wait_for

pytestmark = pytest.mark.broker

# Attaches a guest makes here: far more than the links it may hold. The attach rate is
# lifted so that the test takes seconds; at the default 50/s the same takes seven minutes,
# and a guest has all the time it likes.
ATTACHES = 20_000
BATCH = 500
MAX_LINKS = 8
LIMITS = (
    "[policy.default]\naddresses = ['hl-ok.#']\n"
    f"[limits]\nmax_links = {MAX_LINKS}\nattach_rate = 1e9\nattach_burst = 1000000000\n"
)
# What a daemon may grow by while it holds no more than MAX_LINKS links for the guest:
# allocator noise. 20,000 links held cost it several times this.
GROWTH = 16 * 1024 * 1024
ANSWER_TIMEOUT = 60.0
# Batches of attaches whose CPU cost is compared, the second and the last.
CPU_BATCH = 1000
CPU_BATCHES = 4
# Below this much CPU a batch's cost is mostly the clock's tick (10 ms).
MIN_COST = 0.1
# A daemon that takes none of the guest's bytes for this long has stopped reading it.
STALLED = 2.0
BEGIN_DESCRIPTOR = b"\x00S\x11"
CLOSE_DESCRIPTOR = b"\x00S\x18"


def _drain(fd: int) -> bool:
    """Read and drop whatever the daemon has written to the guest by now; whether that
    held our close of the guest's connection."""
    got = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise AssertionError("the daemon hung up on the guest")
        got = got[-len(CLOSE_DESCRIPTOR) :] + chunk
        if CLOSE_DESCRIPTOR in got:
            return True
    return False


def _answered(fd: int, name: bytes) -> None:
    """Read until the daemon has answered the attach of ``name`` or closed the guest's
    connection: it has then taken in every attach before it."""
    got = b""
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while name not in got and CLOSE_DESCRIPTOR not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no answer to {name!r} in {ANSWER_TIMEOUT}s"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 1 << 16)
            assert chunk, "the daemon hung up on the guest"
            got = got[-len(name) :] + chunk


def _unread_by_the_daemon(fd: int) -> int:
    """Bytes the guest wrote to its unix socket that the daemon has not read yet."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def _written(fd: int, data: bytes) -> bool:
    """Write all of ``data``; False if the daemon takes none of it for a while (it stopped
    reading the guest), leaving the rest unwritten."""
    view = memoryview(data)
    while view:
        if not select.select([], [fd], [], STALLED)[1]:
            return False
        os.set_blocking(fd, False)
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            pass
        finally:
            os.set_blocking(fd, True)
    return True


def _refused(first: int, count: int, *, detach: bool) -> bytes:
    """Attaches of new links to an address the policy forbids, each detached at once by
    the guest (``detach``), which does not wait for our refusal, or kept."""
    out = b""
    for i in range(first, first + count):
        out += attach_frame(f"hl-{i}", i, sender=True, address="hl-forbidden")
        if detach:
            out += frame(performative(DETACH, uint(i), True))
    return out


def _opened(fd: int) -> None:
    """Open the guest's connection and a session; wait for our begin, which comes once the
    broker's open has."""
    os.write(fd, AMQP_HEADER + frame(performative(OPEN, "hoarder", None)) + begin_frame())
    read_until(fd, BEGIN_DESCRIPTOR)


def test_refused_links_a_guest_never_detaches_do_not_grow_the_daemon(
    artemis: Any, tmp_path: Path
) -> None:
    """A guest attaches to an address its policy forbids, 20,000 times under new names,
    reads our refusals (an attach and a detach each) and never answers them with its own
    detach. Each refused link stays in the daemon until the guest answers, and
    ``max_links`` (8 here) never counted it: the daemon held every one, some 40 MB here
    (2 KB a link), and at the default attach rate (50/s) about 400 MB an hour for as long
    as the guest goes on. Now they count: past ``max_links`` held, the guest's connection
    ends with ``amqp:resource-limit-exceeded``."""
    with _own_daemon(artemis, tmp_path, LIMITS, "hl-keeper") as (daemon, channel):
        fd = channel.fd()
        _opened(fd)
        pid = daemon.proc.pid
        before = rss_bytes(pid)
        for start in range(0, ATTACHES, BATCH):
            if not _written(fd, _refused(start, BATCH, detach=False)):
                break  # the daemon stopped reading: it ended the connection (below)
            if _drain(fd):
                break  # it closed the guest's connection (below)
        else:
            _answered(fd, f"hl-{ATTACHES - 1}".encode())
        grown = rss_bytes(pid) - before
        assert grown < GROWTH, f"the daemon grew by {grown / 1e6:.0f} MB"
        entry = wait_for(
            lambda: (e := daemon.channel("hl-keeper"))["detail"]["errors"] and e,
            ANSWER_TIMEOUT,
            "the guest's connection to end",
        )  # recorded once the close exchange is over (or timed out)
        error = entry["detail"]["errors"][-1]
        assert error["condition"] == "amqp:resource-limit-exceeded", error
        assert "links" in error["description"], error


def test_a_guest_that_reads_nothing_cannot_slow_the_daemon_with_links(
    artemis: Any, tmp_path: Path
) -> None:
    """A guest reads nothing (its port is full) and attaches links to a forbidden address
    under new names, detaching each at once without waiting for our refusal. Our answers
    cannot be written, so each link waits in ``_unwritten_links`` to be freed once they
    are; ``max_links`` never counted them, and every attach and every pump walked the
    whole list (``_namesake_unwritten``, ``_free_written``), reading each link's name. The
    daemon's CPU per attach grew with the links held: the 4th thousand cost five times
    the 2nd (12 s of CPU for 4,000 in the harness), so a few minutes at the default 50/s
    left the shared loop no time for the other guests. Now they count, and the guest is
    cut past ``max_links``; had it not been, the 4th thousand must cost about what the
    2nd did."""
    with _own_daemon(artemis, tmp_path, LIMITS, "hl-deaf") as (daemon, channel):
        fd = channel.fd()
        _opened(fd)
        pid = daemon.proc.pid
        costs = []
        for start in range(0, CPU_BATCHES * CPU_BATCH, CPU_BATCH):
            cpu = cpu_seconds(pid)
            if not _written(fd, _refused(start, CPU_BATCH, detach=True)):
                break  # the daemon stopped reading the guest: that bounds it too
            wait_for(lambda: _unread_by_the_daemon(fd) == 0, ANSWER_TIMEOUT, "the daemon to read")
            costs.append(cpu_seconds(pid) - cpu)
        # The first batch is cheap whatever the daemon does: the socket takes our answers.
        stalled = len(costs) < CPU_BATCHES
        assert stalled or costs[-1] < 2 * costs[1] + MIN_COST, f"CPU per batch: {costs}"


def test_a_refusal_waiting_for_the_open_crosses_a_followed_redirect(
    redirecting: RedirectingArtemis, artemis: Any, tmp_path: Path
) -> None:
    """A guest writes its open, a begin, a link to a forbidden address and one to an
    allowed address in one write, as proton's C clients do. Nothing can be answered
    before the broker's open, and that open is a redirect, which the daemon follows: the
    refusal waits in ``_deferred_refusals`` while the upstream, its sessions and links are
    made again under it. Once the target's open comes the guest gets the refusal and the
    allowed link attached, and its connection stays up."""
    conf = tmp_path / "connector.toml"
    conf.write_text(LIMITS)
    qemu = Qemu("unix", tmp_path, "hl-hasty")
    daemon = Connector(
        tmp_path, artemis, [qemu], "--config", str(conf), broker_urls=redirecting.redirect_url
    )
    with serving(daemon):
        fd = qemu.fd()
        guest = Engine(server=False)
        try:
            conn = guest.connection
            lib.pn_connection_set_container(conn, b"hl-hasty")
            lib.pn_connection_open(conn)
            session = lib.pn_session(conn)
            lib.pn_session_open(session)
            refused = _sender(session, "refused", "hl-forbidden")
            allowed = _sender(session, "allowed", "hl-ok.redirect")

            def answered() -> bool:
                return bool(
                    lib.pn_link_state(refused) & lib.PN_REMOTE_CLOSED
                    and lib.pn_link_state(allowed) & lib.PN_REMOTE_ACTIVE
                )

            _pump(fd, guest, answered, TIMEOUT)
            assert "followed" in daemon.channel("hl-hasty")["last_error"]
            cond = read_condition(lib.pn_link_remote_condition(refused))
            assert cond is not None and cond[0] == "amqp:unauthorized-access"
            assert guest.condition() is None
            assert not lib.pn_connection_state(conn) & lib.PN_REMOTE_CLOSED
        finally:
            guest.free()


# Sessions a guest that reads nothing begins and ends, one at a time: far more than it may
# hold, and more than one read of the daemon's takes.
SESSION_PAIRS = 100_000
# What the daemon may grow by for it: proton takes one read of the guest's (256 KiB, some
# 4,000 begins and ends) whole before the router meets the begin past the limit, and makes a
# session of each; then what the guest may write after our close (AFTER_VIOLATION_INPUT).
# Read on without bound, the same guest grew it by 350 MB.
SESSION_GROWTH = 48 * 1024 * 1024


def test_a_guest_that_reads_nothing_and_churns_sessions_is_told_why_it_is_cut(
    artemis: Any, tmp_path: Path
) -> None:
    """A guest reads nothing (its port is full) and begins and ends sessions, one at a
    time, each ended before the next: within its channel-max. Each ended session waits for
    our end to be written before its channel is free, and past ``max_sessions`` of them
    proton found no channel for the next begin's answer and failed the connection as
    ``amqp:connection:framing-error`` "malformed frame", which told the guest and the
    operator nothing. The guest is now cut first, with ``amqp:resource-limit-exceeded``
    saying it holds too many sessions and reads none of the answers, and the daemon does
    not grow meanwhile."""
    with _own_daemon(artemis, tmp_path, LIMITS, "hl-mute") as (daemon, channel):
        fd = channel.fd()
        _opened(fd)
        pid = daemon.proc.pid
        before = rss_bytes(pid)
        pair = begin_frame(1) + frame(performative(END), 1)
        _written(fd, pair * SESSION_PAIRS)  # the daemon may stop reading: it cut the guest
        entry = wait_for(
            lambda: (e := daemon.channel("hl-mute"))["state"] == "waiting" and e,
            ANSWER_TIMEOUT,
            "the guest's connection to end",
        )
        error = entry["detail"]["errors"][-1]
        assert error["condition"] == "amqp:resource-limit-exceeded", error
        assert "sessions" in error["description"], error
        grown = rss_bytes(pid) - before
        assert grown < SESSION_GROWTH, f"the daemon grew by {grown / 1e6:.0f} MB"
