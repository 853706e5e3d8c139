"""A real guest's AMQP client reaches the real broker (Artemis) through the connector.

Issue 4 §3, with few boots (TCG, about 5 s each): guest A (a unix-socket port and a pty
port) serves most tests; guest B boots later, while the connector is already running,
which gives the "qemu start to first message accepted" number and the two-VMs test; B is
then SIGKILLed (A must keep working), and A is powered off last. Tests depend on this
order (pytest runs a module's tests in file order).

The connector is given no ``--channel``: it finds A's channels (unix and pty) by reading
qemu's command line at start-up, and B's when the directory watch sees B's socket appear.
TCG guests send no KVM uevent, so this is the discovery path such hosts rely on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from proton import Message, Timeout
from proton.utils import BlockingReceiver

from tests.support.connector import Connector, wait_for
from tests.vm.harness import Port, Vm
from tests.vm.snippets import BRIDGE_CLIENT, ROUND_TRIP, THROUGHPUT, TRANSACTIONS

pytestmark = [pytest.mark.vm, pytest.mark.broker]

A_UNIX = Port("org.qpid.amqp.0", "unix")
A_PTY = Port("org.qpid.amqp.1", "pty")
B_UNIX = Port("org.qpid.amqp.0", "unix")
SERVICE = "vm.e2e.service"


@dataclass
class Setup:
    a: Vm
    b: Vm
    connector: Connector
    artemis: Any


@pytest.fixture(scope="module")
def setup(make_vm, artemis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    a = make_vm("vm-a", [A_UNIX, A_PTY])
    b = make_vm("vm-b", [B_UNIX], boot=False)
    watch = str(b.workdir / "amqp-*.sock")
    connector = Connector(
        tmp_path_factory.mktemp("connector"), artemis, [], "--discovery", "watch",
        "--watch", watch,
    )  # fmt: skip
    try:
        connector.start()
        # "waiting": the channel is open and the connector waits for a protocol header.
        wait_for(lambda: state(connector, "vm-a", A_UNIX.name) == "waiting", 60, "A's unix")
        wait_for(lambda: state(connector, "vm-a", A_PTY.name) == "waiting", 60, "A's pty")
        yield Setup(a, b, connector, artemis)
    finally:
        if connector.proc is not None:
            connector.stop()


@pytest.fixture(scope="module")
def responder(setup: Setup) -> Iterator[None]:
    """A host-side service on the broker: answers each request on SERVICE with 're:'+body."""
    stop = threading.Event()
    conn = setup.artemis.connect()
    rcv = conn.create_receiver(SERVICE)
    senders: dict[str, Any] = {}

    def serve() -> None:
        while not stop.is_set():
            try:
                msg = rcv.receive(timeout=0.5)
            except Timeout:  # nothing this round
                continue
            snd = senders.get(msg.reply_to) or conn.create_sender(msg.reply_to)
            senders[msg.reply_to] = snd
            snd.send(Message(body=f"re:{msg.body}", correlation_id=msg.correlation_id))
            rcv.accept()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield
    stop.set()
    t.join()
    conn.close()


def _take(rcv: BlockingReceiver, count: int) -> list[Any]:
    """Receive and accept ``count`` messages on ``rcv``, a receiver straight on the broker;
    their bodies. How the tests check what a guest left on the broker, bypassing the
    connector."""
    bodies = []
    for _ in range(count):
        bodies.append(rcv.receive(timeout=30).body)
        rcv.accept()
    return bodies


def status_json(connector: Connector) -> dict[str, Any]:
    """What ``qpid-virtio-status --json`` prints."""
    out = subprocess.run(
        [sys.executable, "-m", "connector.status", "--control-socket", connector.control, "--json"],
        capture_output=True,
        check=True,
        text=True,
        timeout=30,
    )
    return json.loads(out.stdout)


def state(connector: Connector, guest: str, port: str) -> str | None:
    """The state column of one guest's port, or None while the connector does not list it."""
    for row in status_json(connector)["channels"]:
        if row["guest"] == guest and row["port"] == port:
            return str(row["state"])
    return None


@pytest.mark.parametrize("port", [A_UNIX, A_PTY], ids=["unix", "pty"])
def test_thousand_messages_and_a_request(setup: Setup, responder: None, port: Port) -> None:
    result = setup.a.run(
        ROUND_TRIP, port=port.name, cid=f"vm-a-{port.kind}", queue=f"vm.e2e.{port.kind}",
        n=1000, service=SERVICE,
    )  # fmt: skip
    assert result == {"accepted": 1000, "bodies": True, "reply": "re:ping"}


def test_second_connection_after_the_host_wrote_while_closed(setup: Setup) -> None:
    """The guest vanishes from a connection while the connector is still sending to it
    (credit granted, nothing read, fd closed without an AMQP close), so the connector writes
    into a closed port. The next connection on the same port must start clean, and the
    broker must redeliver what the dead one never settled."""
    queue = "vm.e2e.reopen"
    result = setup.a.run(
        """
import os
from connector.guest import GuestClient
c = GuestClient(port)
c.send(queue, [f"r{i}" for i in range(20)])
rcv = c.driver.create_receiver(c.connection, queue)
rcv.flow(10)
c.driver.process(0.2)          # the flow frame leaves; transfers start coming back
os.close(c.driver.fd)          # gone without a close: the connector keeps writing
with GuestClient(port) as c2:
    got = c2.receive(queue, 20, timeout=60)
result = sorted(m.body for m in got)
""",
        port=A_UNIX.name,
        queue=queue,
    )
    assert result == sorted(f"r{i}" for i in range(20))


