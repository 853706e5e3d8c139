"""Shared pieces of the discovery integration tests: a recording sink, the fake qemu, and
libvirt status files written the way libvirtd writes them.

Other suites may run real qemu processes on the same machine at the same time, and
discovery rightly reports those too: tests look only at the paths and pids they made.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connector.discovery.settings import DiscoverySettings
from connector.identity import ChannelSpec

FAKE_QEMU = Path(__file__).with_name("fake_qemu.py")
LOG = logging.getLogger("test.discovery")
NEEDS_KVM = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm for KVM_CREATE_VM"
)
# Long enough for a loaded 2-core CI machine; every wait ends as soon as its condition holds.
WAIT_SECONDS = 10.0


def kvm_settings(status_dir: Path, **overrides: object) -> DiscoverySettings:
    """Settings for a test of the KVM path: no directory watch unless asked for."""
    values: dict[str, object] = {
        "sources": frozenset({"kvm"}),
        "libvirt_status_dir": str(status_dir),
        "watch_globs": (),
    }
    values.update(overrides)
    return DiscoverySettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: a unix socket path must fit in 108 bytes,
    and pytest's ``tmp_path`` plus libvirt's directory layout does not."""
    path = Path(tempfile.mkdtemp(prefix="qvd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[Any]]]:
    """Processes a test starts (a qemu, or a process standing for one): killed and reaped
    when the test ends, however it ends."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Record:
    """One sink call: ``appeared`` (with its spec) or ``gone`` (with its reason)."""

    what: str
    path: str
    spec: ChannelSpec | None
    reason: str | None
    at: float  # time.monotonic()


class RecordingSink:
    """A ``DiscoverySink`` that remembers every call and wakes waiters on each."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._changed = asyncio.Event()

    def channel_appeared(self, spec: ChannelSpec) -> None:
        self.records.append(Record("appeared", spec.path, spec, None, time.monotonic()))
        self._changed.set()

    def channel_gone(self, path: str, reason: str) -> None:
        self.records.append(Record("gone", path, None, reason, time.monotonic()))
        self._changed.set()

    def live(self, under: str | None = None) -> dict[str, ChannelSpec]:
        """Channels reported and not gone since, optionally only those under a path."""
        current: dict[str, ChannelSpec] = {}
        for record in self.records:
            if record.spec is not None:
                current[record.path] = record.spec
            else:
                current.pop(record.path, None)
        return {p: s for p, s in current.items() if under is None or p.startswith(under)}

    def of_pid(self, pid: int) -> dict[str, ChannelSpec]:
        """Live channels that belong to qemu process ``pid``."""
        return {p: s for p, s in self.live().items() if s.identity.pid == pid}

    def gone(self, path: str) -> list[str]:
        """The reasons given each time ``path`` went."""
        return [r.reason or "" for r in self.records if r.path == path and r.spec is None]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
        """Wait until ``condition()`` holds, re-checking after every sink call."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"condition not met in {timeout}s; records: {self.records}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue


async def poll_until(condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
    """For conditions no callback announces (counters): look again every few ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        await asyncio.sleep(0.005)


def wait_for_path(path: Path) -> None:
    """Block until ``path`` exists (a socket qemu binds as it starts)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def python_named_qemu(directory: Path) -> Path:
    """A copy of the Python binary named ``qemu-system-x86_64``.

    ``/proc/PID/exe`` resolves symlinks, so a symlink would still read ``python3.11`` and
    fail discovery's executable check; a copy (or a hard link) keeps the name.
    """
    target = directory / "qemu-system-x86_64"
    if not target.exists():
        shutil.copy2(os.path.realpath(sys.executable), target)
    return target


class FakeQemuProcess:
    """A running ``fake_qemu.py``: its pid, its commands, and its VM creation stamps."""

    def __init__(
        self,
        executable: Path | str,
        args: list[str],
        guest_dir: Path | None = None,
        hold: bool = False,
        pass_fds: tuple[int, ...] = (),
        cwd: Path | None = None,
        user: int | None = None,
    ) -> None:
        env = dict(os.environ, PYTHONHOME=sys.base_prefix, PYTHONDONTWRITEBYTECODE="1")
        if user is not None:
            env["PYTHONHOME"] = "/usr"  # another user runs a copy of the system's Python
        if guest_dir is not None:
            env["FAKE_QEMU_GUEST_DIR"] = str(guest_dir)  # relay mode: see fake_qemu.py
        if hold:
            env["FAKE_QEMU_HOLD"] = "1"  # opens nothing until ``command("go")``
        self.proc = subprocess.Popen(
            [str(executable), str(FAKE_QEMU), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            pass_fds=pass_fds,  # as libvirt passes its listening sockets (``fd=N``)
            cwd=cwd,
            user=user,
        )
        self.pid = self.proc.pid
        self.ptys: dict[str, str] = {}  # chardev id -> /dev/pts/N, as the helper reports

    def created_at(self) -> float:
        """The monotonic time just before the next ``KVM_CREATE_VM`` (blocks for its line)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            words = line.split()
            if words and words[0] == "created":
                return float(words[1])
            if words and words[0] == "pty":
                self.ptys[words[1]] = words[2]
        raise AssertionError("fake qemu exited before creating a VM")

    def command(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def create_vms(count: int) -> None:
    """Create and close ``count`` VMs from a process that is not qemu: ``2 * count`` real
    uevents that discovery must read and pass over."""
    script = (
        "import fcntl, os\n"
        "kvm = os.open('/dev/kvm', os.O_RDWR)\n"
        f"for _ in range({count}):\n"
        "    os.close(fcntl.ioctl(kvm, 0xAE01, 0))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def ask_unix(path: str, payload: bytes) -> bytes:
    """Connect to a ``server=on`` chardev, send, and return the fake qemu's answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(payload)
        return sock.recv(4096)


def ask_pty(path: str, payload: bytes) -> bytes:
    """Open a pty chardev's ``/dev/pts/N``, send, and return the answer."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)  # no echo, no line buffering: the bytes as they are
        os.write(fd, payload)
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def ask_listen(path: str, payload: bytes) -> bytes:
    """Be the listener qemu's ``server=off`` chardev connects to, as the daemon would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(5)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            conn.sendall(payload)
            return conn.recv(4096)


def status_xml(
    name: str, uuid: str, pid: int, channels: list[tuple[str, str, str, str | None]]
) -> str:
    """A status file as libvirtd writes it; channels are (type, port, path, unix mode)."""
    devices = []
    for index, (kind, port, path, mode) in enumerate(channels):
        source = f"<source mode='{mode}' path='{path}'/>" if mode else f"<source path='{path}'/>"
        tty = f" tty='{path}'" if kind == "pty" else ""
        devices.append(
            f"""      <channel type='{kind}'{tty}>
        {source}
        <target type='virtio' name='{port}' state='disconnected'/>
        <alias name='channel{index}'/>
        <address type='virtio-serial' controller='0' bus='0' port='{index + 1}'/>
      </channel>"""
        )
    channel_xml = "\n".join(devices)
    return f"""<domstatus state='running' reason='booted' pid='{pid}'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-1-{name}/monitor.sock' type='unix'/>
  <vcpus>
    <vcpu id='0' pid='{pid + 1}'/>
  </vcpus>
  <qemuCaps>
    <flag name='kvm'/>
  </qemuCaps>
  <devices>
    <device alias='virtio-serial0'/>
  </devices>
  <libDir path='/var/lib/libvirt/qemu/domain-1-{name}'/>
  <channelTargetDir path='/var/lib/libvirt/qemu/channel/target/domain-1-{name}'/>
  <domain type='kvm' id='1'>
    <name>{name}</name>
    <uuid>{uuid}</uuid>
    <memory unit='KiB'>131072</memory>
    <os>
      <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    </os>
    <devices>
      <emulator>/usr/bin/qemu-system-x86_64</emulator>
      <controller type='virtio-serial' index='0'>
        <alias name='virtio-serial0'/>
      </controller>
{channel_xml}
    </devices>
  </domain>
</domstatus>
"""


def write_status(
    directory: Path,
    name: str,
    uuid: str,
    pid: int,
    channels: list[tuple[str, str, str, str | None]],
) -> Path:
    """Write ``status_xml(...)`` as libvirtd does: a temporary file renamed over NAME.xml."""
    path = directory / f"{name}.xml"
    tmp = directory / f"{name}.xml.new"
    tmp.write_text(status_xml(name, uuid, pid, channels))
    os.rename(tmp, path)
    return path
