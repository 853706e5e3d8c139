"""The broker side of the connector against an unlucky production broker, with real brokers.

Where test_hostile_routing.py and test_hostile_guests.py make the guest the hostile party,
here it is the broker: one that wants a frame more often than the guest sends one, one that
is frozen, killed and restarted under guests that reconnect, one that refuses our password.
Each test checks what the guest is told, that nothing is acknowledged the broker did not
take, and what ``qpid-virtio-status`` shows afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.guest.client import GuestClient
from tests.brokers import Artemis
from tests.support.connector import Connector, Qemu

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
