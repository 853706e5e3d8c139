"""From a qemu process to its AMQP channels: which sources say what, and whom to trust.

Sources, most exact first: libvirt's status XML for that pid (libvirt asked qemu over QMP),
then qemu's own command line and the config files it names, with pty paths read from
qemu's ``/dev/ptmx`` descriptors and libvirt's passed-in sockets from qemu's socket
descriptors. A pid is trusted only when its executable is qemu: any process that may open
/dev/kvm can create a VM, and a stranger's socket must never be routed under a guest's
name.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import pwd
from dataclasses import dataclass, replace

from connector.discovery.access import Credentials, NotReadable, credentials
from connector.discovery.fdinfo import pty_indices, unix_socket_path
from connector.discovery.held import QemuSockets
from connector.discovery.libvirt import LibvirtDomain, StatusXmlError, parse_status_xml
from connector.discovery.qemu import (
    Chardev,
    ConfigUnreadable,
    QemuCommandLine,
    parse_cmdline,
    split_cmdline,
    working_dir_moves,
)
from connector.discovery.reading import proc_status, read_bytes, read_regular_file, readlink
from connector.discovery.settings import DiscoverySettings
from connector.discovery.startdir import StartDir
from connector.identity import ChannelKind, ChannelSpec, GuestIdentity

# A status file is a few tens of KiB; anything far larger is not libvirt's.
MAX_STATUS_XML_BYTES = 4 * 1024 * 1024
_DELETED = " (deleted)"  # readlink suffix when qemu's binary was upgraded under it
# qemu's config files are written by hand or by a script: a few KiB (qemu's own examples
# are under 5 KiB). One qemu's files together, read on the daemon's loop at each look, may
# come to this much; past it they are not read (and whoever runs qemu names them).
MAX_CONFIG_BYTES = 1024 * 1024
# And they are few: libvirt gives none, someone running qemu by hand one or two. Each file
# costs an open and a stat of every directory on its path at each look, and an empty one
# takes nothing of the byte bound: 140,000 ``-readconfig e`` fit in qemu's arguments and
# took 4 s of the loop per look. Past this many (qemu's default config counts), no more
# are read.
MAX_CONFIG_FILES = 32
# Names that mean the opener's own descriptors or directories. What qemu read there is gone
# (bash's ``<(...)`` gives ``/dev/fd/63``, a pipe), and opened by the connector they would
# name the connector's own.
_OPENERS_OWN = ("/dev/fd/", "/dev/std", "/proc/self/", "/proc/thread-self/")


@dataclass(frozen=True)
class Resolution:
    """A process's channels, plus why some matching ports could not be resolved."""

    specs: tuple[ChannelSpec, ...]
    problems: tuple[str, ...] = ()
    from_libvirt: bool = False  # the specs come from libvirt's status file
    libvirt_name: str | None = None  # the guest name libvirt would file its status under
    # The ``unix`` paths qemu names but was not seen listening on (yet): worth a look again
    # when a socket appears there.
    unproven: frozenset[str] = frozenset()


def exe_name(pid: int, proc_root: str) -> str | None:
    """Basename of the process's executable, or ``None`` if it is gone or unreadable."""
    target = readlink(f"{proc_root}/{pid}/exe")
    if target is None:
        return None
    target = target.removesuffix(_DELETED)
    return os.path.basename(target)


def _exe_refused(pid: int, proc_root: str) -> str | None:
    """Why a live process's executable may not be read (another user's process, and no
    CAP_SYS_PTRACE), or ``None``: readable, or the process is gone."""
    try:
        os.readlink(f"{proc_root}/{pid}/exe")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        return exc.strerror
    return None


@dataclass(frozen=True)
class Distrust:
    """Why a process is not taken for qemu; ``alarming`` when it may well be one (a
    setting or a missing capability hides it), not a stranger or a process gone."""

    reason: str
    alarming: bool = False


