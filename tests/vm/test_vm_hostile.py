"""The channel against what a real guest and a real qemu do to it (adversarial review).

One guest, ``hostile``, with three AMQP ports, one of each host-side kind: a unix socket
qemu listens on (``unix``), a pty, and a unix socket the connector listens on and qemu
reconnects to every second (``unix-listen``). One connector serves all three (explicit
``--channel``s) with short idle timeouts, so that a dead guest or broker is noticed within
the test. The guest may reboot (no ``-no-reboot``). Tests run in file order and leave the
guest with no AMQP connection open; the last one kills qemu.

Each bug these tests found was first committed here as a strict xfail; the channel's fixes
(5c20a76, 76ae8f9, 334af70) and the guest driver's (0af7eb8) made them pass.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from proton import Message, Timeout

from tests.support.connector import Connector, wait_for
from tests.vm.harness import Port, Qmp, Vm
from tests.vm.snippets import RECONNECT

pytestmark = [pytest.mark.vm, pytest.mark.broker]

GUEST = "hostile"
UNIX = Port("org.qpid.amqp.0", "unix")
PTY = Port("org.qpid.amqp.1", "pty")
LISTEN = Port("org.qpid.amqp.2", "unix-listen")
PORTS = [UNIX, PTY, LISTEN]
# The connector's idle timeout towards the guest and towards the broker (seconds): short,
# so that a dead peer is noticed within a test, long enough for a TCG guest's heartbeats.
GUEST_IDLE_S = 3.0
BROKER_IDLE_S = 3.0
# The guest clients' own idle timeout: how long an old client waits on a dead stream.
CLIENT_IDLE_S = 4.0
WAIT = 60.0
# A guest connection the connector ends is gone within its idle timeout, plus its close
# timeout (5 s) for the guest's answer, plus a margin for a loaded machine.
CUT_WITHIN_S = GUEST_IDLE_S + 5.0 + 10.0
MiB = 1024 * 1024
# How long a guest reads its port with nothing to read from the connector, and the most CPU
# the connector may spend meanwhile (it has nothing to do; a busy loop takes a whole core).
READ_FOR_S = 3.0
IDLE_CPU_S = 0.5


@dataclass
class Rig:
    vm: Vm
    connector: Connector
    artemis: Any

    def channel(self, port: Port) -> dict[str, Any]:
        """The connector's snapshot entry for one port."""
        snap = wait_for(self.connector.snapshot, WAIT, "a snapshot")
        return next(c for c in snap["channels"] if c["port"] == port.name)

    def log_mark(self) -> int:
        """Where the connector's log ends now, for :meth:`log_since`."""
        return len(self.connector.log_text())

    def log_since(self, mark: int) -> str:
        """What the connector logged since ``mark``."""
        return self.connector.log_text()[mark:]

    def cpu_seconds(self) -> float:
        """The connector's CPU time so far (user + system), from /proc."""
        assert self.connector.proc is not None
        fields = Path(f"/proc/{self.connector.proc.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def wait_state(self, port: Port, state: str, timeout: float = WAIT) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            entry = self.channel(port)
            return entry if entry["state"] == state else None

        return wait_for(reached, timeout, f"{port.name} to be {state}")


@pytest.fixture(scope="module")
def rig(make_vm, artemis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The guest, and a connector serving its three ports on the session's Artemis."""
    vm = make_vm(GUEST, PORTS, boot=False, reboot=True)
    vm.start()  # qemu has made its sockets and pty: the connector can be given their paths
    workdir = tmp_path_factory.mktemp("connector")
    conf = workdir / "connector.toml"
    conf.write_text(
        f"[limits]\nidle_timeout_s = {GUEST_IDLE_S}\n[broker]\nidle_timeout_s = {BROKER_IDLE_S}\n"
    )
    channels = [
        arg
        for p in PORTS
        for arg in ("--channel", f"{p.kind}:{p.path},guest={GUEST},port={p.name}")
    ]
    connector = Connector(workdir, artemis, [], *channels, "--config", str(conf)).start()
    try:
        vm.wait_ready()
        rig = Rig(vm, connector, artemis)
        for port in PORTS:
            rig.wait_state(port, "waiting")
        yield rig
    finally:
        if connector.proc is not None:
            connector.stop()


def fill(rig: Rig, queue: str, bodies: list[Any]) -> None:
    """Put messages on the broker directly (the host side of a test)."""
    with rig.artemis.connection() as conn:
        snd = conn.create_sender(queue)
        for body in bodies:
            snd.send(Message(body=body))


def no_traceback(rig: Rig, mark: int) -> None:
    """Whatever the guest or qemu did since ``mark``, the connector logged it without a
    traceback."""
    log = rig.log_since(mark)
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000) :]


