"""A stand-in for qemu that discovery cannot tell from the real thing, minus the guest.

Run as ``fake_qemu.py -name guest=vm1 -uuid U -chardev ... -device virtserialport,...``
(qemu's own option spellings, so ``/proc/PID/cmdline`` reads like qemu's). Like qemu it
first creates its chardevs, in command-line order: a listening unix socket for
``socket,path=P,server=on``, a unix socket that connects out every ``reconnect`` seconds
for ``server=off``, and a ``/dev/ptmx`` master for ``pty``. Then it issues the real
``KVM_CREATE_VM`` ioctl, so the kernel sends the ``misc/kvm`` ``EVENT=create`` uevent
(unless given ``-accel tcg``: then it is a guest without KVM, and sends none).

Whatever arrives on a chardev is echoed back prefixed with the port name (``PORT:``), so a
test can prove which endpoint belongs to which port. With ``FAKE_QEMU_GUEST_DIR=DIR`` in
the environment it plays the guest's half instead: each port is a unix socket ``DIR/PORT``
(the guest's ``/dev/virtio-ports/PORT``) whose bytes are relayed to and from the chardev,
held while the other side is absent, as qemu does. Commands on stdin, one a line:
``destroy`` (close the VM: ``EVENT=destroy``), ``create`` (a new VM), ``exit``; with
``FAKE_QEMU_HOLD=1`` it first waits for one line before it opens anything. Each
``create`` prints ``created MONOTONIC`` (the clock just before the ioctl) on stdout, and
each pty chardev ``pty ID /dev/pts/N`` when it is opened.

Standard library only: this file must run under a copy of the Python binary named
``qemu-system-x86_64``, without the project's environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import selectors
import socket
import sys
import time
import tty

KVM_CREATE_VM = 0xAE01
_READ = 65536
# A pty master reads EIO while no one holds the slave; qemu polls it again later too.
PTY_RETRY_SECONDS = 0.1


def keyval(text: str, implied: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(text.replace(",,", "\0").split(",")):
        key, sep, value = item.replace("\0", ",").partition("=")
        if sep:
            out[key] = value
        elif i == 0:
            out[implied] = key
        else:
            out[key] = "on"
    return out


class FakeQemu:
    def __init__(self, argv: list[str]) -> None:
        self.sel = selectors.DefaultSelector()
        # With ``-accel tcg`` it plays a guest without KVM: no VM, so no uevent at all.
        tcg = any(a == "-accel" and v == "tcg" for a, v in itertools.pairwise(argv))
        self.kvm = None if tcg else os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.vm: int | None = None
        self.chardevs: list[dict[str, str]] = []
        self.port_of: dict[str, str] = {}  # chardev id -> port name
        # Only -chardev and -device matter here; other options may or may not take a value.
        for option, value in zip(argv, [*argv[1:], ""], strict=True):
            if option == "-chardev":
                self.chardevs.append(keyval(value, "backend"))
            elif option == "-device":
                dev = json.loads(value) if value.startswith("{") else keyval(value, "driver")
                if dev.get("driver") == "virtserialport":
                    self.port_of[dev["chardev"]] = dev.get("name", "")
        self.outgoing: list[tuple[str, str, float]] = []  # (id, path, reconnect)
        self.idle_ptys: list[tuple[str, int, float]] = []  # (id, master, idle since)
        self.host: dict[str, int] = {}  # chardev id -> the host side's fd, when connected
        self.guest: dict[str, socket.socket] = {}  # chardev id -> the guest's connection
        self.held: dict[tuple[str, str], bytearray] = {}  # (id, "host"|"guest") -> bytes
        self.guest_dir = os.environ.get("FAKE_QEMU_GUEST_DIR")
        self.stdin = bytearray()  # what stdin sent that is not a whole command yet
        if os.environ.get("FAKE_QEMU_HOLD"):
            self.command()  # a qemu still starting: no chardev, no VM until told
        for chardev in self.chardevs:
            self.open_chardev(chardev)
        if self.guest_dir:
            for cid, port in self.port_of.items():
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(os.path.join(self.guest_dir, port))
                listener.listen(1)
                self.sel.register(listener, selectors.EVENT_READ, ("guest-listener", cid, listener))

    def open_chardev(self, chardev: dict[str, str]) -> None:
        cid = chardev["id"]
        if chardev["backend"] == "pty":
            master, slave = os.openpty()
            print(f"pty {cid} {os.ttyname(slave)}", flush=True)  # qemu says as much on stderr
            tty.setraw(slave)  # as qemu does: the bytes pass unchanged
            os.close(slave)  # qemu keeps only the master
            self.idle_ptys.append((cid, master, 0.0))
            self.host[cid] = master
        elif "fd" in chardev:
            pass  # a socket libvirt would have passed in: nothing of ours to open
        elif chardev["backend"] == "socket" and chardev.get("server", "off") == "on":
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(chardev["path"])  # as qemu does: a socket left by a qemu before
            listener.bind(chardev["path"])
            listener.listen(1)
            self.sel.register(listener, selectors.EVENT_READ, ("listener", cid, listener))
        elif chardev["backend"] == "socket":
            reconnect = float(chardev.get("reconnect", "1"))
            self.outgoing.append((cid, chardev["path"], reconnect))

    def create(self) -> None:
        stamp = time.monotonic()
        if self.kvm is not None:
            self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        print(f"created {stamp:.6f}", flush=True)

    def destroy(self) -> None:
        if self.vm is not None:
            os.close(self.vm)
            self.vm = None
        print("destroyed", flush=True)

    def try_connect(self) -> None:
        for cid, path, _ in list(self.outgoing):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                continue
            self.outgoing = [o for o in self.outgoing if o[0] != cid]
            self.host_connected(cid, sock)

    def command(self) -> str:
        """The next command line (``exit`` at end of input), read from the descriptor:
        sys.stdin would keep a second command, sent right after the first, in a buffer
        that select() does not see."""
        while b"\n" not in self.stdin:
            data = os.read(sys.stdin.fileno(), 4096)
            if not data:
                return "exit"
            self.stdin += data
        line, _, rest = bytes(self.stdin).partition(b"\n")
        self.stdin = bytearray(rest)
        return line.decode().strip() or "exit"

    def run(self) -> None:
        self.sel.register(sys.stdin, selectors.EVENT_READ, ("stdin", "", None))
        self.create()
        while True:
            while b"\n" in self.stdin:  # commands that came with the one before
                if not self.obey(self.command()):
                    return
            self.try_connect()
            now, still_idle = time.monotonic(), []
            for cid, master, since in self.idle_ptys:
                if now - since >= PTY_RETRY_SECONDS:
                    self.sel.register(master, selectors.EVENT_READ, ("stream", cid, master))
                else:
                    still_idle.append((cid, master, since))
            self.idle_ptys = still_idle
            timeouts = [o[2] for o in self.outgoing]
            for key, _ in self.sel.select(min([*timeouts, PTY_RETRY_SECONDS])):
                kind, cid, obj = key.data
                if kind == "stdin":
                    if not self.obey(self.command()):
                        return
                elif kind == "listener":
                    self.host_connected(cid, obj.accept()[0])
                elif kind == "guest-listener":
                    conn = obj.accept()[0]
                    self.guest[cid] = conn
                    self.sel.register(conn, selectors.EVENT_READ, ("guest", cid, conn))
                    self.deliver(cid, "guest", b"")
                elif kind == "guest":
                    self.from_guest(cid, obj)
                else:
                    self.from_host(cid, obj)

    def obey(self, command: str) -> bool:
        """Carry out one command; False for ``exit``."""
        if command == "exit":
            return False
        getattr(self, command)()
        return True

    def host_connected(self, cid: str, sock: socket.socket) -> None:
        self.host[cid] = sock.fileno()
        self.sel.register(sock, selectors.EVENT_READ, ("stream", cid, sock))
        self.deliver(cid, "host", b"")

    def deliver(self, cid: str, to: str, data: bytes) -> None:
        """Write to one side, or hold the bytes until that side is there."""
        held = self.held.setdefault((cid, to), bytearray())
        held += data
        if to == "guest" and cid in self.guest:
            self.guest[cid].sendall(held)
            held.clear()
        elif to == "host" and cid in self.host and held:
            os.write(self.host[cid], held)
            held.clear()

    def from_guest(self, cid: str, conn: socket.socket) -> None:
        data = conn.recv(_READ)
        if data:
            self.deliver(cid, "host", data)
            return
        self.sel.unregister(conn)  # the guest closed its port: the host sees nothing
        conn.close()
        del self.guest[cid]

    def from_host(self, cid: str, obj: socket.socket | int) -> None:
        fd = obj if isinstance(obj, int) else obj.fileno()
        try:
            data = os.read(fd, _READ)
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(obj)
            if isinstance(obj, socket.socket):
                del self.host[cid]
                obj.close()
            else:
                self.idle_ptys.append((cid, obj, time.monotonic()))
            return
        if self.guest_dir:
            self.deliver(cid, "guest", data)
        else:
            os.write(fd, self.port_of.get(cid, cid).encode() + b":" + data)


if __name__ == "__main__":
    FakeQemu(sys.argv[1:]).run()
