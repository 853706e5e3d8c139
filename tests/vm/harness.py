"""Boot a real minimal Linux guest under qemu with virtio-serial ports, for end-to-end tests.

The guest (built by ``build_guest.sh``, cached outside the repo) boots Debian's kernel
through qboot, mounts a debootstrap root over 9p, and runs ``guest_agent.py``, which
executes Python snippets the test sends over a control port. The repo's
``connector/guest`` is shared into the guest, so the guest runs the project's real helper.

Each AMQP port is a ``virtserialport`` whose host side is a unix socket that qemu listens on
(``unix``), a pty (``pty``, its ``/dev/pts/N`` read back through QMP), or a unix socket that
qemu connects to and reconnects to every second (``unix-listen``: the connector listens, as
libvirt's ``mode='connect'``). There is no network device.

Accelerator: ``QVC_ACCEL`` (default ``tcg``; ``kvm`` where KVM can run guests — on the
project's machines ``/dev/kvm`` cannot).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import termios
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GUEST_PACKAGE = REPO / "connector" / "guest"
CACHE = Path(os.environ.get("QVC_CACHE", Path.home() / ".cache" / "qpid-virtio-connector")) / "vm"
QBOOT = Path("/usr/share/qemu/qboot.rom")
CTL_PORT = "org.qpid.test.ctl"

# Guest memory (MiB): python + proton + a 20 MB message fit comfortably; small keeps two
# VMs at once cheap on a 2-core, shared CI machine.
GUEST_MEMORY = 512
# From qemu start to the agent's "ready" line; TCG measured about 5 s, so this leaves room
# for a loaded CI machine without hiding a guest that never boots.
BOOT_TIMEOUT = 90.0
# How long the guest may take to power off after its agent exits.
SHUTDOWN_TIMEOUT = 30.0
# Default limit for one snippet run in the guest.
RUN_TIMEOUT = 120.0


class VmError(Exception):
    """The VM or its agent failed; the message ends with the console's last lines."""


def ensure_assets() -> Path:
    """Build the guest assets if they are missing (a no-op when the cache is complete)."""
    if not (CACHE / "STAMP").exists():
        subprocess.run(["bash", str(HERE / "build_guest.sh")], check=True)
    return CACHE


@dataclass
class Port:
    """One AMQP virtio-serial port: its guest-visible name and the host side's kind."""

    name: str
    kind: str  # "unix" (qemu listens on a socket), "pty" or "unix-listen" (qemu connects)
    path: str = ""  # host side: socket path or /dev/pts/N, known after start()
    id: str = ""