# Driving an old client until its connection is over; what ended it. Params: key, wait.
OLD_CLIENT_ENDS = """
import builtins
from connector.guest import AmqpError, Disconnected
c = getattr(builtins, key)
try:
    c._wait(lambda: False, None, "the end", list, wait)
except (AmqpError, Disconnected) as err:
    result = f"{type(err).__name__}: {err}"
c.driver.close_fd()
"""

# A guest process that sends one small message, then the first half of a large one (the
# rest never comes: the transfer stays open, as it does when the process dies mid-message),
# and announces it; the agent kills it later. Params: port, queue, size, key.
SENDER_TO_KILL = """
import subprocess, sys, builtins
child = subprocess.Popen([sys.executable, "-c", '''
import sys
from proton import Message, Timeout
from connector.guest import GuestClient
c = GuestClient(sys.argv[1], idle_timeout=None)
assert c.send(sys.argv[2], ["before"])[0].state == "accepted"
snd = c.driver.create_sender(c.connection, sys.argv[2])
while snd.credit <= 0:
    c.driver.process(0.1)
size = int(sys.argv[3])
snd.delivery("half")
snd.send(Message(body=b"x" * size).encode()[: size // 2])
print("sending", flush=True)
while True:
    c.driver.process(1.0)
''', port, queue, str(size)], stdout=subprocess.PIPE)
setattr(builtins, key, child)
result = child.stdout.readline().decode().strip()
"""

# Kill the sender started above; a new client on the same port then takes what the broker
# holds on the queue. Params: port, queue, key.
KILL_AND_RECONNECT = """
import builtins
from connector.guest import GuestClient
child = getattr(builtins, key)
child.kill()
child.wait()
with GuestClient(port, container_id="after-kill") as c:
    result = [m.body for m in c.receive(queue, 2, timeout=5, drain=True)]
"""


def start_killable_senders(rig: Rig, queues: dict[str, str]) -> None:
    """On each port (name: queue), a guest process sends half of an 8 MiB message; return
    once 1 MiB of each has reached the connector (the processes are then killed, by
    KILL_AND_RECONNECT or with qemu)."""
    ports = [p for p in PORTS if p.name in queues]
    base = {p.name: rig.channel(p)["bytes_in"] for p in ports}
    for p in ports:
        key = f"sender_{p.id}"
        assert rig.vm.run(SENDER_TO_KILL, port=p.name, queue=queues[p.name], size=8 * MiB, key=key)
    for p in ports:
        wait_for(lambda p=p: rig.channel(p)["bytes_in"] > base[p.name] + MiB, WAIT, "1 MiB")


@pytest.mark.parametrize("port", [UNIX, PTY], ids=["unix", "pty"])
def test_a_client_killed_mid_message_leaves_the_port_to_the_next(rig: Rig, port: Port) -> None:
    """A guest process dies (SIGKILL) half way through an 8 MiB message, 1 MiB of which
    reached the connector: the host sees no close, only the next client's header in the
    middle of the dead transfer frame. The next client is served, what was accepted before
    is there, the half message is not."""
    mark = rig.log_mark()
    queue = f"hostile.killed.{port.kind}"
    start_killable_senders(rig, {port.name: queue})
    got = rig.vm.run(KILL_AND_RECONNECT, port=port.name, queue=queue, key=f"sender_{port.id}")
    assert got == ["before"]
    # Where the kill cut the dead client's last frame decides how its connection ends: as
    # a restarted client (the next header after a silence, inside a transfer's payload),
    # or as a malformed frame (the header landed in a frame's own header, seen on the pty
    # when the kill cut one short). Either way the next header is found in the old stream.
    log = rig.log_since(mark)
    assert "new protocol header inside the old connection's stream" in log
    assert "the guest's client restarted" in log or "malformed frame" in log
    no_traceback(rig, mark)


