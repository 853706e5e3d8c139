"""From a pid to channel specs, against a fake /proc and a fake libvirt status directory."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import connector.discovery.resolve
from connector.discovery.access import CAP_DAC_READ_SEARCH
from connector.discovery.fdinfo import pty_indices, unix_socket_path
from connector.discovery.held import QemuSockets
from connector.discovery.qemu import Chardev, QemuCommandLine, SerialPort, parse_cmdline
from connector.discovery.reading import read_regular_file
from connector.discovery.resolve import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_FILES,
    Distrust,
    distrust,
    exe_name,
    find_status,
    is_qemu,
    qemu_pids,
    resolve_pid,
    specs_from_cmdline,
)
from connector.discovery.settings import DiscoverySettings
from connector.discovery.startdir import StartDir
from connector.identity import ChannelKind, ChannelSpec, GuestIdentity

NET_UNIX_HEADER = "Num       RefCount Protocol Flags    Type St Inode Path\n"
ALL_CAPS = 0x000001FFFFFFFFFF  # CapEff of a root process (Linux 6.x)


class FakeProc:
    """Just enough of /proc/PID for discovery: exe, cmdline, fd, fdinfo, net/unix."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def process(
        self,
        pid: int,
        exe: str,
        argv: list[str],
        uid: int = 0,
        groups: tuple[int, ...] = (),
        caps: int | None = None,
    ) -> Path:
        """A process run by ``uid`` (its group the same number) in ``groups``, with
        effective capabilities ``caps``: by default all for root, none for anyone else."""
        base = self.root / str(pid)
        (base / "fd").mkdir(parents=True)
        (base / "fdinfo").mkdir()
        (base / "net").mkdir()
        os.symlink(exe, base / "exe")
        (base / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        (base / "net" / "unix").write_text(NET_UNIX_HEADER)
        uids = "\t".join([str(uid)] * 4)  # real, effective, saved, file system
        if caps is None:
            caps = ALL_CAPS if uid == 0 else 0
        (base / "status").write_text(
            f"Name:\tqemu\nPid:\t{pid}\nUid:\t{uids}\nGid:\t{uids}\n"
            f"Groups:\t{' '.join(map(str, groups))} \nCapEff:\t{caps:016x}\n"
        )
        return base

    def ptmx(self, pid: int, fd: int, index: int) -> None:
        base = self.root / str(pid)
        os.symlink("/dev/ptmx", base / "fd" / str(fd))
        (base / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t0100002\ntty-index:\t{index}\n")

    def socket(self, pid: int, fd: int, inode: int, path: str) -> None:
        base = self.root / str(pid)
        os.symlink(f"socket:[{inode}]", base / "fd" / str(fd))
        with (base / "net" / "unix").open("a") as f:
            f.write(f"0000000000000000: 00000002 00000000 00010000 0001 01 {inode} {path}\n")

    def other_fd(self, pid: int, fd: int, target: str) -> None:
        os.symlink(target, self.root / str(pid) / "fd" / str(fd))

    def real_socket(self, pid: int, fd: int, sock: socket.socket) -> None:
        """A descriptor of the fake process that is one of this test's real sockets, so
        that the kernel (sock_diag) can tell where it is bound."""
        self.other_fd(pid, fd, f"socket:[{os.fstat(sock.fileno()).st_ino}]")

    def cwd(self, pid: int, path: str | Path, pwd: str | Path | None = None) -> None:
        """The working directory, and ``$PWD`` in the environment when given."""
        os.symlink(path, self.root / str(pid) / "cwd")
        env = [b"HOME=/root", *([b"PWD=" + os.fsencode(pwd)] if pwd else []), b"LANG=C"]
        (self.root / str(pid) / "environ").write_bytes(b"".join(e + b"\0" for e in env))


def bind_in(sock: socket.socket, directory: Path, name: str) -> None:
    """Bind ``sock`` by ``name`` relative to ``directory``, as qemu binds ``path=amqp.sock``
    in the directory it started in (the kernel keeps the name as bound)."""
    here = os.getcwd()
    os.chdir(directory)
    try:
        sock.bind(name)
    finally:
        os.chdir(here)


@pytest.fixture(autouse=True)
def sockets_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a command line, config file or status file names is what these tests are
    about, with sockets no fake /proc could hold; whether qemu listens on each is
    ``test_discovery_held.py``'s question: here it always does."""
    monkeypatch.setattr(QemuSockets, "listener_at", lambda self, path: None)


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    (tmp_path / "proc").mkdir()
    return FakeProc(tmp_path / "proc")


@pytest.fixture
def settings(tmp_path: Path, proc: FakeProc) -> DiscoverySettings:
    (tmp_path / "status").mkdir()
    return DiscoverySettings(
        proc_root=str(proc.root),
        libvirt_status_dir=str(tmp_path / "status"),
        qemu_default_config=str(tmp_path / "etc-qemu.conf"),  # none, unless a test writes it
    )


QEMU = "/usr/bin/qemu-system-x86_64"


def unmoved(pid: int, settings: DiscoverySettings) -> StartDir:
    """The start directory of a qemu given no option that leaves it."""
    return StartDir(pid, frozenset(), settings.proc_root)


def test_exe_check(proc: FakeProc, settings: DiscoverySettings) -> None:
    proc.process(10, QEMU, ["qemu"])
    proc.process(11, "/usr/libexec/qemu-kvm (deleted)", ["qemu-kvm"])  # upgraded under it
    proc.process(12, "/usr/bin/python3.11", ["qemu-system-x86_64"])  # a stranger posing
    proc.process(13, "/usr/bin/qemu-img", ["qemu-img"])
    assert exe_name(11, settings.proc_root) == "qemu-kvm"
    assert exe_name(99, settings.proc_root) is None
    assert [is_qemu(p, settings) for p in (10, 11, 12, 13, 99)] == [True, True, False, False, False]
    assert qemu_pids(settings) == [10, 11]


def test_a_qemu_run_by_another_user_is_not_trusted(
    proc: FakeProc, settings: DiscoverySettings
) -> None:
    """Any local user may run qemu and name it after someone else's guest."""
    proc.process(14, QEMU, ["qemu"], uid=65534)
    proc.process(15, QEMU, ["qemu"], uid=4242)
    (proc.root / "16").mkdir()  # gone half way: no status to tell its user
    os.symlink(QEMU, proc.root / "16" / "exe")
    assert not is_qemu(14, settings)
    assert is_qemu(15, replace(settings, qemu_users=("nobody-here", "4242")))
    assert not is_qemu(16, settings)
    # Told apart in the log: a qemu hidden by the setting is a warning, a stranger is not.
    assert distrust(14, settings) == Distrust(
        "qemu-system-x86_64 run by uid 65534, not one of qemu_users", alarming=True
    )
    proc.process(17, "/usr/bin/python3.11", ["qemu-system-x86_64"])
    assert distrust(17, settings) == Distrust("not qemu (python3.11)")
    assert distrust(99, settings) == Distrust("gone")


def test_pty_indices_and_socket_paths(proc: FakeProc) -> None:
    proc.process(20, QEMU, ["qemu"])
    proc.other_fd(20, 3, "/dev/null")
    proc.ptmx(20, 9, 4)
    proc.ptmx(20, 12, 2)
    proc.socket(20, 7, 5551, "/run/a.sock")
    proc.other_fd(20, 8, "socket:[777]")  # an unbound socket: no row with a path
    root = str(proc.root)
    assert pty_indices(20, root) == [4, 2]
    assert unix_socket_path(20, 7, root) == "/run/a.sock"
    assert unix_socket_path(20, 8, root) is None
    assert unix_socket_path(20, 3, root) is None
    assert pty_indices(99, root) == []


ARGV = [
    "/usr/bin/qemu-system-x86_64",
    "-name",
    "guest=vm1,debug-threads=on",
    "-uuid",
    "0b5e1ab4-94a7-4f5e-8a89-2bd2d6a0c0aa",
    "-chardev",
    "pty,id=charserial0",
    "-chardev",
    "socket,id=c0,path=/run/vm1/amqp0.sock,server=on,wait=off",
    "-chardev",
    "socket,id=c1,path=/run/qpid/vm1.sock,server=off,reconnect=1",
    "-chardev",
    "pty,id=c2",
    "-chardev",
    "socket,id=c3,fd=31,server=on,wait=off",
    "-chardev",
    "socket,id=c4,fd=32,server=on,wait=off",
    "-device",
    "virtserialport,chardev=c0,name=org.qpid.amqp.0",
    "-device",
    "virtserialport,chardev=c1,name=org.qpid.amqp.1",
    "-device",
    '{"driver":"virtserialport","chardev":"c2","name":"org.qpid.amqp.2"}',
    "-device",
    "virtserialport,chardev=c3,name=org.qpid.amqp.3",
    "-device",
    "virtserialport,chardev=c4,name=org.qemu.guest_agent.0",
    "-device",
    "virtserialport,chardev=missing,name=org.qpid.amqp.9",
]


def _ident(port: str) -> GuestIdentity:
    return GuestIdentity(
        "vm1", port, uuid="0b5e1ab4-94a7-4f5e-8a89-2bd2d6a0c0aa", pid=30, found_by="cmdline"
    )


def test_specs_from_cmdline(proc: FakeProc, settings: DiscoverySettings) -> None:
    proc.process(30, QEMU, ARGV)
    proc.ptmx(30, 8, 6)  # charserial0
    proc.ptmx(30, 10, 7)  # c2
    proc.socket(30, 31, 901, "/var/lib/libvirt/qemu/channel/target/domain-1-vm1/org.qpid.amqp.3")
    resolution = resolve_pid(30, settings)
    assert not resolution.from_libvirt
    assert resolution.libvirt_name == "vm1"
    assert resolution.specs == (
        ChannelSpec(ChannelKind.UNIX, "/run/vm1/amqp0.sock", _ident("org.qpid.amqp.0")),
        ChannelSpec(ChannelKind.UNIX_LISTEN, "/run/qpid/vm1.sock", _ident("org.qpid.amqp.1")),
        ChannelSpec(ChannelKind.PTY, "/dev/pts/7", _ident("org.qpid.amqp.2")),
        ChannelSpec(
            ChannelKind.UNIX,
            "/var/lib/libvirt/qemu/channel/target/domain-1-vm1/org.qpid.amqp.3",
            _ident("org.qpid.amqp.3"),
        ),
    )
    assert resolution.problems == ("port org.qpid.amqp.9: chardev 'missing' is not defined",)


def test_pty_count_mismatch_is_refused(proc: FakeProc, settings: DiscoverySettings) -> None:
    """An extra pty (``-serial pty`` has no -chardev) would shift the order: refuse."""
    argv = ["qemu", "-serial", "pty", "-chardev", "pty,id=c", "-device",
            "virtserialport,chardev=c,name=org.qpid.amqp.0"]  # fmt: skip
    proc.process(31, QEMU, argv)
    proc.ptmx(31, 8, 1)
    proc.ptmx(31, 9, 2)
    resolution = specs_from_cmdline(31, parse_cmdline(argv), settings, unmoved(31, settings))
    assert resolution.specs == ()
    assert "2 open ptys for 1 pty chardevs" in resolution.problems[0]


def test_unnamed_guest_and_unsupported_backend(proc: FakeProc, settings: DiscoverySettings) -> None:
    argv = ["qemu", "-chardev", "socket,id=t,host=127.0.0.1,port=4000,server=on",
            "-chardev", "file,id=f,path=/tmp/x",
            "-device", "virtserialport,chardev=t,name=org.qpid.amqp.0",
            "-device", "virtserialport,chardev=f,name=org.qpid.amqp.1"]  # fmt: skip
    proc.process(32, QEMU, argv)
    resolution = specs_from_cmdline(32, parse_cmdline(argv), settings, unmoved(32, settings))
    assert resolution.specs == ()
    assert len(resolution.problems) == 2
    # Not named, so not libvirt's: no status file is looked for, now or later.
    assert resolve_pid(32, settings).libvirt_name is None


STATUS = """<domstatus state='running' reason='booted' pid='{pid}'>
  <domain type='kvm' id='1'>
    <name>{name}</name>
    <uuid>aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee</uuid>
    <devices>
      <channel type='pty'>
        <source path='/dev/pts/11'/>
        <target type='virtio' name='org.qpid.amqp.0'/>
      </channel>
      <channel type='unix'>
        <source mode='connect' path='/run/qpid-virtio/{name}.sock'/>
        <target type='virtio' name='org.qpid.amqp.1'/>
      </channel>
      <channel type='file'>
        <source path='/tmp/log'/>
        <target type='virtio' name='org.qpid.amqp.2'/>
      </channel>
    </devices>
  </domain>
</domstatus>
"""


def test_libvirt_status_wins_over_cmdline(proc: FakeProc, settings: DiscoverySettings) -> None:
    proc.process(30, QEMU, ARGV)
    status = Path(settings.libvirt_status_dir)
    (status / "vm1.xml").write_text(STATUS.format(pid=30, name="vm1"))
    resolution = resolve_pid(30, settings)
    assert resolution.from_libvirt
    ident = GuestIdentity(
        "vm1", "org.qpid.amqp.0", uuid="aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", pid=30,
        found_by="libvirt",
    )  # fmt: skip
    assert resolution.specs == (
        ChannelSpec(ChannelKind.PTY, "/dev/pts/11", ident),
        ChannelSpec(
            ChannelKind.UNIX_LISTEN,
            "/run/qpid-virtio/vm1.sock",
            GuestIdentity("vm1", "org.qpid.amqp.1", uuid=ident.uuid, pid=30, found_by="libvirt"),
        ),
    )
    assert resolution.problems == ("port org.qpid.amqp.2: channel type 'file' is not unix or pty",)


def test_what_proc_holds_that_is_not_utf8_reads_as_text(
    proc: FakeProc, settings: DiscoverySettings
) -> None:
    """A VM named (and a socket bound) in latin-1: every string read is valid Unicode."""
    base = proc.process(50, QEMU, [])
    argv = [b"qemu", b"-name", b"guest=caf\xe9", b"-chardev", b"socket,id=c0,fd=9,server=on"]
    argv += [b"-device", b"virtserialport,chardev=c0,name=org.qpid.amqp.0"]
    (base / "cmdline").write_bytes(b"".join(a + b"\0" for a in argv))
    proc.socket(50, 9, 4242, "/run/x.sock")
    unix = (base / "net" / "unix").read_bytes().replace(b"/run/x.sock", b"/run/\xe9.sock")
    (base / "net" / "unix").write_bytes(unix)
    (spec,) = resolve_pid(50, settings).specs
    assert (spec.identity.name, spec.path) == ("caf\\xe9", "/run/\\xe9.sock")
    assert unix_socket_path(50, 9, str(proc.root)) == "/run/\\xe9.sock"


def test_find_status(settings: DiscoverySettings) -> None:
    status = Path(settings.libvirt_status_dir)
    (status / "a.xml").write_text(STATUS.format(pid=40, name="a"))
    (status / "b.xml").write_text(STATUS.format(pid=41, name="b"))
    (status / "broken.xml").write_text("<domstatus pid='41'><dom")
    (status / "notes.txt").write_text("")
    assert find_status(41, "b", settings).name == "b"
    assert find_status(41, "a", settings) is None  # a.xml belongs to another qemu: stale
    assert find_status(41, "broken", settings) is None  # caught half-written
    assert find_status(41, "missing", settings) is None


@pytest.mark.parametrize("name", ["../elsewhere/a", "sub/a"])
def test_a_name_that_is_not_one_file_name_has_no_status(
    settings: DiscoverySettings, name: str
) -> None:
    """libvirt refuses ``/`` in a domain name; qemu's ``-name`` takes anything."""
    status = Path(settings.libvirt_status_dir)
    (status / "sub").mkdir()
    (status.parent / "elsewhere").mkdir()
    for path in (status.parent / "elsewhere" / "a.xml", status / "sub" / "a.xml"):
        path.write_text(STATUS.format(pid=40, name="a"))
    (status / "a.xml").write_text(STATUS.format(pid=40, name="a"))
    assert find_status(40, "a", settings) is not None
    assert find_status(40, name, settings) is None


def test_a_row_forged_inside_another_sockets_path_is_not_believed(proc: FakeProc) -> None:
    """``/proc/PID/net/unix`` lists every socket of the network namespace with its path as
    bound, newlines included: anyone may bind a path that prints as a second row claiming
    qemu's socket inode. Two rows for one inode mean one is forged; neither is believed."""
    proc.process(60, QEMU, ["qemu"])
    forger = "/tmp/f\n0000000000000000: 00000002 00000000 00010000 0001 01 5551 /tmp/mine"
    proc.socket(60, 8, 7000, forger)
    proc.socket(60, 7, 5551, "/run/libvirt/domain-1-vm/org.qpid.amqp.0")
    assert unix_socket_path(60, 7, str(proc.root)) is None


class _CountedId(str):
    """A chardev id that counts the comparisons made with it."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedId.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_resolving_a_huge_command_line_takes_work_in_proportion(
    proc: FakeProc, settings: DiscoverySettings
) -> None:
    """Whoever runs qemu picks its command line, up to 2 MiB: some 20,000 chardevs and
    ports. Resolved on the daemon's loop, again for each look within the window, a cost
    that grows with the square of that (minutes) would stall every guest's traffic."""
    count = 400
    proc.process(70, QEMU, ["qemu"])
    for n in range(count):
        proc.ptmx(70, 100 + n, n)
    chardevs = tuple(Chardev(_CountedId(f"c{n}"), "pty") for n in range(count))
    ports = tuple(SerialPort(f"org.qpid.amqp.{n}", _CountedId(f"c{n}")) for n in range(count))
    cmdline = QemuCommandLine("big", None, chardevs, ports)
    _CountedId.compared = 0
    resolution = specs_from_cmdline(70, cmdline, settings, unmoved(70, settings))
    assert [s.path for s in resolution.specs] == [f"/dev/pts/{n}" for n in range(count)]
    assert _CountedId.compared <= 4 * count


PORT_0 = "org.qpid.amqp.0"


@pytest.mark.parametrize(
    "chardev",
    [
        "socket,id=c0,path=qvc-amqp,server=on,abstract=on",
        '{"id":"c0","backend":{"type":"socket","data":{"server":true,'
        '"addr":{"type":"unix","data":{"path":"qvc-amqp","abstract":true}}}}}',
    ],
)
def test_an_abstract_socket_is_refused_not_taken_for_a_file(
    proc: FakeProc, settings: DiscoverySettings, chardev: str
) -> None:
    """qemu 6.2+ listens in the abstract namespace with ``abstract=on``: ``path`` is then a
    name, not a file, and the file of that name (in qemu's directory) is someone else's."""
    argv = [
        "qemu",
        "-chardev",
        chardev,
        "-device",
        "virtserialport,chardev=c0,name=org.qpid.amqp.0",
    ]
    proc.process(80, QEMU, argv)
    os.symlink("/tmp", proc.root / "80" / "cwd")
    resolution = resolve_pid(80, settings)
    assert resolution.specs == ()
    assert "abstract" in resolution.problems[0]


# -- config files and the start directory ---------------------------------------------------

VM_CFG = """# written by hand
[chardev "ch0"]
  backend = "socket"
  path = "amqp.sock"
  server = "on"
[device "p0"]
  driver = "virtserialport"
  chardev = "ch0"
  name = "org.qpid.amqp.0"
"""


def _by_hand(tmp_path: Path, *extra: str) -> list[str]:
    """qemu run by hand in ``tmp_path/vm`` with a config file there, plus ``extra``."""
    (tmp_path / "vm").mkdir(exist_ok=True)
    (tmp_path / "vm" / "vm.cfg").write_text(VM_CFG)
    return ["qemu", "-name", "by-hand", "-readconfig", "vm.cfg", *extra]


def test_a_relative_readconfig_is_read_in_qemus_directory(
    proc: FakeProc, settings: DiscoverySettings, tmp_path: Path
) -> None:
    argv = _by_hand(tmp_path, "-set", "device.p0.name=org.qpid.amqp.5")
    proc.process(90, QEMU, argv)
    proc.cwd(90, tmp_path / "vm")
    resolution = resolve_pid(90, settings)
    ident = GuestIdentity("by-hand", "org.qpid.amqp.5", pid=90, found_by="cmdline")
    assert resolution.specs == (ChannelSpec(ChannelKind.UNIX, f"{tmp_path}/vm/amqp.sock", ident),)
    assert resolution.problems == ()


def test_qemus_default_config_is_read_from_the_setting(
    proc: FakeProc, settings: DiscoverySettings, tmp_path: Path
) -> None:
    Path(settings.qemu_default_config).write_text(VM_CFG.replace("amqp.sock", "/run/d.sock"))
    proc.process(91, QEMU, ["qemu", "-name", "d"])
    assert [s.path for s in resolve_pid(91, settings).specs] == ["/run/d.sock"]
    proc.process(92, QEMU, ["qemu", "-name", "d", "-no-user-config"])
    assert resolve_pid(92, settings).specs == ()


def _fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "fifo")  # opened for reading, it would wait for a writer
    return str(tmp_path / "fifo")


def _huge(tmp_path: Path) -> str:
    with (tmp_path / "huge.cfg").open("wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: costs no disk
    return str(tmp_path / "huge.cfg")


UNREADABLE = {
    "a directory": (lambda tmp: str(tmp), "not a regular file"),
    "a FIFO": (_fifo, "not a regular file"),
    "a device": (lambda tmp: "/dev/null", "not a regular file"),
    "missing": (lambda tmp: str(tmp / "nope.cfg"), "No such file or directory"),
    "too big": (_huge, f"come to more than {MAX_CONFIG_BYTES} bytes"),
    "bash's <(...)": (lambda tmp: "/dev/fd/63", "a descriptor of qemu's own"),
    "stdin": (lambda tmp: "/dev/stdin", "a descriptor of qemu's own"),
    "/proc/self": (lambda tmp: "/proc/self/fd/0", "a descriptor of qemu's own"),
    "relative to /proc/self": (lambda tmp: "../proc/self/fd/0", "a descriptor of qemu's own"),
}


@pytest.mark.parametrize("case", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_a_config_file_that_cannot_be_read_safely_is_a_problem(
    proc: FakeProc, settings: DiscoverySettings, tmp_path: Path, case: tuple[Any, str]
) -> None:
    """Whoever runs qemu names the file: nothing but a regular file of sane size is read,
    nothing blocks or raises, and the rest of the command line still counts."""
    make, why = case
    argv = [*ARGV, "-readconfig", make(tmp_path)]
    proc.process(30, QEMU, argv)
    proc.cwd(30, "/tmp")
    proc.ptmx(30, 8, 6)
    proc.ptmx(30, 10, 7)
    resolution = resolve_pid(30, settings)
    assert len(resolution.specs) == 3
    (problem,) = (p for p in resolution.problems if p.startswith("-readconfig"))
    assert why in problem
    assert problem.endswith("; the chardevs and devices it gives are not seen")


SECRET_CFG = """[name]
  guest = "the-secret"
[chardev "s"]
  backend = "socket"
  path = "/run/secret.sock"
  server = "on"
[device "sp"]
  driver = "virtserialport"
  chardev = "s"
  name = "org.qpid.amqp.7"
"""


@pytest.fixture
def daemon_file() -> Iterator[int]:
    """A regular file only this process (the daemon) holds: no name leads to it."""
    fd = os.memfd_create("daemon-only")
    os.write(fd, SECRET_CFG.encode())
    yield fd
    os.close(fd)


@pytest.mark.parametrize("spelling", ["//dev/fd/{fd}", "/proc/{pid}/fd/{fd}"])
def test_the_daemons_own_descriptors_are_not_read_by_another_spelling(
    proc: FakeProc, settings: DiscoverySettings, daemon_file: int, spelling: str
) -> None:
    """``/dev/fd/N`` names the opener's descriptor N: qemu's when qemu read it, the
    daemon's when the daemon does. ``//dev/fd`` is the same directory (normpath keeps two
    leading slashes), and anyone may learn the daemon's pid: nothing the daemon holds open
    may be read for a qemu, and nothing in it may become a guest's name or port."""
    name = spelling.format(fd=daemon_file, pid=os.getpid())
    proc.process(97, QEMU, ["qemu", "-name", "mine", "-readconfig", name])
    resolution = resolve_pid(97, settings)
    assert resolution.specs == ()
    (problem,) = resolution.problems
    assert problem.startswith(f"-readconfig {name}: ")
    assert "the-secret" not in problem


QEMU_UID = 4242
OTHER_UID = 12345  # owns what qemu's user may not read


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory every user may reach (pytest's own are 0700), so that only what a test
    closes is closed to qemu's user."""
    path = Path(tempfile.mkdtemp(prefix="qvc-access-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _only_its_owners(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.cfg"
    secret.write_text(SECRET_CFG)
    os.chown(secret, OTHER_UID, OTHER_UID)
    secret.chmod(0o600)
    return secret


def _in_a_closed_directory(tmp_path: Path) -> Path:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "vm.cfg").write_text(SECRET_CFG)
    (private / "vm.cfg").chmod(0o644)
    os.chown(private, OTHER_UID, OTHER_UID)
    return private / "vm.cfg"


def _linked(tmp_path: Path) -> Path:
    """What qemu's user does to a file it read at start: it may replace it with a link."""
    link = tmp_path / "mine.cfg"
    link.symlink_to(_only_its_owners(tmp_path))
    return link


def _fifo_in_a_closed_directory(tmp_path: Path) -> Path:
    """What is not a regular file is refused too, but qemu's user must not learn what a
    name it may not look at is (a directory, a FIFO, a device) from which refusal it gets."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.mkfifo(private / "fifo")
    os.chown(private, OTHER_UID, OTHER_UID)
    return private / "fifo"


NOT_QEMUS = {
    "0600 of another user": _only_its_owners,
    "in a 0700 directory": _in_a_closed_directory,
    "a link to another user's file": _linked,
    "a FIFO in a 0700 directory": _fifo_in_a_closed_directory,
}


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon reads as root here")
@pytest.mark.parametrize("make", NOT_QEMUS.values(), ids=NOT_QEMUS.keys())
def test_a_config_file_qemus_user_may_not_read_is_not_read(
    proc: FakeProc, settings: DiscoverySettings, open_tmp: Path, make: Any
) -> None:
    """qemu read its files as its own user; the daemon (root, or with CAP_DAC_OVERRIDE) may
    read anything. A qemu user who may not read a file must not learn what it says through
    the guest's name, its ports or their paths in the status, the logs or the metrics."""
    name = str(make(open_tmp))
    proc.process(98, QEMU, ["qemu", "-name", "mine", "-readconfig", name], uid=QEMU_UID)
    resolution = resolve_pid(98, settings)
    assert resolution.specs == ()
    assert resolution.problems == (
        f"-readconfig {name}: qemu's user (uid {QEMU_UID}) may not read it; the chardevs and "
        "devices it gives are not seen",
    )


SHARED_GID = 777
# How qemu's user may read a 0640 file of (OTHER_UID, SHARED_GID): its owner, a member of
# its group, or with a capability that reads past modes; as qemu's (uid, groups, CapEff).
MAY_READ = {
    "its own file": (OTHER_UID, (), 0),
    "a member of its group": (QEMU_UID, (SHARED_GID,), 0),
    "CAP_DAC_READ_SEARCH": (QEMU_UID, (), 1 << CAP_DAC_READ_SEARCH),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to other users")
@pytest.mark.parametrize("user", MAY_READ.values(), ids=MAY_READ.keys())
def test_a_config_file_qemus_user_may_read_is_read(
    proc: FakeProc, settings: DiscoverySettings, open_tmp: Path, user: tuple[int, tuple[int], int]
) -> None:
    uid, groups, caps = user
    config = open_tmp / "vm.cfg"
    config.write_text(SECRET_CFG)
    os.chown(config, OTHER_UID, SHARED_GID)
    config.chmod(0o640)
    proc.process(99, QEMU, ["qemu", "-readconfig", str(config)], uid, groups, caps)
    resolution = resolve_pid(99, settings)
    assert [s.identity.name for s in resolution.specs] == ["the-secret"]
    assert resolution.problems == ()


def test_config_files_together_are_bounded(
    proc: FakeProc, settings: DiscoverySettings, tmp_path: Path
) -> None:
    """Each file under the bound, many of them over it: the total counts."""
    half = tmp_path / "half.cfg"
    half.write_bytes(b"#" * (MAX_CONFIG_BYTES // 2) + b"\n")
    (tmp_path / "vm.cfg").write_text(VM_CFG)
    argv = ["qemu", "-readconfig", str(half), "-readconfig", str(half)]
    proc.process(93, QEMU, [*argv, "-readconfig", "vm.cfg", "-readconfig", "vm.cfg"])
    proc.cwd(93, tmp_path)
    problems = resolve_pid(93, settings).problems
    assert [p.split(":")[0] for p in problems] == [
        f"-readconfig {half}",
        "-readconfig vm.cfg",
        "-readconfig vm.cfg",
    ]


MANY_FILES = 10_000


def test_a_qemu_naming_thousands_of_config_files_costs_a_few_opens(
    proc: FakeProc, settings: DiscoverySettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty file takes nothing of the byte bound, and ``-readconfig e`` is 14 bytes of
    qemu's 2 MiB of arguments: 140,000 of them took 4 s of the daemon's loop at each look
    (an open, a stat of each directory on the path, a read). Opens are counted, not time."""
    (tmp_path / "e").write_bytes(b"")
    proc.process(100, QEMU, ["qemu", *["-readconfig", "e"] * MANY_FILES])
    proc.cwd(100, tmp_path)
    opened: list[str] = []

    def counted(path: str, *args: Any) -> bytes:
        opened.append(path)
        return read_regular_file(path, *args)

    monkeypatch.setattr(connector.discovery.resolve, "read_regular_file", counted)
    resolution = resolve_pid(100, settings)
    assert len(opened) == MAX_CONFIG_FILES  # qemu's default config among them, missing
    assert len(resolution.problems) == MANY_FILES - (len(opened) - 1)
    assert resolution.problems[-1].startswith("-readconfig e: not read: this qemu names more")


def test_a_daemonized_qemus_relative_paths_join_its_proven_start(
    proc: FakeProc, settings: DiscoverySettings, tmp_path: Path
) -> None:
    """Met after -daemonize took it to /: $PWD holds the socket qemu bound by the
    relative name, so the config file and the socket are found there."""
    argv = _by_hand(tmp_path, "-daemonize")
    proc.process(94, QEMU, argv)
    proc.cwd(94, "/", pwd=tmp_path / "vm")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        bind_in(sock, tmp_path / "vm", "amqp.sock")
        proc.real_socket(94, 5, sock)
        resolution = resolve_pid(94, settings)
    assert [s.path for s in resolution.specs] == [f"{tmp_path}/vm/amqp.sock"]
    assert resolution.problems == ()


def test_a_daemonized_qemu_whose_start_cannot_be_proven_reports_each_relative_path(
    proc: FakeProc, settings: DiscoverySettings, tmp_path: Path
) -> None:
    """No wrong path: $PWD is stale and qemu holds no socket to show where it started."""
    argv = _by_hand(tmp_path, "-daemonize", "-chardev", "socket,id=c1,path=rel.sock,server=on",
                    "-device", "virtserialport,chardev=c1,name=org.qpid.amqp.1")  # fmt: skip
    proc.process(95, QEMU, argv)
    proc.cwd(95, "/", pwd=tmp_path)
    resolution = resolve_pid(95, settings)
    assert resolution.specs == ()
    why = "qemu has left the directory it started in (-daemonize) and holds no socket"
    assert [p.partition(why)[0] for p in resolution.problems] == [
        "-readconfig vm.cfg: a relative name, and ",
        "port org.qpid.amqp.1: rel.sock is relative, and ",
    ]


def test_a_daemonized_qemu_connects_by_a_relative_name_from_root(
    proc: FakeProc, settings: DiscoverySettings
) -> None:
    """A ``server=off`` chardev reconnects by the name it was given, from where qemu is at
    each attempt: after -daemonize, from /. The connector must listen there."""
    argv = ["qemu", "-daemonize", "-chardev", "socket,id=c,path=listen.sock,reconnect=1",
            "-device", "virtserialport,chardev=c,name=org.qpid.amqp.0"]  # fmt: skip
    proc.process(96, QEMU, argv)
    proc.cwd(96, "/home/alice/vm")  # met before it has gone: it will
    (spec,) = resolve_pid(96, settings).specs
    assert (spec.kind, spec.path) == (ChannelKind.UNIX_LISTEN, "/listen.sock")