def distrust(pid: int, settings: DiscoverySettings) -> Distrust | None:
    """Why ``pid`` is not trusted as qemu, or ``None`` when it is: its executable must
    match one of ``settings.qemu_executables`` and one of ``settings.qemu_users`` must run
    it. The name alone proves little: any local user may run qemu, or copy any program
    under its name, and give it the ``-name`` of another user's guest.
    """
    name = exe_name(pid, settings.proc_root)
    if name is None:
        refused = _exe_refused(pid, settings.proc_root)
        if refused is None:
            return Distrust("gone")
        return Distrust(
            f"cannot read {settings.proc_root}/{pid}/exe ({refused}), so it cannot be "
            "trusted as qemu: without CAP_SYS_PTRACE no VM is found by its process",
            alarming=True,
        )
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in settings.qemu_executables):
        return Distrust(f"not qemu ({name})")
    uid = owner_uid(pid, settings.proc_root)
    if uid not in uids_of(settings.qemu_users):
        return Distrust(f"{name} run by uid {uid}, not one of qemu_users", alarming=True)
    return None


def is_qemu(pid: int, settings: DiscoverySettings) -> bool:
    """Whether ``pid`` is trusted as qemu (see :func:`distrust`)."""
    return distrust(pid, settings) is None


def owner_uid(pid: int, proc_root: str) -> int | None:
    """The real uid a process runs as, from ``/proc/PID/status``."""
    fields = proc_status(pid, proc_root).get("Uid", [])
    return int(fields[0]) if fields and fields[0].isdigit() else None


@functools.lru_cache(maxsize=8)
def uids_of(users: tuple[str, ...]) -> frozenset[int]:
    """The uids of ``users`` (names, or uids written as numbers), looked up once; names
    this host does not have are passed over."""
    uids: set[int] = set()
    for user in users:
        if user.isdigit():
            uids.add(int(user))
            continue
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            continue
    return frozenset(uids)


def qemu_pids(settings: DiscoverySettings) -> list[int]:
    """Every running process whose executable is qemu, for the start-up scan."""
    try:
        names = os.listdir(settings.proc_root)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and is_qemu(int(n), settings))


def port_wanted(port: str | None, settings: DiscoverySettings) -> bool:
    return port is not None and any(
        fnmatch.fnmatchcase(port, pattern) for pattern in settings.port_patterns
    )


class _ConfigFiles:
    """Reads one qemu's config files for :func:`parse_cmdline`, as the daemon reads any
    file: a relative name in qemu's start directory, regular files only, and no more than
    :data:`MAX_CONFIG_BYTES` for all of them together; and only what qemu's user may read
    (see ``access``), since what a file says reaches that user through the guest's name,
    ports and paths."""

    def __init__(self, start: StartDir, user: Credentials | None) -> None:
        self._start = start
        self._user = user
        self._left = MAX_CONFIG_BYTES
        self._files_left = MAX_CONFIG_FILES

    def __call__(self, name: str) -> bytes:
        self._files_left -= 1
        if self._files_left < 0:
            raise ConfigUnreadable(
                f"not read: this qemu names more than {MAX_CONFIG_FILES} config files"
            )
        path = self._path(name)
        too_much = f"not read: this qemu's config files come to more than {MAX_CONFIG_BYTES} bytes"
        if self._left <= 0:
            raise ConfigUnreadable(too_much)
        if self._user is None:
            raise ConfigUnreadable("not read: qemu's user cannot be told (process gone?)")
        try:
            data = read_regular_file(path, self._left + 1, self._user.check_readable)
        except FileNotFoundError as exc:
            raise ConfigUnreadable(exc.strerror, missing=True) from None
        except NotReadable:
            raise ConfigUnreadable(f"qemu's user (uid {self._user.uid}) may not read it") from None
        except OSError as exc:
            raise ConfigUnreadable(exc.strerror or str(exc)) from None
        if len(data) > self._left:
            self._left = 0
            raise ConfigUnreadable(too_much)
        self._left -= len(data)
        return data

    def _path(self, name: str) -> str:
        """Where qemu opened ``name``: in its start directory when relative."""
        path, why = self._start.join(name)
        if path is None:
            raise ConfigUnreadable(f"a relative name, and {why}")
        if _normpath(path).startswith(_OPENERS_OWN):
            raise ConfigUnreadable("names a descriptor of qemu's own, which cannot be read again")
        return path


def _normpath(path: str) -> str:
    """``os.path.normpath``, and one slash for two at the start: POSIX leaves ``//`` to the
    system, so normpath keeps it, but on Linux ``//dev/fd`` is ``/dev/fd``."""
    return "/" + os.path.normpath(path).lstrip("/")


@dataclass(frozen=True)
class _Qemu:
    """What a qemu was given, and where its relative paths lead."""

    cmdline: QemuCommandLine
    start: StartDir