# A client drops its port in the middle of an 8 MiB message (closes it, as a process that
# dies does) and a new client opens the port at once: its header follows the dead client's
# last bytes after less than the connector's RESTART_SILENCE_S, inside the dead transfer
# frame. Params: port, queue.
DROPPED_MID_MESSAGE = """
from proton import Message, Timeout
from connector.guest import GuestClient
c = GuestClient(port, idle_timeout=None)
snd = c.driver.create_sender(c.connection, queue)
while snd.credit <= 0:
    c.driver.process(0.1)
Message(body=b"x" * (8 * 1024 * 1024)).send(snd)
for _ in range(20):
    c.driver.process(0.01)
c.driver.close_fd()
with GuestClient(port, container_id="right-after") as c2:
    result = c2.send(queue, ["after"])[0].state
"""


@pytest.mark.parametrize("port", [UNIX, PTY], ids=["unix", "pty"])
def test_a_client_right_after_a_dead_one_is_taken_for_a_new_client(rig: Rig, port: Port) -> None:
    """The connector tells a new client from the rest of a dead client's frame by the
    silence before its header; a client that opens the port at once sends its header
    after less than that, and it is swallowed by the dead frame. Its helper must get it
    recognised (not wait for the host's idle timeout, 60 s by default, to end the dead
    connection): the old connection ends as a restarted client."""
    mark = rig.log_mark()
    queue = f"hostile.right-after.{port.kind}"
    assert rig.vm.run(DROPPED_MID_MESSAGE, port=port.name, queue=queue) == "accepted"
    log = rig.log_since(mark)
    assert "the guest's client restarted" in log
    assert "local-idle-timeout" not in log
    no_traceback(rig, mark)


# A client that received messages and settled none of them, kept open after the snippet.
# Params: port, queue, n, key.
HOLDING_UNSETTLED = """
import builtins
from connector.guest import GuestClient
c = GuestClient(port, container_id=key)
got = c.receive(queue, n, outcome="none")
setattr(builtins, key, c)
result = len(got)
"""

# A new client takes n messages from the queue, then asks for one more (drain), which must
# not be there; all sorted, a binary body standing for itself by its first 4 bytes.
# Params: port, queue, n, WAIT.
TAKE_ALL = """
from connector.guest import GuestClient
with GuestClient(port, container_id="taker") as c:
    got = c.receive(queue, n, timeout=WAIT) + c.receive(queue, 1, timeout=WAIT, drain=True)
result = sorted(m.body if isinstance(m.body, str) else m.body[:4].decode() for m in got)
"""


def test_a_guest_reset_mid_connection_gets_its_messages_back_on_every_port(rig: Rig) -> None:
    """QMP ``system_reset`` while a client holds two unsettled messages: the host sees
    nothing, the guest boots again and its next clients, on each port, start clean; the
    two messages come back, and every channel serves on."""
    mark = rig.log_mark()
    queue = "hostile.reset"
    fill(rig, queue, ["r0", "r1"])
    assert rig.vm.run(HOLDING_UNSETTLED, port=UNIX.name, queue=queue, n=2, key="reset") == 2
    rig.vm.qmp("system_reset")
    rig.vm.wait_ready()
    got = rig.vm.run(TAKE_ALL, port=UNIX.name, queue=queue, n=2, WAIT=WAIT)
    assert got == ["r0", "r1"]
    for port in (PTY, LISTEN):
        assert rig.vm.run(TAKE_ALL, port=port.name, queue=queue, n=0, WAIT=WAIT) == []
    no_traceback(rig, mark)


def unplug_under_a_client(rig: Rig, qmp: Qmp, port: Port, queue: str) -> str:
    """A client on ``port`` holds the one message put on ``queue``, unsettled; then the
    port's virtserialport is unplugged (``device_del``, done at ``DEVICE_DELETED``) and the
    old client driven to its end. Returns how it ended."""
    fill(rig, queue, ["held"])
    assert rig.vm.run(HOLDING_UNSETTLED, port=port.name, queue=queue, n=1, key="held") == 1
    qmp.execute("device_del", {"id": f"vp{port.id}"})
    qmp.wait_event("DEVICE_DELETED", WAIT, device=f"vp{port.id}")
    return str(rig.vm.run(OLD_CLIENT_ENDS, key="held", wait=WAIT))