@dataclass
class Vm:
    """One qemu guest. ``start()``, then ``run(code)`` as often as needed, then ``stop()``."""

    name: str
    workdir: Path
    ports: list[Port] = field(default_factory=list)
    accel: str = field(default_factory=lambda: os.environ.get("QVC_ACCEL", "tcg"))
    # False: a guest reboot (or QMP system_reset) makes qemu exit, so a test is one boot.
    # True: the guest boots again and its agent says hello again (wait_ready once more).
    reboot: bool = False
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    first_byte_at: float = 0.0  # the guest's first byte on a virtio port (before proton)
    ready_at: float = 0.0  # the agent is ready: proton imported
    hello: dict[str, Any] = field(default_factory=dict)
    _ctl: socket.socket | None = None
    _buf: bytes = b""
    _ids: int = 0
    _short: str = ""

    # ---- lifecycle -----------------------------------------------------------------------

    def command(self) -> list[str]:
        """The qemu command line (public so a test can inspect or log it)."""
        assets = ensure_assets()
        w = self.workdir
        cmd = [
            "qemu-system-x86_64", "-name", f"guest={self.name}", "-accel", self.accel,
            "-M", "pc", "-m", str(GUEST_MEMORY), "-nodefaults", "-no-user-config",
            "-display", "none",
            "-bios", str(QBOOT), "-kernel", str(assets / "vmlinux"),
            "-initrd", str(assets / "initrd.cpio.gz"),
            "-append", "console=ttyS0 panic=-1 quiet",
            "-serial", f"file:{w / 'console.log'}",
            "-qmp", f"unix:{w / 'qmp.sock'},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
        ]  # fmt: skip
        if not self.reboot:
            cmd += ["-no-reboot"]
        if self.accel == "kvm":
            cmd += ["-cpu", "host"]
        ctl = Port(CTL_PORT, "unix", str(w / "ctl.sock"), "ctl")
        for i, port in enumerate([ctl, *self.ports]):
            port.id = port.id or f"p{i}"
            if port.kind in ("unix", "unix-listen"):
                # AMQP sockets are named amqp-*.sock so a discovery glob can tell them apart.
                prefix = "" if port is ctl else "amqp-"
                where = w if port.kind == "unix" else self.short_dir()
                port.path = port.path or str(where / f"{prefix}{port.id}.sock")
                server = "server=on,wait=off" if port.kind == "unix" else "server=off,reconnect=1"
                chardev = f"socket,id={port.id},path={port.path},{server}"
            elif port.kind == "pty":
                chardev = f"pty,id={port.id}"
            else:
                raise ValueError(f"unknown port kind {port.kind!r}")
            device = f"virtserialport,bus=vser0.0,chardev={port.id},name={port.name},id=vp{port.id}"
            cmd += ["-chardev", chardev, "-device", device]
        shares = [("root", assets / "root", True), ("qvc", GUEST_PACKAGE, True),
                  ("work", w / "share", False)]  # fmt: skip
        for tag, path, ro in shares:
            cmd += ["-fsdev", f"local,id=fs{tag},path={path},security_model=none"
                    + (",readonly=on" if ro else ""),
                    "-device", f"virtio-9p-pci,fsdev=fs{tag},mount_tag={tag}"]  # fmt: skip
        return cmd

    def short_dir(self) -> Path:
        """A directory with a short path, for the sockets qemu connects to.

        qemu 7.2 with ``-chardev socket,server=off,reconnect=1,path=P`` and a ``P`` of 41
        characters or more (35 was fine; measured) never boots the guest: its vCPU runs
        away through memory before the kernel prints anything. pytest's temporary
        directories are longer than that.
        """
        if not self._short:
            self._short = tempfile.mkdtemp(prefix="qvc-", dir="/tmp")
        return Path(self._short)

    def start(self) -> None:
        """Launch qemu and return at once; :meth:`wait_ready` waits for the guest agent."""
        (self.workdir / "share").mkdir(parents=True, exist_ok=True)
        (self.workdir / "share" / "main.py").write_text((HERE / "guest_agent.py").read_text())
        cmd = self.command()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / "qemu.log", "wb"),  # noqa: SIM115 (qemu owns it)
            stderr=subprocess.STDOUT,
        )
        self._ctl = self._connect_unix(str(self.workdir / "ctl.sock"))
        for port in self.ports:
            if port.kind == "pty":
                port.path = self._pty_path(port.id)

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> dict[str, Any]:
        """Wait for the agent's hello; returns it (guest uptime, proton import time)."""
        self._read_line(timeout, "the guest agent's first byte")
        self.first_byte_at = time.monotonic()
        self.hello = self._read_line(timeout, "the guest agent's ready line")
        self.ready_at = time.monotonic()
        return self.hello

    def boot(self) -> Vm:
        """start() then wait_ready(); returns self for chaining."""
        self.start()
        self.wait_ready()
        return self

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT) -> int:
        """Ask the agent to exit (the guest powers off); kill qemu if it lingers."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None and self._ctl is not None:
            try:
                self._send({"id": self._next_id(), "exit": True})
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        return self.kill()

    def kill(self) -> int:
        """SIGKILL qemu (if still running) and release the host-side resources."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait() if self.proc is not None else 0
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._short:
            shutil.rmtree(self._short, ignore_errors=True)
            self._short = ""
        return rc

    # ---- running code in the guest -------------------------------------------------------

    def submit(self, code: str, **params: Any) -> int:
        """Send a snippet for the guest to run; collect it with :meth:`result`."""
        cid = self._next_id()
        self._send({"id": cid, "code": code, "params": params})
        return cid

    def result(self, cid: int, timeout: float = RUN_TIMEOUT) -> Any:
        """The ``result`` of snippet ``cid``; raises VmError with the guest's traceback."""
        reply = self._read_line(timeout, f"the result of snippet {cid}")
        if reply.get("id") != cid:
            raise VmError(f"out-of-order reply {reply!r} (wanted {cid})")
        if not reply["ok"]:
            raise VmError(f"guest snippet failed:\n{reply['error']}")
        return reply["result"]

    def run(self, code: str, timeout: float = RUN_TIMEOUT, **params: Any) -> Any:
        """Run a snippet in the guest and return its ``result``."""
        return self.result(self.submit(code, **params), timeout)

    def console(self) -> str:
        """The guest's serial console so far (kernel messages, init's lines)."""
        try:
            return (self.workdir / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qmp(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on a fresh QMP session and return its ``return`` value."""
        with self.qmp_session() as session:
            return session.execute(execute, arguments)

    def qmp_session(self) -> Qmp:
        """A QMP session of its own, for commands whose effect is told by a later event."""
        return Qmp(self._connect_unix(str(self.workdir / "qmp.sock")), self._fail)

    # ---- internals -----------------------------------------------------------------------

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _fail(self, message: str) -> VmError:
        tail = "\n".join(self.console().splitlines()[-25:])
        return VmError(f"{self.name}: {message}\n--- console tail ---\n{tail}")

    def _connect_unix(self, path: str) -> socket.socket:
        """Connect to a socket qemu is about to create (it appears shortly after start)."""
        deadline = time.monotonic() + 20.0
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if self.proc is not None and self.proc.poll() is not None:
                    log = (self.workdir / "qemu.log").read_text(errors="replace")
                    raise self._fail(f"qemu exited with {self.proc.returncode}: {log}") from None
                if time.monotonic() > deadline:
                    raise self._fail(f"qemu never created {path}") from None
                time.sleep(0.02)  # no event tells us qemu created the socket; poll it

    def _pty_path(self, chardev_id: str) -> str:
        for dev in self.qmp("query-chardev"):
            if dev["label"] == chardev_id:
                return str(dev["filename"]).removeprefix("pty:")
        raise self._fail(f"QMP has no chardev {chardev_id}")

    def _send(self, obj: dict[str, Any]) -> None:
        assert self._ctl is not None
        self._ctl.sendall(json.dumps(obj).encode() + b"\n")

    def _read_line(self, timeout: float, what: str) -> dict[str, Any]:
        assert self._ctl is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"timed out after {timeout:.0f} s waiting for {what}")
            readable, _, _ = select.select([self._ctl], [], [], min(left, 1.0))
            if not readable:
                if self.proc is not None and self.proc.poll() is not None:
                    raise self._fail(f"qemu exited ({self.proc.returncode}) before {what}")
                continue
            data = self._ctl.recv(65536)
            if not data:
                raise self._fail(f"control port closed before {what}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


class Qmp:
    """One QMP session: commands, and the events qemu sends meanwhile, kept for
    :meth:`wait_event` (``device_del`` is done only when ``DEVICE_DELETED`` comes)."""

    def __init__(self, sock: socket.socket, fail: Callable[[str], VmError]) -> None:
        self._sock = sock
        self._buf = b""
        self._fail = fail
        self.events: list[dict[str, Any]] = []
        self._read(RUN_TIMEOUT)  # greeting
        self.execute("qmp_capabilities")

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def execute(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; return its ``return`` value, raise VmError on its error."""
        cmd: dict[str, Any] = {"execute": execute}
        if arguments:
            cmd["arguments"] = arguments
        self._sock.sendall(json.dumps(cmd).encode() + b"\n")
        while True:
            reply = self._read(RUN_TIMEOUT)
            if reply is None:
                raise self._fail(f"QMP {execute}: no answer in {RUN_TIMEOUT:.0f} s")
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise self._fail(f"QMP {execute}: {reply['error']}")
            else:
                return reply["return"]

    def wait_event(self, name: str, timeout: float, **data: Any) -> dict[str, Any]:
        """The first event called ``name`` whose data holds ``data`` (seen before or after
        this call); raise VmError if none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name and data.items() <= event.get("data", {}).items():
                    self.events.remove(event)
                    return event
            event = self._read(deadline - time.monotonic())
            if event is None:
                raise self._fail(f"no QMP event {name} {data} in {timeout:.0f} s")
            self.events.append(event)

    def _read(self, timeout: float) -> dict[str, Any] | None:
        """The next message from qemu, or None if none comes within ``timeout``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                return None
            data = self._sock.recv(65536)
            if not data:
                raise self._fail("QMP closed its socket")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


def open_host_side(port: Port) -> int:
    """Open a port's host end as the connector would: connect the socket, or open the pty
    slave in raw mode (no echo, no line editing: the pty must pass bytes untouched)."""
    if port.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(port.path)
        sock.setblocking(False)
        return sock.detach()
    fd = os.open(port.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd, termios.TCSANOW)
    return fd