def _read_qemu(pid: int, settings: DiscoverySettings) -> _Qemu | None:
    raw = read_bytes(f"{settings.proc_root}/{pid}/cmdline")
    if raw is None:
        return None
    argv = split_cmdline(raw)
    start = StartDir(pid, working_dir_moves(argv), settings.proc_root)
    files = _ConfigFiles(start, credentials(pid, settings.proc_root))
    cmdline = parse_cmdline(argv, files, settings.qemu_default_config)
    return _Qemu(cmdline, start)


def read_cmdline(pid: int, settings: DiscoverySettings) -> QemuCommandLine | None:
    """What qemu's command line and config files say, or ``None`` if it is gone."""
    qemu = _read_qemu(pid, settings)
    return None if qemu is None else qemu.cmdline


def read_status(path: str) -> LibvirtDomain | None:
    """One status file, or ``None`` if it is missing, too big, or half-written."""
    data = read_bytes(path, MAX_STATUS_XML_BYTES + 1)
    if data is None or len(data) > MAX_STATUS_XML_BYTES:
        return None
    try:
        return parse_status_xml(data)
    except StatusXmlError:
        return None


def find_status(pid: int, name: str, settings: DiscoverySettings) -> LibvirtDomain | None:
    """libvirt's status for guest ``name`` if it is the one whose qemu is ``pid``.

    libvirt always names its guests on qemu's command line (``-name guest=NAME``) and
    keeps ``NAME.xml``; a file whose pid differs is stale or another qemu's. libvirt
    refuses ``/`` in a name, and whoever runs qemu picks ``-name``: with a slash it would
    lead to a file outside the directory, which anyone may have written.
    """
    if "/" in name:
        return None
    domain = read_status(os.path.join(settings.libvirt_status_dir, f"{name}.xml"))
    return domain if domain is not None and domain.pid == pid else None


def specs_from_libvirt(domain: LibvirtDomain, settings: DiscoverySettings) -> Resolution:
    """The matching virtio channels of a libvirt domain."""
    specs: list[ChannelSpec] = []
    problems: list[str] = []
    for channel in domain.channels:
        if channel.target_type != "virtio" or not port_wanted(channel.target_name, settings):
            continue
        port = channel.target_name or ""
        if not channel.path:
            problems.append(f"port {port}: no source path recorded")
            continue
        if channel.type == "unix":
            # mode='bind': qemu listens; mode='connect': qemu connects to us.
            kind = ChannelKind.UNIX_LISTEN if channel.mode == "connect" else ChannelKind.UNIX
        elif channel.type == "pty":
            kind = ChannelKind.PTY
        else:
            problems.append(f"port {port}: channel type {channel.type!r} is not unix or pty")
            continue
        identity = GuestIdentity(
            name=domain.name, port=port, uuid=domain.uuid, pid=domain.pid, found_by="libvirt"
        )
        specs.append(ChannelSpec(kind=kind, path=channel.path, identity=identity))
    return Resolution(tuple(specs), tuple(problems), from_libvirt=True)


def specs_from_cmdline(
    pid: int, cmdline: QemuCommandLine, settings: DiscoverySettings, start: StartDir
) -> Resolution:
    """The matching ports of a qemu command line, with paths found through /proc.

    A ``-chardev pty`` has no path on the command line. qemu creates chardevs in
    command-line order and each pty opens one ``/dev/ptmx``, so the n-th pty chardev is
    matched to the n-th ptmx descriptor, and only when the counts agree (``-serial pty``
    and friends open ptys that have no ``-chardev``, which would shift the order).
    """
    specs: list[ChannelSpec] = []
    problems: list[str] = list(cmdline.problems)
    pty_order: dict[str, int] = {}  # each pty chardev's place among them
    for chardev in cmdline.chardevs:
        if chardev.backend == "pty":
            pty_order.setdefault(chardev.id, len(pty_order))
    ptys: list[int] | None = None
    for port in cmdline.ports:
        if not port_wanted(port.name, settings):
            continue
        chardev = cmdline.chardev(port.chardev)
        if chardev is None:
            problems.append(f"port {port.name}: chardev {port.chardev!r} is not defined")
            continue
        if chardev.backend == "socket" and chardev.abstract:
            problems.append(f"port {port.name}: an abstract socket, which is not a file")
            continue
        if chardev.backend == "socket":
            path, why = _socket_path(pid, chardev, start, settings.proc_root)
            if path is None:
                problems.append(f"port {port.name}: {why}")
                continue
            kind = ChannelKind.UNIX if chardev.server else ChannelKind.UNIX_LISTEN
        elif chardev.backend == "pty":
            if ptys is None:
                ptys = pty_indices(pid, settings.proc_root)
            if len(ptys) != len(pty_order):
                problems.append(
                    f"port {port.name}: {len(ptys)} open ptys for {len(pty_order)} pty chardevs"
                )
                continue
            path = f"/dev/pts/{ptys[pty_order[chardev.id]]}"
            kind = ChannelKind.PTY
        else:
            problems.append(f"port {port.name}: chardev backend {chardev.backend!r} unsupported")
            continue
        identity = GuestIdentity(
            name=cmdline.name or f"qemu-{pid}",
            port=port.name,
            uuid=cmdline.uuid,
            pid=pid,
            found_by="cmdline",
        )
        specs.append(ChannelSpec(kind=kind, path=path, identity=identity))
    return Resolution(tuple(specs), tuple(problems))