# Wait in the guest until a port of that name exists (a port plugged in appears once the
# guest's driver has handled qemu's notice; nothing else tells). Params: port, wait.
PORT_APPEARS = """
import time
from connector.guest.port import PortNotFound, find_port
end = time.monotonic() + wait
while True:
    try:
        result = find_port(port)
        break
    except PortNotFound:
        if time.monotonic() > end:
            raise
        time.sleep(0.05)
"""


def plug(rig: Rig, qmp: Qmp, port: Port) -> None:
    """Plug the port's virtserialport back onto its chardev, under the same name, and wait
    for the guest to show it."""
    qmp.execute(
        "device_add",
        {"driver": "virtserialport", "bus": "vser0.0", "chardev": port.id,
         "name": port.name, "id": f"vp{port.id}"},
    )  # fmt: skip
    assert rig.vm.run(PORT_APPEARS, port=port.name, wait=WAIT)


def test_a_port_unplugged_and_plugged_back_is_served_again(rig: Rig) -> None:
    """The virtserialport is unplugged (``device_del``) under a client holding an unsettled
    message, then its chardev removed (``chardev-remove``): the connector sees the socket
    end, closes the upstream (the broker gets the message back) and retries. Both are
    added back: the connector reconnects, and a new client on the new port gets the
    message. The old client ends with an error, not a traceback."""
    mark = rig.log_mark()
    queue = "hostile.unplug"
    with rig.vm.qmp_session() as qmp:
        ended = unplug_under_a_client(rig, qmp, UNIX, queue)
        qmp.execute("chardev-remove", {"id": UNIX.id})
        rig.wait_state(UNIX, "waiting")
        qmp.execute(
            "chardev-add",
            {
                "id": UNIX.id,
                "backend": {
                    "type": "socket",
                    "data": {
                        "addr": {"type": "unix", "data": {"path": UNIX.path}},
                        "server": True,
                        "wait": False,
                    },
                },
            },
        )
        plug(rig, qmp, UNIX)
    got = rig.vm.run(TAKE_ALL, port=UNIX.name, queue=queue, n=1, WAIT=WAIT)
    assert got == ["held"]
    assert ended.startswith(("Disconnected", "AmqpError")), ended
    no_traceback(rig, mark)


def test_a_port_replugged_on_its_chardev_starts_clean(rig: Rig) -> None:
    """The virtserialport alone is unplugged and plugged back (``device_del``,
    ``device_add``) under a client holding an unsettled message; its chardev stays, so the
    host sees nothing at all. The next client on the new port starts clean and gets the
    message back."""
    mark = rig.log_mark()
    queue = "hostile.replug"
    with rig.vm.qmp_session() as qmp:
        ended = unplug_under_a_client(rig, qmp, PTY, queue)
        plug(rig, qmp, PTY)
    assert ended.startswith(("Disconnected", "AmqpError")), ended
    assert rig.vm.run(TAKE_ALL, port=PTY.name, queue=queue, n=1, WAIT=WAIT) == ["held"]
    no_traceback(rig, mark)


# A second process opens a port a client holds; the client then goes on. Params: port.
SECOND_OPENER = """
import errno, subprocess, sys
from connector.guest import GuestClient
with GuestClient(port, container_id="first-opener") as c:
    second = subprocess.run([sys.executable, "-c", '''
import sys
from connector.guest import GuestClient
try:
    GuestClient(sys.argv[1], container_id="second-opener")
except OSError as err:
    print(err.errno)
''', port], capture_output=True, text=True)
    state = c.send("hostile.second-opener", ["first"])[0].state
result = [second.stdout.strip() == str(errno.EBUSY), second.stderr, state]
"""


def test_a_second_opener_in_the_guest_is_refused_and_the_first_goes_on(rig: Rig) -> None:
    """virtio-serial lets one process hold a port: a second opener gets EBUSY (no bytes of
    its reach the connector), and the first client's connection is untouched."""
    mark = rig.log_mark()
    assert rig.vm.run(SECOND_OPENER, port=UNIX.name) == [True, "", "accepted"]
    assert "container-id second-opener" not in rig.log_since(mark)
    no_traceback(rig, mark)