def test_bridge_with_an_unmodified_tcp_client(setup: Setup) -> None:
    result = setup.a.run(BRIDGE_CLIENT, port=A_UNIX.name, queue="vm.e2e.bridge", n=10)
    assert result == list(range(10)) * 2


@pytest.mark.parametrize("port", [A_UNIX, A_PTY], ids=["unix", "pty"])
def test_guest_throughput_through_the_connector(setup: Setup, port: Port) -> None:
    """A measurement, not a timed test: 1 KiB messages, at-least-once, guest -> Artemis."""
    n = 2000
    result = setup.a.run(THROUGHPUT, port=port.name, queue=f"vm.e2e.tput.{port.kind}", n=n)
    assert result["accepted"] == n
    print(
        f"\n{port.kind}: {n / result['seconds']:.0f} msg/s of 1 KiB, guest -> connector -> "
        f"Artemis ({setup.a.accel})"
    )


def test_transactions_from_a_messaging_handler(setup: Setup) -> None:
    queue = "vm.e2e.tx"
    assert setup.a.run(TRANSACTIONS, port=A_UNIX.name, queue=queue) == ["aborted", "committed"]
    with setup.artemis.connection() as conn:
        rcv = conn.create_receiver(queue)
        got = _take(rcv, 2)
        with pytest.raises(Timeout):
            rcv.receive(timeout=1)  # the aborted transaction's messages never arrived
    assert got == ["c0", "c1"]


def test_two_vms_at_once_and_time_to_first_accepted(setup: Setup) -> None:
    b = setup.b
    b.start()
    b.wait_ready()
    wait_for(lambda: state(setup.connector, "vm-b", B_UNIX.name) == "waiting", 60, "B found")
    first = b.run(
        "from connector.guest import GuestClient\n"
        "with GuestClient(port, container_id='vm-b') as c:\n"
        "    result = c.send('vm.e2e.b', ['first'])[0].state",
        port=B_UNIX.name,
    )
    accepted_after = time.monotonic() - b.started_at
    assert first == "accepted"
    print(
        f"\nqemu start -> agent ready: {b.ready_at - b.started_at:.2f} s; "
        f"-> first message accepted by Artemis (upper bound): {accepted_after:.2f} s"
    )
    # Both guests hold a connection at the same time; the broker sees each by its name.
    hold = (
        "from connector.guest import GuestClient\n"
        "import time\n"
        "with GuestClient(port, container_id=cid) as c:\n"
        "    c.send(queue, ['x'])\n"
        "    c.receive(queue, 1, timeout=60)\n"
        "    time.sleep(seconds)\n"  # keep the connection open while the host looks
        "    result = c.send(queue, ['y'])[0].state"
    )
    ja = setup.a.submit(hold, port=A_UNIX.name, cid="vm-a-both", queue="vm.e2e.a2", seconds=6)
    jb = b.submit(hold, port=B_UNIX.name, cid="vm-b-both", queue="vm.e2e.b2", seconds=6)

    def both_seen() -> bool:
        ids = {c["container_id"] for c in setup.artemis.list_connections()}
        return {"vm-a-both", "vm-b-both"} <= ids

    wait_for(both_seen, 30, "both guests' connections on the broker")
    assert setup.a.result(ja) == "accepted"
    assert b.result(jb) == "accepted"


def test_qemu_sigkill_shows_gone_the_broker_redelivers_others_keep_working(
    setup: Setup, responder: None
) -> None:
    queue = "vm.e2e.kill"
    held = setup.b.run(
        "from connector.guest import GuestClient\n"
        "c = GuestClient(port)\n"
        "c.send(queue, [f'k{i}' for i in range(5)])\n"
        "result = [m.body for m in c.receive(queue, 5, outcome='none')]\n"  # left unsettled
        "import builtins\nbuiltins.qvc_keep = c",  # outlive the snippet, connection open
        port=B_UNIX.name,
        queue=queue,
    )
    assert held == [f"k{i}" for i in range(5)]
    setup.b.kill()
    wait_for(lambda: state(setup.connector, "vm-b", B_UNIX.name) == "gone", 30, "vm-b gone")
    with setup.artemis.connection() as conn:
        again = _take(conn.create_receiver(queue), 5)
    assert sorted(again) == held
    result = setup.a.run(
        ROUND_TRIP, port=A_UNIX.name, cid="vm-a-after", queue="vm.e2e.after", n=10,
        service=SERVICE,
    )  # fmt: skip
    assert result == {"accepted": 10, "bodies": True, "reply": "re:ping"}


def test_guest_poweroff_shows_gone_and_the_connector_serves_on(setup: Setup) -> None:
    assert setup.a.stop() == 0
    for port in (A_UNIX, A_PTY):
        wait_for(lambda p=port: state(setup.connector, "vm-a", p.name) == "gone", 30, "A gone")
    assert setup.connector.proc is not None and setup.connector.proc.poll() is None
