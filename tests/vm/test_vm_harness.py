"""First milestone: a real guest's helper talks AMQP over virtio-serial to the host.

No connector here: the test plays the host side with an in-memory AMQP peer on the port's
host end, over a unix socket chardev and over a pty chardev. This proves the harness, the
guest helper under Debian's proton 0.37, and the stale-bytes rule on a real virtio port.
"""

from __future__ import annotations

import os
import select
import time

import pytest

from tests.support.connector import wait_for
from tests.vm.harness import Port, Vm, open_host_side
from tests.vm.snippets import BRIDGE_CLIENT, RECONNECT, ROUND_TRIP, THROUGHPUT

pytestmark = pytest.mark.vm

UNIX = Port("org.qpid.amqp.0", "unix")
PTY = Port("org.qpid.amqp.1", "pty")


@pytest.fixture(scope="module")
def vm(make_vm) -> Vm:
    return make_vm("harness", [UNIX, PTY])


def test_guest_boots_with_proton_and_sees_its_ports(vm: Vm) -> None:
    assert vm.hello["proton"][:2] >= [0, 37]
    names = vm.run(
        "import os\n"
        "result = sorted(open(f'/sys/class/virtio-ports/{p}/name').read().strip()"
        " for p in os.listdir('/sys/class/virtio-ports'))"
    )
    assert names == sorted(["org.qpid.test.ctl", UNIX.name, PTY.name])
    print(
        f"\nqemu start -> first byte on a virtio port: {vm.first_byte_at - vm.started_at:.2f} s;"
        f" -> proton imported: {vm.ready_at - vm.started_at:.2f} s"
        f" (import itself {vm.hello['import_proton']:.2f} s); accel {vm.accel}"
    )


@pytest.mark.parametrize("port", [UNIX, PTY], ids=["unix", "pty"])
def test_amqp_round_trip(vm: Vm, host_peer, port: Port) -> None:
    peer = host_peer(port)
    result = vm.run(ROUND_TRIP, port=port.name, cid="vm-guest", queue="q", n=200, service="service")
    assert result == {"accepted": 200, "bodies": True, "reply": "re:ping"}
    assert peer.broker.remote_container == "vm-guest"


@pytest.mark.parametrize("port", [UNIX, PTY], ids=["unix", "pty"])
def test_second_connection_after_host_wrote_while_closed(vm: Vm, host_peer, port: Port) -> None:
    """qemu hands the next opener what the host wrote while the port was closed; the helper
    drains it, so the next connection starts clean."""
    peer = host_peer(port)
    assert (
        vm.run(ROUND_TRIP, port=port.name, cid="g", queue="q", n=5, service="service")["accepted"]
        == 5
    )
    stale = b"\x00\x00\x00\x0c\x02\x00\x00\x00stale-bytes-from-the-host"
    os.write(peer.fd, stale)
    seen = vm.run(
        "from connector.guest.port import open_port, drain\n"
        "import os\nfd = open_port(port)\nresult = drain(fd, 0.5)\nos.close(fd)",
        port=port.name,
    )
    assert seen == len(stale)
    assert (
        vm.run(ROUND_TRIP, port=port.name, cid="g", queue="q", n=5, service="service")["accepted"]
        == 5
    )


@pytest.mark.parametrize("port", [UNIX, PTY], ids=["unix", "pty"])
def test_guest_throughput_1k(vm: Vm, host_peer, port: Port) -> None:
    """A measurement, not a timed test: guest sends 1 KiB messages at-least-once."""
    host_peer(port)
    result = vm.run(THROUGHPUT, port=port.name, queue="tput", n=2000)
    assert result["accepted"] == 2000
    print(f"\n{port.kind}: {2000 / result['seconds']:.0f} msg/s of 1 KiB (guest -> in-memory peer)")


def test_bridge_serves_an_unmodified_tcp_client(vm: Vm, host_peer) -> None:
    host_peer(UNIX)
    result = vm.run(BRIDGE_CLIENT, port=UNIX.name, queue="bq", n=3)
    assert result == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    ("port", "idle"), [(UNIX, 16.0), (PTY, 2.0)], ids=["unix-hup", "pty-idle-timeout"]
)
def test_driver_reconnects_when_the_host_side_comes_back(
    vm: Vm, host_peer, port: Port, idle: float
) -> None:
    """unix: the guest sees end of stream when the host side goes; pty: it sees nothing,
    and only the AMQP idle timeout tells it. Either way it reopens, drains and re-attaches.

    On unix the host stays away until the guest has noticed: virtio-serial reports a quick
    close-and-reconnect of the host side as nothing at all (measured), and that case is the
    idle timeout's, as on the pty.
    """
    marker = vm.workdir / "share" / "disconnects"
    marker.unlink(missing_ok=True)
    first = host_peer(port)
    job = vm.submit(RECONNECT, port=port.name, queue="rq", idle=idle, limit=60)
    wait_for(lambda: len(first.broker.queues.get("rq", ())) == 1, 60, "the first message")
    first.close()  # the host side goes away...
    if port.kind == "unix":
        wait_for(marker.exists, 30, "the guest to see the host side go")
    second = host_peer(port)  # ...and comes back
    result = vm.result(job)
    assert (result["opened"], result["accepted"]) == (2, 2), result
    assert [m.body for m in second.broker.queues["rq"]] == ["n2"]


def test_poweroff_is_seen_on_the_host_side(make_vm) -> None:
    """When the guest powers off, qemu exits and the host end of each port reads EOF."""
    vm = make_vm("poweroff", [Port("org.qpid.amqp.0", "unix")])
    fd = open_host_side(vm.ports[0])
    try:
        started = time.monotonic()
        assert vm.stop() == 0
        readable, _, _ = select.select([fd], [], [], 10)
        assert readable and os.read(fd, 10) == b""
        print(f"\npoweroff to EOF: {time.monotonic() - started:.2f} s")
    finally:
        os.close(fd)
