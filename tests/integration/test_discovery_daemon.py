"""End to end: the daemon finds a VM by itself and routes a guest connection through each
of its channels to a real Artemis; a restarted daemon finds the running VM again; the
channels go when the VM ends.

The VM is the fake qemu (a copy of Python named ``qemu-system-x86_64``, so the daemon's
default executable check passes), with KVM and without (TCG), in relay mode: each port's
guest end is a unix socket the test's ``GuestClient`` talks through. The ports are named
``org.qpid.amqp.e2e-*`` and the daemon is configured to want only those, so it leaves
alone any real qemu other suites run on the same machine at the same time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from discovery_helpers import FakeQemuProcess, python_named_qemu, short_tmp

pytest.importorskip("connector.daemon", reason="needs the daemon (connector/daemon.py)")
GuestClient = pytest.importorskip("connector.guest").GuestClient

pytestmark = pytest.mark.broker
__all__ = ["short_tmp"]  # a fixture, used by name

REPO = Path(__file__).resolve().parents[2]
# The daemon starts in well under a second; a loaded CI box may be many times slower.
START_TIMEOUT = 60.0
# Discovery reports within milliseconds; channel state follows within a loop iteration.
STATE_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
PORTS = ("org.qpid.amqp.e2e-0", "org.qpid.amqp.e2e-1")


def wait_for(condition: Callable[[], Any], what: str, timeout: float = STATE_TIMEOUT) -> Any:
    """Poll with a deadline: nothing announces a change of the daemon's state to a test."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_INTERVAL)
    return result


class Daemon:
    """``python -m connector`` with discovery on, and its status through the CLI."""

    def __init__(self, work: Path, broker_url: str) -> None:
        self.control = str(work / "control.sock")
        config = work / "connector.toml"
        config.write_text(
            "[discovery]\n"
            'port_patterns = ["org.qpid.amqp.e2e-*"]\n'
            f'libvirt_status_dir = "{work}/no-libvirt"\n'
        )
        self.log = work / "daemon.log"
        argv = [
            sys.executable, "-m", "connector", "--config", str(config),
            "--broker", broker_url, "--discovery", "kvm,watch",
            "--watch", f"{work}/target/*/org.qpid.amqp.e2e-*",
            "--control-socket", self.control, "--log-level", "debug",
        ]  # fmt: skip
        with open(self.log, "a") as log_file:
            self.proc = subprocess.Popen(
                argv, stderr=log_file, env={**os.environ, "PYTHONPATH": str(REPO)}
            )

    def channels(self) -> list[dict[str, Any]]:
        """Rows from ``qpid-virtio-status --json``; empty while the daemon is not up."""
        result = subprocess.run(
            [sys.executable, "-m", "connector.status", "--json",
             "--control-socket", self.control],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        if result.returncode != 0:
            return []
        return list(json.loads(result.stdout)["channels"])

    def of_guest(self, guest: str) -> dict[str, dict[str, Any]]:
        return {row["port"]: row for row in self.channels() if row["guest"] == guest}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(params=["kvm", "tcg"])
def vm(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[FakeQemuProcess]:
    """A running fake VM with a unix-socket port and a pty port, guest ends in ``guests/``.

    kvm: found through KVM's uevent. tcg: no uevent; found through the directory watch.
    """
    if request.param == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    target = short_tmp / "target" / "domain-1-vme"
    target.mkdir(parents=True)
    (short_tmp / "guests").mkdir()
    fake = FakeQemuProcess(
        python_named_qemu(short_tmp),
        ["-name", "guest=vme,debug-threads=on", "-uuid", str(uuid.uuid4()), "-S",
         "-accel", request.param,
         "-chardev", f"socket,id=c0,path={target}/{PORTS[0]},server=on,wait=off",
         "-chardev", "pty,id=c1",
         "-device", f"virtserialport,chardev=c0,name={PORTS[0]}",
         "-device", f"virtserialport,chardev=c1,name={PORTS[1]}"],
        guest_dir=short_tmp / "guests",
    )  # fmt: skip
    yield fake
    fake.stop()


def _round_trip(guest_end: Path, queue: str) -> None:
    """One message out and back through the channel, as a guest application would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(guest_end))
        with GuestClient(sock.fileno(), timeout=STATE_TIMEOUT) as client:
            client.send(queue, [f"hello via {guest_end.name}"])
            assert client.receive(queue, 1)[0].body == f"hello via {guest_end.name}"


def test_daemon_discovers_routes_and_drops(
    artemis: Any, short_tmp: Path, vm: FakeQemuProcess
) -> None:
    daemon = Daemon(short_tmp, artemis.url)
    try:
        rows = wait_for(lambda: len(daemon.of_guest("vme")) == 2 and daemon.of_guest("vme"),
                        "both channels listed", START_TIMEOUT)  # fmt: skip
        assert rows[PORTS[0]]["kind"] == "unix"
        assert rows[PORTS[1]]["kind"] == "pty"
        for port in PORTS:
            _round_trip(short_tmp / "guests" / port, f"discovery.e2e.{port}")
        assert all(r["deliveries_in"] >= 1 for r in daemon.of_guest("vme").values())

        daemon.stop()  # a restarted connector picks up the running VM
        daemon = Daemon(short_tmp, artemis.url)
        wait_for(lambda: len(daemon.of_guest("vme")) == 2, "channels found again", START_TIMEOUT)
        _round_trip(short_tmp / "guests" / PORTS[0], "discovery.e2e.again")

        vm.command("exit")  # KVM: the VM is destroyed; both: qemu exits
        wait_for(
            lambda: {r["state"] for r in daemon.of_guest("vme").values()} == {"gone"},
            "channels gone after the VM ended",
        )
    finally:
        daemon.stop()
