"""Discovery against real qemu processes (no guest OS: discovery needs only qemu's side).

- ``-accel kvm -S``: qemu creates a real VM (the uevent) and stays paused, which works even
  here where KVM cannot run a guest. The pty mapping is checked against qemu's own answer
  (QMP ``query-chardev``).
- ``-accel tcg``: no uevent at all; the socket appearing under the watched directory leads
  discovery to the qemu process.
- Start-up scan: qemu first, discovery second.
- A qemu run by hand: chardevs and ports from ``-readconfig`` and ``-set``, relative paths,
  and ``-daemonize``, which has moved it to ``/`` before the scan meets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from discovery_helpers import LOG, WAIT_SECONDS, RecordingSink, short_tmp, wait_for_path

from connector.discovery import Discovery
from connector.discovery.settings import DiscoverySettings
from connector.identity import ChannelKind

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")
UUID = "5b0c0a4e-8f1d-4c0e-9d7a-1f2e3d4c5b6a"
__all__ = ["short_tmp"]  # a fixture, used by name


def _qemu_args(base: Path, accel: str, name: str) -> list[str]:
    """A guestless microvm: the fastest machine to start that has virtio-serial."""
    target = base / "target" / f"domain-1-{name}"
    target.mkdir(parents=True, exist_ok=True)
    return [
        str(QEMU), "-accel", accel, "-machine", "microvm", "-S",
        "-display", "none", "-nodefaults", "-no-user-config",
        "-name", f"guest={name},debug-threads=on", "-uuid", UUID,
        "-qmp", f"unix:{base}/qmp.sock,server=on,wait=off",
        "-chardev", "pty,id=charserial0",
        "-chardev", f"socket,id=c0,path={target}/org.qpid.amqp.0,server=on,wait=off",
        "-chardev", "pty,id=c1",
        "-chardev", f"socket,id=c2,path={base}/{name}-listen.sock,server=off,reconnect=1",
        "-device", "virtio-serial-device",
        "-device", "virtserialport,chardev=c0,name=org.qpid.amqp.0",
        "-device", '{"driver":"virtserialport","chardev":"c1","name":"org.qpid.amqp.1"}',
        "-device", "virtserialport,chardev=c2,name=org.qpid.amqp.2",
    ]  # fmt: skip


@pytest.fixture
def qemus() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _start(args: list[str], started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started.append(proc)
    return proc


def _settings(base: Path, sources: set[str]) -> DiscoverySettings:
    return DiscoverySettings(
        sources=frozenset(sources),
        watch_globs=(f"{base}/target/*/org.qpid.amqp.*",),
        libvirt_status_dir=str(base / "no-libvirt"),
    )


def _qmp(path: str, command: str, arguments: dict[str, str] | None = None) -> object:
    """One QMP command's answer from qemu itself."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT_SECONDS)
        sock.connect(path)
        stream = sock.makefile("rwb")
        stream.readline()  # greeting
        requests = [{"execute": "qmp_capabilities"}, {"execute": command}]
        if arguments:
            requests[1]["arguments"] = arguments  # type: ignore[assignment]
        for request in requests:
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            while "return" not in (reply := json.loads(stream.readline())):
                pass  # an asynchronous event
        return reply["return"]


def _qmp_ptys(path: str) -> dict[str, str]:
    """qemu's own view: chardev label -> /dev/pts/N (``query-chardev``)."""
    chardevs = _qmp(path, "query-chardev")
    assert isinstance(chardevs, list)
    return {
        c["label"]: c["filename"].removeprefix("pty:")
        for c in chardevs
        if c["filename"].startswith("pty:")
    }


def _accept_once(path: str) -> None:
    """Listen where a ``server=off`` chardev points and wait for qemu to connect."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(WAIT_SECONDS)
        conn, _ = listener.accept()
        conn.close()


@pytest.mark.skipif(not os.access("/dev/kvm", os.W_OK), reason="needs /dev/kvm")
def test_real_qemu_with_kvm(short_tmp: Path, qemus: list[subprocess.Popen[bytes]]) -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        discovery = Discovery(_settings(short_tmp, {"kvm"}), sink, asyncio.get_running_loop(), LOG)
        discovery.start()
        try:
            proc = _start(_qemu_args(short_tmp, "kvm", "rq1"), qemus)
            await sink.wait_for(lambda: len(sink.of_pid(proc.pid)) == 3 or proc.poll() is not None)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            specs = {s.identity.port: s for s in sink.of_pid(proc.pid).values()}
            assert {
                (s.identity.name, s.identity.uuid, s.identity.found_by) for s in specs.values()
            } == {("rq1", UUID, "cmdline")}
            assert specs["org.qpid.amqp.0"].kind is ChannelKind.UNIX
            assert specs["org.qpid.amqp.1"].kind is ChannelKind.PTY
            assert specs["org.qpid.amqp.2"].kind is ChannelKind.UNIX_LISTEN
            ptys = await asyncio.to_thread(_qmp_ptys, f"{short_tmp}/qmp.sock")
            assert specs["org.qpid.amqp.1"].path == ptys["c1"]  # qemu agrees on the pty
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(specs["org.qpid.amqp.0"].path)  # qemu accepts on its socket
            # qemu's server=off chardev connects to the path within its reconnect interval.
            await asyncio.to_thread(_accept_once, specs["org.qpid.amqp.2"].path)
            proc.terminate()
            await sink.wait_for(lambda: not sink.of_pid(proc.pid))
        finally:
            discovery.stop()

    asyncio.run(scenario())


def test_real_qemu_tcg_found_through_the_watch(
    short_tmp: Path, qemus: list[subprocess.Popen[bytes]]
) -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        discovery = Discovery(
            _settings(short_tmp, {"watch"}), sink, asyncio.get_running_loop(), LOG
        )
        discovery.start()
        try:
            proc = _start(_qemu_args(short_tmp, "tcg", "tcg1"), qemus)
            await sink.wait_for(lambda: len(sink.of_pid(proc.pid)) == 3)
            specs = {s.identity.port: s for s in sink.of_pid(proc.pid).values()}
            assert {s.identity.found_by for s in specs.values()} == {"cmdline"}
            assert specs["org.qpid.amqp.0"].path.endswith("/domain-1-tcg1/org.qpid.amqp.0")
            proc.terminate()
            await sink.wait_for(lambda: not sink.of_pid(proc.pid))
            assert discovery.stats()["processes_watch"] >= 1
        finally:
            discovery.stop()

    asyncio.run(scenario())


def test_startup_scan_finds_running_qemu(
    short_tmp: Path, qemus: list[subprocess.Popen[bytes]]
) -> None:
    proc = _start(_qemu_args(short_tmp, "tcg", "early"), qemus)
    wait_for_path(short_tmp / "target" / "domain-1-early" / "org.qpid.amqp.0")

    async def scenario() -> None:
        sink = RecordingSink()
        discovery = Discovery(
            _settings(short_tmp, {"kvm", "watch"}), sink, asyncio.get_running_loop(), LOG
        )
        discovery.start()
        try:
            assert sorted(s.identity.port for s in sink.of_pid(proc.pid).values()) == [
                "org.qpid.amqp.0",
                "org.qpid.amqp.1",
                "org.qpid.amqp.2",
            ]
            proc.kill()
            await sink.wait_for(lambda: not sink.of_pid(proc.pid))
        finally:
            discovery.stop()

    asyncio.run(scenario())


# What someone running qemu by hand might keep in a file next to the VM's disk.
BY_HAND_CFG = """# a guest with two AMQP channels
[name]
  guest = "by-hand"