def _socket_path(
    pid: int, chardev: Chardev, start: StartDir, proc_root: str
) -> tuple[str | None, str]:
    """A socket chardev's path, or why there is none.

    Someone running qemu by hand writes ``path=amqp.sock``: qemu listens on it where it
    started (``server=on``), or connects to it from where it is at each attempt
    (``server=off``). libvirt passes its sockets as ``fd=N``, bound elsewhere.
    """
    if chardev.path is not None:
        join = start.join if chardev.server else start.join_later
        path, why = join(chardev.path)
        return path, "" if path is not None else f"{chardev.path} is relative, and {why}"
    if chardev.fd is None:
        return None, "socket chardev without a unix path"
    path = unix_socket_path(pid, chardev.fd, proc_root)
    why = (
        f"fd {chardev.fd} has no single unix path in net/unix (not a bound socket, or more "
        "than one socket row claims its inode)"
    )
    return path, "" if path is not None else why


def resolve_pid(pid: int, settings: DiscoverySettings) -> Resolution:
    """A trusted qemu pid's channels (the caller checks ``is_qemu`` first).

    When libvirt has not written its status file yet, the command line answers now and
    ``libvirt_name`` tells the caller which file to look for later.
    """
    qemu = _read_qemu(pid, settings)
    if qemu is None:
        return Resolution((), ("command line unreadable (process gone?)",))
    name = qemu.cmdline.name
    if name:
        domain = find_status(pid, name, settings)
        if domain is not None:
            return replace(specs_from_libvirt(domain, settings), libvirt_name=name)
    resolution = specs_from_cmdline(pid, qemu.cmdline, settings, qemu.start)
    return replace(held_only(resolution, pid, settings), libvirt_name=name)


def held_only(resolution: Resolution, pid: int, settings: DiscoverySettings) -> Resolution:
    """``resolution`` without the ``unix`` channels whose socket qemu does not listen on,
    each a problem instead.

    A path is reported to the first qemu that names it, and whoever runs qemu writes its
    command line and config files (read when discovery looks): naming another VM's socket
    would have that VM's traffic served under this guest's name. The kernel says whose a
    socket is (``held``): a listening socket qemu holds must be bound to that very file.
    A ``unix-listen`` path is the connector's own socket, so there the peer that connects
    is checked instead (``connector/channels/unix_listen.py``).

    libvirt's status file is not checked here: libvirtd (root) writes it for this very
    pid, from what it asked qemu, and no qemu user writes it. Its channels, like every
    discovered one, are checked again at each connect (``connector/channels/unix.py``).
    """
    sockets = QemuSockets(pid, settings.proc_root)
    specs: list[ChannelSpec] = []
    problems = list(resolution.problems)
    unproven: set[str] = set()
    for spec in resolution.specs:
        why = sockets.listener_at(spec.path) if spec.kind is ChannelKind.UNIX else None
        if why is None:
            specs.append(spec)
        else:
            problems.append(f"port {spec.identity.port}: {why}")
            unproven.add(spec.path)
    return replace(
        resolution, specs=tuple(specs), problems=tuple(problems), unproven=frozenset(unproven)
    )