# A client that opened its connection and then sends empty frames every 50 ms, which dies
# (its port closed between two frames) right before a new client opens the port: the new
# header follows the dead client's last frame by less than RESTART_SILENCE_S, at a frame
# boundary. Params: port.
DIES_BETWEEN_FRAMES = """
import os, threading, time
from proton import Connection, Transport
from connector.guest import GuestClient
from connector.guest.port import drain, open_port
fd = open_port(port)
drain(fd)
old = Connection()
old.container = "dies-between-frames"
t = Transport()
t.bind(old)
old.open()
os.write(fd, t.peek(t.pending()))
for _ in range(10):
    time.sleep(0.05)
    os.write(fd, bytes([0, 0, 0, 8, 2, 0, 0, 0]))
os.close(fd)
with GuestClient(port, container_id="after-frames") as c:
    result = c.send("hostile.between-frames", ["x"])[0].state
"""


@pytest.mark.parametrize("port", [UNIX, PTY], ids=["unix", "pty"])
def test_a_new_client_gets_no_frame_of_the_connection_it_replaced(rig: Rig, port: Port) -> None:
    """The old connection takes the new client's header for a frame and fails (malformed
    frame); the connector finds the header in that read and starts the new connection
    from it. The old connection's close is for a client that is gone: it must not be the
    first thing the new client reads (its proton would fail on it: 'Expected AMQP protocol
    header')."""
    mark = rig.log_mark()
    assert rig.vm.run(DIES_BETWEEN_FRAMES, port=port.name) == "accepted"
    log = rig.log_since(mark)
    assert "new protocol header inside the old connection's stream" in log
    assert "Expected AMQP protocol header" not in log
    no_traceback(rig, mark)


# A receiver with credit for everything on the queue, left undriven: the guest reads
# nothing more, so the connector's writes fill the port. Params: port, queue, credit, idle.
RECEIVER_LEFT_UNDRIVEN = """
import builtins
from connector.guest import GuestClient
c = GuestClient(port, container_id="paused", idle_timeout=idle)
first = c.receive(queue, 1, outcome="none")
c._receivers[queue].flow(credit)
while c.driver.transport.pending() > 0:  # the flow frame goes out
    c.driver.process(0.1)
builtins.paused = c
result = len(first)
"""


def test_a_vm_paused_past_the_idle_timeout_is_cut_and_served_again(rig: Rig) -> None:
    """The broker streams to a guest (credit for 3.75 MiB) when its VM is paused (QMP
    ``stop``) for longer than the idle timeout: the port takes no more bytes. The connector
    ends that connection (within the idle timeout and its close timeout), naming the guest
    and the idle timeout, and the broker gets back every unsettled message. After ``cont``
    the old client ends, and a new one receives every message."""
    mark = rig.log_mark()
    queue = "hostile.paused"
    n = 60
    fill(rig, queue, [f"{i:04d}".encode() * (16 * 1024) for i in range(n)])  # 64 KiB each
    first = rig.vm.run(
        RECEIVER_LEFT_UNDRIVEN, port=UNIX.name, queue=queue, credit=n - 1, idle=CLIENT_IDLE_S
    )
    assert first == 1
    try:
        rig.vm.qmp("stop")
        try:
            rig.wait_state(UNIX, "waiting", CUT_WITHIN_S)
        finally:
            rig.vm.qmp("cont")
    finally:
        ended = rig.vm.run(OLD_CLIENT_ENDS, key="paused", wait=WAIT)
    assert "local-idle-timeout" in rig.log_since(mark)
    assert ended.startswith(("Disconnected", "AmqpError")), ended
    got = rig.vm.run(TAKE_ALL, port=UNIX.name, queue=queue, n=n, WAIT=WAIT)
    assert got == [f"{i:04d}" for i in range(n)]
    no_traceback(rig, mark)


# A guest that asks for messages and then reads none: header, open, begin, attach and
# credit written raw (proton pipelines them), then only heartbeats, from a thread, so that
# it stays alive to the connector while its port fills. Params: port, queue, credit.
READS_NOTHING = """
import builtins, os, threading
from proton import Connection, Transport
from connector.guest.port import open_port, drain
fd = open_port(port)
drain(fd)
os.set_blocking(fd, True)
conn = Connection()
conn.container = "reads-nothing"
t = Transport()
t.bind(conn)
conn.open()
rcv = conn.session().receiver("reads-nothing")
rcv.source.address = queue
rcv.session.open()
rcv.open()
rcv.flow(credit)
while t.pending() > 0:
    t.pop(os.write(fd, t.peek(t.pending())))
stop = threading.Event()
def heartbeat():
    while not stop.wait(1.0):
        os.write(fd, bytes([0, 0, 0, 8, 2, 0, 0, 0]))
threading.Thread(target=heartbeat, daemon=True).start()
builtins.reads_nothing = (fd, stop)
result = True
"""