[chardev "c0"]
  backend = "socket"
  path = "changed-by-set.sock"
  server = "on"
  wait = "off"

[chardev "c1"]
  backend = "pty"

[device "vs"]
  driver = "virtio-serial-device"

[device "p0"]
  driver = "virtserialport"
  chardev = "c0"
  name = "org.qpid.amqp.0"

[device "p1"]
  driver = "virtserialport"
  chardev = "c1"
  name = "org.qpid.amqp.1"
"""


@pytest.fixture
def daemons() -> Iterator[list[int]]:
    """Pids of daemonized qemus (not this process's children) to kill at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_real_qemu_by_hand_with_readconfig_set_and_daemonize(
    short_tmp: Path, daemons: list[int]
) -> None:
    vm = short_tmp / "vm"
    vm.mkdir()
    (vm / "vm.cfg").write_text(BY_HAND_CFG)
    # qemu connects to a relative server=off path from where it is at each attempt: from /
    # after -daemonize. A name of this test's own, as other suites run qemu here too.
    listen = f"{short_tmp.name}-listen.sock"
    args = [
        str(QEMU), "-accel", "tcg", "-machine", "microvm", "-S",
        "-display", "none", "-nodefaults", "-no-user-config",
        "-readconfig", "vm.cfg",
        "-set", "device.p0.name=org.qpid.amqp.5",
        "-set", "chardev.c0.path=amqp.sock",
        "-chardev", f"socket,id=c2,path={listen},server=off,reconnect=1",
        "-device", "virtserialport,id=p2,chardev=c2,name=org.qpid.amqp.2",
        "-qmp", "unix:qmp.sock,server=on,wait=off",
        "-daemonize", "-pidfile", "qemu.pid",
    ]  # fmt: skip
    # As from a shell that ran ``cd vm && qemu ...``, which sets PWD.
    env = {**os.environ, "PWD": str(vm)}
    started = subprocess.run(args, cwd=vm, env=env, capture_output=True, timeout=WAIT_SECONDS)
    assert started.returncode == 0, started.stderr
    pid = int((vm / "qemu.pid").read_text())
    daemons.append(pid)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"  # the premise: a later look sees /

    async def scenario() -> None:
        sink = RecordingSink()
        discovery = Discovery(_settings(short_tmp, {"kvm"}), sink, asyncio.get_running_loop(), LOG)
        discovery.start()
        try:
            specs = {s.identity.port: s for s in sink.of_pid(pid).values()}
        finally:
            discovery.stop()
        assert {p: (s.kind, s.identity.name) for p, s in specs.items()} == {
            "org.qpid.amqp.5": (ChannelKind.UNIX, "by-hand"),
            "org.qpid.amqp.1": (ChannelKind.PTY, "by-hand"),
            "org.qpid.amqp.2": (ChannelKind.UNIX_LISTEN, "by-hand"),
        }
        assert specs["org.qpid.amqp.5"].path == f"{vm}/amqp.sock"
        assert specs["org.qpid.amqp.2"].path == f"/{listen}"
        # qemu's own answers: the pty it opened, and the name -set gave the port.
        qmp = f"{vm}/qmp.sock"
        assert specs["org.qpid.amqp.1"].path == (await asyncio.to_thread(_qmp_ptys, qmp))["c1"]
        name = {"path": "/machine/peripheral/p0", "property": "name"}
        assert await asyncio.to_thread(_qmp, qmp, "qom-get", name) == "org.qpid.amqp.5"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(specs["org.qpid.amqp.5"].path)  # qemu accepts on its socket
        if os.access("/", os.W_OK):  # the connector's user needs this too: see the docs
            try:
                await asyncio.to_thread(_accept_once, specs["org.qpid.amqp.2"].path)
            finally:
                os.unlink(specs["org.qpid.amqp.2"].path)

    asyncio.run(scenario())
