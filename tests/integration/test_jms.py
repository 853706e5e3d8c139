"""A real guest application: Qpid JMS, through the guest bridge and the connector, to Artemis.

Qpid JMS decides what it may do from the capabilities the broker offers, so it shows what a
hand-written peer cannot: that the connector's answers are what a real client needs. The
client is a single-file Java program (tests/jms/) on the class path that
tests/install-deps.sh resolved with Maven; the bridge (``connector.guest.bridge``) gives it
the TCP port it expects, relaying to the test's end of a unix channel as it would to a
virtio-serial port inside a guest.
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.guest.bridge import Bridge
from tests.brokers.artemis import cache_dir
from tests.support.connector import Routed, routed

pytestmark = pytest.mark.broker

PROGRAMS = Path(__file__).resolve().parents[1] / "jms"
# A JVM compiling and running a single-file program takes a few seconds; a loaded CI
# machine may take many times that.
JAVA_TIMEOUT = 120.0
DELAY_MS = 500


def _java(program: str, *args: str) -> str:
    """Run one of tests/jms/'s programs; its output, or the test fails with it."""
    run = subprocess.run(
        ["java", "-cp", _classpath(), str(PROGRAMS / f"{program}.java"), *args],
        capture_output=True,
        text=True,
        timeout=JAVA_TIMEOUT,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    return run.stdout


def _classpath() -> str:
    path = cache_dir() / "jms-classpath.txt"
    if not path.is_file():
        pytest.fail(f"no Qpid JMS class path at {path}; run tests/install-deps.sh")
    return path.read_text().strip()


@pytest.fixture
def bridged(artemis: Any, tmp_path: Path) -> Iterator[tuple[Routed, str]]:
    """A daemon with a unix channel, and the bridge's TCP address in front of it."""
    with routed(artemis, tmp_path, ("unix",), "jms") as ctx:
        qemu = ctx.channels["unix"]
        bridge = Bridge(("127.0.0.1", 0), ["org.qpid.amqp.0"], lambda _port: os.dup(qemu.fd()))
        relay = threading.Thread(target=bridge.serve_forever, daemon=True)
        relay.start()
        try:
            host, port = bridge.address
            yield ctx, f"amqp://{host}:{port}"
        finally:
            bridge.stop()
            relay.join(10)


def test_qpid_jms_delayed_delivery_through_the_connector(bridged: tuple[Routed, str]) -> None:
    # Qpid JMS sends with a delivery delay only when the broker offers DELAYED_DELIVERY: in
    # its open, or else on the producer's link, which it then asks for in its attach (and
    # Artemis offers there only when asked). The send fails ("Remote does not support
    # delayed message delivery") when neither the open's nor the links' capabilities cross;
    # test_routing.py covers the link path on its own. The delivery-time annotation must
    # cross too, or Artemis would not hold the message back.
    ctx, url = bridged
    queue = f"jms-{uuid.uuid4().hex[:8]}"
    words = _java("DelayedDelivery", url, queue, str(DELAY_MS)).split()
    assert words[:2] == ["received", "later"], words
    assert int(words[3]) >= DELAY_MS  # Artemis held it back as asked
    entry = ctx.daemon.channel("jms-unix")
    assert entry["deliveries_in"] == 1 and entry["deliveries_out"] == 1


def test_a_jms_durable_subscription_survives_the_guest_reconnecting(
    bridged: tuple[Routed, str],
) -> None:
    # Artemis names a durable subscription's queue after the JMS client ID, which Qpid JMS
    # sends as the AMQP container-id: the message published while the subscriber was away
    # is found again only if the connector passes the guest's container-id through.
    ctx, url = bridged
    client_id = f"guest-app-{uuid.uuid4().hex[:8]}"
    out = _java("DurableSubscription", url, f"news-{uuid.uuid4().hex[:8]}", client_id)
    assert out.split() == ["received", "kept"], out
    assert ctx.daemon.channel("jms-unix")["deliveries_out"] == 1