# The guest that reads nothing breaks the protocol: a second open, which the connector
# answers by closing the connection (a close it cannot write: the port is full).
SECOND_OPEN = """
import builtins, os
from proton import Connection, Transport
fd, _ = builtins.reads_nothing
again = Connection()
again.container = "again"
t = Transport()
t.bind(again)
again.open()
os.write(fd, t.peek(t.pending())[8:])  # the open frame, without the protocol header
result = True
"""

# The guest that read nothing stops its heartbeats and reads its port for ``seconds``,
# sending nothing (no new header), then closes it. Params: seconds.
READ_ONLY_FOR = """
import builtins, os, time
fd, stop = builtins.reads_nothing
stop.set()
os.set_blocking(fd, False)
from connector.guest.port import read_some, wait_fd
import select
end = time.monotonic() + seconds
got = 0
while time.monotonic() < end:
    if wait_fd(fd, select.POLLIN, end - time.monotonic()):
        got += len(read_some(fd) or b"")
os.close(fd)
result = got
"""


def cut_with_its_port_full(rig: Rig, queue: str, n: int) -> None:
    """A guest grants credit for n messages of 64 KiB and reads nothing (heartbeats only),
    so its port fills and the broker is held back; it then sends a second open, and the
    connector ends its connection with the close unwritten (after its close timeout)."""
    fill(rig, queue, [f"{i:04d}".encode() * (16 * 1024) for i in range(n)])
    base = rig.channel(UNIX)["bytes_out"]
    assert rig.vm.run(READS_NOTHING, port=UNIX.name, queue=queue, credit=n)
    wait_for(lambda: rig.channel(UNIX)["bytes_out"] > base + MiB // 2, WAIT, "the port to fill")
    mark = rig.log_mark()
    assert rig.vm.run(SECOND_OPEN)
    rig.wait_state(UNIX, "waiting", CUT_WITHIN_S)
    assert "a second open" in rig.log_since(mark)


def test_a_guest_connection_ended_with_its_port_full_costs_no_cpu_after(rig: Rig) -> None:
    """After a guest with a full port is cut (``cut_with_its_port_full``), it reads its
    port again, without a new header: the connector has nothing to write and nothing to
    do. The messages it held come back."""
    queue = "hostile.full-port"
    n = 60
    cut_with_its_port_full(rig, queue, n)
    cpu = rig.cpu_seconds()
    assert rig.vm.run(READ_ONLY_FOR, seconds=READ_FOR_S) > 0
    spent = rig.cpu_seconds() - cpu
    got = rig.vm.run(TAKE_ALL, port=UNIX.name, queue=queue, n=n, WAIT=WAIT)
    assert got == [f"{i:04d}" for i in range(n)]
    assert spent < IDLE_CPU_S, f"{spent:.2f} s of CPU while the guest only read"


def test_a_guest_cut_while_its_broker_is_held_back_ends_without_an_internal_error(
    rig: Rig,
) -> None:
    """A guest with a full port is cut (``cut_with_its_port_full``) while its broker is
    held back by that port: the upstream's close exchange then runs on its own, and ends
    without a traceback. The messages the guest held come back."""
    mark = rig.log_mark()
    queue = "hostile.held-broker"
    n = 60
    cut_with_its_port_full(rig, queue, n)
    assert rig.vm.run(READ_ONLY_FOR, seconds=0) == 0  # the old client closes its port
    got = rig.vm.run(TAKE_ALL, port=UNIX.name, queue=queue, n=n, WAIT=WAIT)
    assert got == [f"{i:04d}" for i in range(n)]
    no_traceback(rig, mark)


# A sender that has credit and a large message to send, left undriven. Params: port, queue,
# size.
LARGE_SENDER = """
import builtins
from proton import Message, Timeout
from connector.guest import GuestClient
c = GuestClient(port, container_id="stalled", idle_timeout=None)
snd = c.driver.create_sender(c.connection, queue)
while snd.credit <= 0:
    c.driver.process(0.1)
Message(body=b"y" * size).send(snd)
builtins.stalled = c
result = True
"""

# A new client on a port, with a bounded wait. Params: port, queue.
NEXT_CLIENT = """
from connector.guest import Disconnected, GuestClient, GuestTimeout
try:
    with GuestClient(port, container_id="next", timeout=20) as c:
        result = c.send(queue, ["next"])[0].state
except (GuestTimeout, Disconnected) as err:
    result = str(err)
"""


def test_a_guest_held_back_when_its_broker_dies_is_read_again(rig: Rig) -> None:
    """A guest streams a 16 MiB message while the broker stalls (SIGSTOP): the connector
    stops reading the guest (backpressure). The broker then misses its heartbeats, so the
    connector drops it and ends the guest's connection. When the broker is back, the next
    client on the channel is served."""
    mark = rig.log_mark()
    queue = "hostile.held-back"
    assert rig.vm.run(LARGE_SENDER, port=LISTEN.name, queue=queue, size=16 * MiB)
    rig.artemis.pause()
    try:
        ended = rig.vm.run(OLD_CLIENT_ENDS, key="stalled", wait=WAIT)
        rig.wait_state(LISTEN, "waiting", CUT_WITHIN_S)
    finally:
        rig.artemis.resume()
    assert ended.startswith("AmqpError"), ended
    assert "sent nothing" in rig.log_since(mark)
    assert rig.vm.run(NEXT_CLIENT, port=LISTEN.name, queue=queue) == "accepted"
    no_traceback(rig, mark)


def test_a_connector_killed_under_a_reconnecting_qemu_is_found_again(rig: Rig) -> None:
    """The connector is SIGKILLed under a guest application (a MessagingHandler on the
    driver) connected over the unix-listen port: qemu loses its peer, the guest sees the
    host side go, and when the connector is back qemu reconnects (``reconnect=1``) and the
    application's driver re-attaches and sends again."""
    mark = rig.log_mark()
    queue = "hostile.reconnect"
    share = rig.vm.workdir / "share"
    for name in ("accepted", "disconnects"):
        (share / name).unlink(missing_ok=True)
    job = rig.vm.submit(RECONNECT, port=LISTEN.name, queue=queue, idle=CLIENT_IDLE_S, limit=WAIT)
    wait_for((share / "accepted").exists, WAIT, "the first message accepted")
    rig.connector.stop(signal.SIGKILL)
    wait_for((share / "disconnects").exists, WAIT, "the guest to see the host side go")
    rig.connector.start()
    result = rig.vm.result(job)
    assert (result["opened"], result["accepted"]) == (2, 2), result
    with rig.artemis.connection() as conn:
        rcv = conn.create_receiver(queue)
        got = []
        for _ in range(2):
            got.append(rcv.receive(timeout=WAIT).body)
            rcv.accept()
    assert got == ["n1", "n2"]
    no_traceback(rig, mark)


def test_qemu_killed_mid_transfer_unix_waits_pty_is_gone(rig: Rig) -> None:
    """qemu is SIGKILLed while a guest process is half way through an 8 MiB message on the
    unix port and another on the pty: the unix channel goes back to waiting (qemu may come
    back), the pty one is gone; both upstreams are closed, so the broker holds what was
    accepted before and none of the half messages."""
    mark = rig.log_mark()
    queues = {port.name: f"hostile.qemu-kill.{port.kind}" for port in (UNIX, PTY)}
    start_killable_senders(rig, queues)
    rig.vm.kill()
    rig.wait_state(PTY, "gone")
    entry = rig.wait_state(UNIX, "waiting")
    assert entry["upstream"] is None
    with rig.artemis.connection() as conn:
        for queue in queues.values():
            rcv = conn.create_receiver(queue)
            assert rcv.receive(timeout=WAIT).body == "before"
            rcv.accept()
            with pytest.raises(Timeout):
                half = rcv.receive(timeout=1)  # the half message must not be there
                pytest.fail(f"{queue}: a message of {len(half.body)} bytes after 'before'")
    no_traceback(rig, mark)
