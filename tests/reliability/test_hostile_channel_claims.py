"""Channels a hostile qemu user names: real qemu processes, run as ``nobody`` (a user in
``qemu_users``, so discovery believes its qemu speaks for its guest), and real sockets.

The daemon runs as root or with ``CAP_DAC_OVERRIDE``: it may bind, unlink and connect where
qemu's user may not. What a qemu's command line names must not let that user use those
rights: the connector must not remove or take over a socket someone serves, nor make one
where qemu's user could not. Nor may a qemu claim another VM's channel by naming its path:
a socket is a qemu's only when the kernel says so, and a channel's peer must be its qemu.
Each test here showed a hole (strict xfail until it was fixed), or pins what the fix must
keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import connector.channels.unix_listen
from connector.channel import Channel, ChannelState
from connector.discovery import Discovery
from connector.discovery.access import Credentials
from connector.discovery.settings import DiscoverySettings
from connector.identity import ChannelKind, ChannelSpec, GuestIdentity
from connector.limits import GuestLimits
from connector.upstream import BrokerPool, BrokerURL, UpstreamSettings
from tests.integration.discovery_helpers import (
    FakeQemuProcess,
    RecordingSink,
    children,
    poll_until,
    python_named_qemu,
    short_tmp,
    wait_for_path,
)
from tests.reliability.test_hostile_discovery import qemu_args as fake_qemu_args

QEMU = shutil.which("qemu-system-x86_64")
NOBODY = 65534
OTHER_USER = 12345  # runs a qemu discovery does not trust: not in qemu_users
PORT = "org.qpid.amqp.0"
# Nothing here opens an upstream: no guest ever sends a protocol header.
POOL = BrokerPool(UpstreamSettings(urls=(BrokerURL.parse("amqp://127.0.0.1:1"),)))
# A turn of the daemon's loop is far shorter; qemu's reconnect interval (1 s) is not.
SETTLE_S = 0.1
# How long a qemu with reconnect=1 takes at most to connect again, with room.
QEMU_RECONNECT_S = 5.0
pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64"),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs qemu as nobody, serves as root"),
]
__all__ = ["children", "short_tmp"]  # fixtures, used by name
LOG = logging.getLogger("test.channel.claims")


def qemu_args(name: str, qmp: Path, chardev: str | None, *extra: str) -> list[str]:
    """A guestless microvm named ``name`` whose one AMQP port is on ``chardev`` (id c0;
    None: given in ``extra``), with a QMP socket at ``qmp`` that shows when its chardevs
    exist."""
    return [
        str(QEMU), "-accel", "tcg", "-machine", "microvm", "-S",
        "-display", "none", "-nodefaults", "-no-user-config",
        "-name", f"guest={name}", "-qmp", f"unix:{qmp},server=on,wait=off",
        *(["-chardev", chardev] if chardev else []),
        "-device", "virtio-serial-device",
        "-device", f"virtserialport,chardev=c0,name={PORT}",
        *extra,
    ]  # fmt: skip


def home_of_nobody(base: Path) -> Path:
    """A directory ``nobody`` owns, under ``base`` (made searchable for it)."""
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    return home


def root_only(base: Path) -> Path:
    """A directory root owns and others may only search, as ``/run/dbus`` is."""
    directory = base / "run"
    directory.mkdir(mode=0o755)
    return directory


def start_qemu(
    children: list[subprocess.Popen[Any]], args: list[str], qmp: Path, user: int = NOBODY
) -> subprocess.Popen[bytes]:
    """qemu run by ``user``, once its chardevs exist."""
    proc = subprocess.Popen(
        args,
        cwd=qmp.parent,
        user=user,
        group=user,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    children.append(proc)
    wait_for_path(qmp)
    return proc


def discovery_settings(base: Path, *globs: str) -> DiscoverySettings:
    """Discovery that trusts root's and nobody's qemu, and watches ``globs`` if given."""
    return DiscoverySettings(
        sources=frozenset({"kvm", "watch"} if globs else {"kvm"}),
        qemu_users=("root", "nobody"),
        libvirt_status_dir=str(base / "no-libvirt"),
        libvirt_retry_seconds=0,  # warn of a qemu's problems at the first look
        watch_globs=globs,
    )


def scanned(settings: DiscoverySettings) -> dict[str, ChannelSpec]:
    """Every channel a start-up scan reports, by path."""

    async def scan() -> dict[str, ChannelSpec]:
        sink = RecordingSink()
        discovery = Discovery(settings, sink, asyncio.get_running_loop(), LOG)
        discovery.start()
        discovery.stop()
        return sink.live()

    return asyncio.run(scan())


def discovered(base: Path, pid: int) -> dict[str, ChannelSpec]:
    """What a start-up scan reports for qemu ``pid``, by port name."""
    specs = scanned(discovery_settings(base)).values()
    return {spec.identity.port: spec for spec in specs if spec.identity.pid == pid}


@contextlib.contextmanager
def serving(spec: ChannelSpec) -> Iterator[Channel]:
    """The daemon's channel for ``spec``, started, with a loop turned for ``SETTLE_S``."""
    loop = asyncio.new_event_loop()
    channel = Channel(spec, loop=loop, brokers=lambda: POOL, limits=GuestLimits())
    try:
        channel.start()
        turn(channel, SETTLE_S)
        yield channel
    finally:
        channel.close("test over")
        loop.close()


def turn(channel: Channel, seconds: float) -> None:
    """Run the channel's loop for ``seconds``."""
    channel._loop.run_until_complete(asyncio.sleep(seconds))


def listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def still_served_by(service: socket.socket, path: Path) -> bool:
    """Whether a connect to ``path`` reaches ``service``'s listener."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        service.settimeout(1.0)
        try:
            conn, _ = service.accept()
        except TimeoutError:
            return False
        conn.close()
        return True


def stale_socket(path: Path) -> None:
    """A socket file nobody serves (its socket closed)."""
    listening(path).close()


def served(path: Path) -> bool:
    """Whether anyone listens on the socket at ``path`` (its inode would not tell: ext4
    hands a freed inode number straight to the next socket bound)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        try:
            client.connect(str(path))
        except ConnectionRefusedError:
            return False
        return True


# -- unix-listen: what the connector binds and removes ---------------------------------------


def test_a_live_socket_a_qemu_names_is_left_to_whoever_serves_it(
    short_tmp: Path, children: list[subprocess.Popen[Any]]
) -> None:
    """A qemu names a system service's socket (``/run/dbus/system_bus_socket``, the
    connector's own control socket) as its ``server=off`` path. The connector removed it
    and bound its own: the service was cut off, and its clients reached the connector.
    This qemu runs as root (in ``qemu_users`` by default), which may write there: only
    the liveness of the socket keeps it."""
    home = home_of_nobody(short_tmp)
    bus = root_only(short_tmp) / "bus.sock"
    with listening(bus) as service:
        chardev = f"socket,id=c0,path={bus},server=off,reconnect=1"
        args = qemu_args("taker", home / "qmp.sock", chardev)
        qemu = start_qemu(children, args, home / "qmp.sock", user=0)
        spec = discovered(short_tmp, qemu.pid)[PORT]
        assert (spec.kind, spec.path) == (ChannelKind.UNIX_LISTEN, str(bus))
        with serving(spec) as channel:
            assert channel.state is ChannelState.ERROR
            assert channel.last_error is not None
            assert channel.last_error.startswith(f"{bus}: ")
            assert "someone serves it" in channel.last_error
            assert still_served_by(service, bus)


@pytest.mark.parametrize("there", ["a stale socket", "nothing"])
def test_no_socket_is_made_or_removed_where_qemus_user_may_not_write(
    short_tmp: Path, children: list[subprocess.Popen[Any]], there: str
) -> None:
    """In a directory only root may write, the connector (root, or CAP_DAC_OVERRIDE)
    replaced a stale socket and made new ones for nobody's qemu: a socket where a
    service will look for its own, served by the connector under nobody's guest."""
    home = home_of_nobody(short_tmp)
    path = root_only(short_tmp) / "service.sock"
    if there == "a stale socket":
        stale_socket(path)
    chardev = f"socket,id=c0,path={path},server=off,reconnect=1"
    qemu = start_qemu(children, qemu_args("maker", home / "qmp.sock", chardev), home / "qmp.sock")
    with serving(discovered(short_tmp, qemu.pid)[PORT]) as channel:
        assert channel.state is ChannelState.ERROR
        assert channel.last_error is not None
        assert f"qemu's user (uid {NOBODY}) may not write {path.parent}" in channel.last_error
        if there == "nothing":
            assert not os.path.lexists(path)
        else:
            assert not served(path)


def test_a_daemonized_qemus_relative_socket_is_not_made_at_root_for_it(
    short_tmp: Path, children: list[subprocess.Popen[Any]]
) -> None:
    """After ``-daemonize`` qemu connects to a relative ``server=off`` name from ``/``, so
    discovery reports ``/NAME``: the connector, as root, bound it there for nobody."""
    home = home_of_nobody(short_tmp)
    name = f"{short_tmp.name}-listen.sock"
    chardev = f"socket,id=c0,path={name},server=off,reconnect=1"
    args = qemu_args("rooted", home / "qmp.sock", chardev, "-daemonize", "-pidfile", "qemu.pid")
    started = subprocess.run(args, cwd=home, user=NOBODY, group=NOBODY, capture_output=True)
    assert started.returncode == 0, started.stderr
    pid = int((home / "qemu.pid").read_text())
    try:
        spec = discovered(short_tmp, pid)[PORT]
        assert spec.path == f"/{name}"
        with serving(spec) as channel:
            assert channel.state is ChannelState.ERROR
            assert f"qemu's user (uid {NOBODY}) may not write /" in (channel.last_error or "")
            assert not os.path.lexists(spec.path)
    finally:
        os.kill(pid, 9)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/{name}")


def test_a_stale_socket_in_qemus_own_directory_is_replaced(
    short_tmp: Path, children: list[subprocess.Popen[Any]]
) -> None:
    """What the checks must keep working: a socket left by an earlier run, where qemu's
    user may write, is replaced by the connector's."""
    home = home_of_nobody(short_tmp)
    path = home / "listen.sock"
    stale_socket(path)
    chardev = f"socket,id=c0,path={path},server=off,reconnect=1"
    qemu = start_qemu(children, qemu_args("mine", home / "qmp.sock", chardev), home / "qmp.sock")
    with serving(discovered(short_tmp, qemu.pid)[PORT]) as channel:
        assert (channel.state, channel.last_error) == (ChannelState.WAITING, None)
        # nobody's qemu may connect to the root-made socket (reconnect=1: within a second
        # or two), and is the peer the channel serves.
        deadline = time.monotonic() + QEMU_RECONNECT_S
        while channel._fd is None and time.monotonic() < deadline:
            turn(channel, SETTLE_S)
        assert channel._fd is not None and channel.last_error is None


def configured(path: Path) -> ChannelSpec:
    """An operator's ``--channel unix-listen:PATH``: no qemu behind it to ask."""
    return ChannelSpec(ChannelKind.UNIX_LISTEN, str(path), GuestIdentity("configured"))


def test_a_configured_channel_does_not_take_a_live_socket_either(short_tmp: Path) -> None:
    """The operator's path may be mistyped onto a socket in use: refused too."""
    path = short_tmp / "in-use.sock"
    with listening(path) as service, serving(configured(path)) as channel:
        assert channel.state is ChannelState.ERROR
        assert "someone serves it" in (channel.last_error or "")
        assert still_served_by(service, path)


def test_a_configured_channel_still_replaces_a_stale_socket(short_tmp: Path) -> None:
    path = short_tmp / "stale.sock"
    stale_socket(path)
    with serving(configured(path)) as channel:
        assert channel.state is ChannelState.WAITING
        assert served(path)


def test_a_closing_channel_removes_only_its_own_socket(short_tmp: Path) -> None:
    """qemu's user replaced the connector's socket with one it serves (its directory, its
    right); the connector, closing the channel, removed that live socket too."""
    path = short_tmp / "listen.sock"
    with serving(configured(path)):
        os.unlink(path)
        service = listening(path)
    with service:
        assert still_served_by(service, path)


@pytest.fixture
def nobodys_process(children: list[subprocess.Popen[Any]]) -> int:
    """A process of nobody's, standing for its qemu: the endpoint asks only whose it is."""
    children.append(subprocess.Popen(["sleep", "60"], user=NOBODY, group=NOBODY))
    return children[-1].pid


def discovered_for(pid: int, path: Path) -> ChannelSpec:
    """A unix-listen channel as discovery reports it for qemu ``pid``."""
    return ChannelSpec(
        ChannelKind.UNIX_LISTEN, str(path), GuestIdentity("vm", pid=pid, found_by="cmdline")
    )


def test_a_directory_swapped_for_a_link_after_the_check_does_not_move_the_socket(
    short_tmp: Path, nobodys_process: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nobody swaps its directory for a link to a root-only one at the worst moment: after
    the connector checked that nobody may write the directory, before the bind. A check of
    the path followed by a bind by the path would put the socket in the root-only one."""
    home = home_of_nobody(short_tmp)
    elsewhere = root_only(short_tmp)
    vm = home / "vm"
    vm.mkdir()
    os.chown(vm, NOBODY, NOBODY)
    looked_up = connector.channels.unix_listen.credentials

    def swapped_meanwhile(pid: int, proc_root: str) -> Credentials | None:
        os.rename(vm, home / "moved")  # nobody may: its home
        os.symlink(elsewhere, vm)
        return looked_up(pid, proc_root)

    monkeypatch.setattr(connector.channels.unix_listen, "credentials", swapped_meanwhile)
    with serving(discovered_for(nobodys_process, vm / "listen.sock")) as channel:
        assert (channel.state, channel.last_error) == (ChannelState.WAITING, None)
        assert served(home / "moved" / "listen.sock")
        assert not os.path.lexists(elsewhere / "listen.sock")
    assert not os.path.lexists(home / "moved" / "listen.sock")  # removed where it was made


def test_another_users_stale_socket_in_a_sticky_directory_is_left(
    short_tmp: Path, nobodys_process: int
) -> None:
    """In a sticky directory (``/tmp``) nobody may make names but not remove another
    user's: nor may the connector for it."""
    sticky = short_tmp / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    short_tmp.chmod(0o755)
    path = sticky / "root.sock"
    stale_socket(path)
    with serving(discovered_for(nobodys_process, path)) as channel:
        assert channel.state is ChannelState.ERROR
        assert f"may not remove another user's file from {sticky} (sticky)" in (
            channel.last_error or ""
        )
        assert os.path.lexists(path)
    os.chown(path, NOBODY, NOBODY)  # its own: replaced
    with serving(discovered_for(nobodys_process, path)) as channel:
        assert channel.state is ChannelState.WAITING
        assert served(path)


# -- a claim on another VM's channel -----------------------------------------------------------

# A config file nobody's qemu reads at start (its port's chardev, a socket of its own),
# rewritten once qemu has read it: discovery reads it when it looks, so the rewrite is a
# claim on whatever path it names.
CLAIM_CFG = """[chardev "c0"]
  backend = "socket"
  path = "{path}"
  server = "{server}"
  wait = "off"
"""


def claiming_qemu(
    children: list[subprocess.Popen[Any]], home: Path, claimed: Path, server: str = "on"
) -> subprocess.Popen[bytes]:
    """nobody's qemu ``attacker``, whose config names ``claimed`` once it has started."""
    config = home / "vm.cfg"
    config.write_text(CLAIM_CFG.format(path="own.sock", server="on"))
    os.chown(config, NOBODY, NOBODY)
    args = qemu_args("attacker", home / "qmp.sock", None, "-readconfig", "vm.cfg")
    qemu = start_qemu(children, args, home / "qmp.sock")
    config.write_text(CLAIM_CFG.format(path=claimed, server=server))
    return qemu


def root_dir(base: Path, name: str) -> Path:
    directory = base / name
    directory.mkdir(parents=True)
    return directory


def test_a_qemu_naming_another_vms_socket_does_not_get_its_channel(
    short_tmp: Path, children: list[subprocess.Popen[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """nobody's qemu (started first, so the scan meets it first) names root's VM's
    listening socket: the VM's traffic went to the broker under nobody's guest name."""
    home = home_of_nobody(short_tmp)
    socket_path = root_dir(short_tmp, "victim") / "amqp.sock"
    attacker = claiming_qemu(children, home, socket_path)
    chardev = f"socket,id=c0,path={socket_path},server=on,wait=off"
    victim_qmp = root_dir(short_tmp, "victim-qmp") / "qmp.sock"
    victim = start_qemu(children, qemu_args("victim", victim_qmp, chardev), victim_qmp, user=0)
    assert attacker.pid < victim.pid
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        spec = scanned(discovery_settings(short_tmp))[str(socket_path)]
    assert (spec.identity.name, spec.identity.pid) == ("victim", victim.pid)
    assert f"port {PORT}: {socket_path} is not a socket this qemu listens on" in caplog.text


def test_a_watched_socket_no_trusted_qemu_holds_is_not_given_to_one_that_names_it(
    short_tmp: Path, children: list[subprocess.Popen[Any]]
) -> None:
    """A VM whose qemu discovery does not trust (its user is not in qemu_users) is served
    from its socket's path alone, under its directory's name. nobody's qemu named that
    socket and had it reported again, under nobody's guest name."""
    home = home_of_nobody(short_tmp)
    target = root_dir(short_tmp, "target/domain-3-victim")
    os.chown(target, OTHER_USER, OTHER_USER)
    socket_path = target / PORT
    claiming_qemu(children, home, socket_path)
    chardev = f"socket,id=c0,path={socket_path},server=on,wait=off"
    qmp = target / "qmp.sock"
    start_qemu(children, qemu_args("victim", qmp, chardev), qmp, user=OTHER_USER)
    settings = discovery_settings(short_tmp, f"{short_tmp}/target/*/org.qpid.amqp.*")
    identity = scanned(settings)[str(socket_path)].identity
    assert (identity.name, identity.pid, identity.found_by) == ("victim", None, "watch")


def test_a_socket_another_qemu_took_after_discovery_is_refused_at_connect(
    short_tmp: Path, children: list[subprocess.Popen[Any]]
) -> None:
    """root's VM listens in a directory nobody may write (libvirt's channel directories
    are qemu's user's). nobody's qemu, given the same path, unlinks that socket and binds
    its own, as qemu does: the connector, (re)connecting for root's VM, served nobody's
    guest under root's VM's name."""
    home = home_of_nobody(short_tmp)
    socket_path = home / "amqp.sock"
    chardev = f"socket,id=c0,path={socket_path},server=on,wait=off"
    victim_qmp = root_dir(short_tmp, "victim-qmp") / "qmp.sock"
    victim = start_qemu(children, qemu_args("victim", victim_qmp, chardev), victim_qmp, user=0)
    spec = discovered(short_tmp, victim.pid)[PORT]
    taker_qmp = root_dir(short_tmp, "taker-qmp") / "qmp.sock"
    os.chown(taker_qmp.parent, NOBODY, NOBODY)
    taker = start_qemu(children, qemu_args("taker", taker_qmp, chardev), taker_qmp)
    with serving(spec) as channel:
        assert channel.state is ChannelState.ERROR
        assert f"its listener was made by pid {taker.pid}" in (channel.last_error or "")
        assert f"not qemu pid {victim.pid}'s" in (channel.last_error or "")
        assert channel.errors_by_condition["connector:wrong-peer"] == 1


def test_a_unix_listen_channel_refuses_another_vms_qemu(
    short_tmp: Path, children: list[subprocess.Popen[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """nobody's qemu claims the path root's VM connects to (``server=off``), and gets the
    channel. root's VM's qemu connected to it, and its guest was served as nobody's."""
    home = home_of_nobody(short_tmp)
    socket_path = home / "shared.sock"
    attacker = claiming_qemu(children, home, socket_path, server="off")
    chardev = f"socket,id=c0,path={socket_path},server=off,reconnect=1"
    victim_qmp = root_dir(short_tmp, "victim-qmp") / "qmp.sock"
    victim = start_qemu(children, qemu_args("victim", victim_qmp, chardev), victim_qmp, user=0)
    assert attacker.pid < victim.pid
    spec = scanned(discovery_settings(short_tmp))[str(socket_path)]
    assert spec.identity.pid == attacker.pid  # the path is its to listen on; not its peer
    with caplog.at_level(logging.INFO), serving(spec) as channel:
        for _ in range(40):  # the victim's qemu connects within its reconnect interval
            if channel.errors_by_condition["connector:wrong-peer"]:
                break
            turn(channel, 0.1)
        assert channel.errors_by_condition["connector:wrong-peer"] >= 1
        assert channel.state is ChannelState.WAITING
        assert f"channel {socket_path} open" not in caplog.text
        refusal = f"refused pid {victim.pid}: not qemu pid {attacker.pid}, whose channel this is"
        assert refusal in caplog.text


# A process that connects to argv[1] when told (a line on stdin), and holds the connection.
PEER = (
    "import socket, sys\n"
    "sys.stdin.readline()\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.connect(sys.argv[1])\n"
    "sys.stdin.readline()\n"
)


def test_after_a_wrong_peer_the_channel_serves_its_own_qemu(
    short_tmp: Path, children: list[subprocess.Popen[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """A refused peer costs the channel nothing: it keeps listening, and the qemu it was
    discovered for (here a process standing for it) is served when it connects."""
    path = short_tmp / "listen.sock"
    own = subprocess.Popen(
        [sys.executable, "-c", PEER, str(path)], stdin=subprocess.PIPE, text=True
    )
    children.append(own)
    with caplog.at_level(logging.INFO), serving(discovered_for(own.pid, path)) as channel:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
            stranger.connect(str(path))
            turn(channel, SETTLE_S)
            stranger.settimeout(1.0)
            assert stranger.recv(1) == b""  # closed on it
        assert channel.errors_by_condition["connector:wrong-peer"] == 1
        assert own.stdin is not None
        own.stdin.write("go\n")
        own.stdin.flush()
        for _ in range(50):
            if f"channel {path} open" in caplog.text:
                break
            turn(channel, 0.1)
        assert f"channel {path} open (unix-listen)" in caplog.text


def test_a_listener_libvirt_makes_and_passes_to_qemu_is_qemus(
    short_tmp: Path, children: list[subprocess.Popen[Any]]
) -> None:
    """What the checks must keep working: libvirt binds a channel's socket and passes it
    to qemu (``fd=N``); the socket is qemu's, though another process made it."""
    directory = root_dir(short_tmp, "target/domain-4-libvirt")
    socket_path = directory / PORT
    listener = listening(socket_path)
    fd = listener.fileno()
    qmp = directory / "qmp.sock"
    chardev = f"socket,id=c0,fd={fd},server=on,wait=off"
    proc = subprocess.Popen(
        qemu_args("passed", qmp, chardev), pass_fds=(fd,), stderr=subprocess.PIPE
    )
    children.append(proc)
    listener.close()  # as libvirt does once qemu runs
    wait_for_path(qmp)
    spec = discovered(short_tmp, proc.pid)[PORT]
    assert spec.path == str(socket_path)
    with serving(spec) as channel:
        assert (channel.state, channel.last_error) == (ChannelState.WAITING, None)
        assert channel._fd is not None  # connected


def test_a_daemonized_qemus_channels_are_its_own(short_tmp: Path) -> None:
    """What the checks must keep working: after ``-daemonize`` the running qemu is the
    forked child, whose pid discovery reports; it listens on its ``server=on`` socket (in
    the directory it started in) and connects to its ``server=off`` one (at ``/NAME``)."""
    vm = root_dir(short_tmp, "vm")
    name = f"{short_tmp.name}-listen.sock"
    args = qemu_args(
        "daemonized", vm / "qmp.sock", "socket,id=c0,path=amqp.sock,server=on,wait=off",
        "-chardev", f"socket,id=c1,path={name},server=off,reconnect=1",
        "-device", "virtserialport,chardev=c1,name=org.qpid.amqp.1",
        "-daemonize", "-pidfile", "qemu.pid",
    )  # fmt: skip
    env = {**os.environ, "PWD": str(vm)}
    started = subprocess.run(args, cwd=vm, env=env, capture_output=True)
    assert started.returncode == 0, started.stderr
    pid = int((vm / "qemu.pid").read_text())
    try:
        specs = discovered(short_tmp, pid)
        assert specs[PORT].path == f"{vm}/amqp.sock"
        assert specs["org.qpid.amqp.1"].path == f"/{name}"
        with serving(specs[PORT]) as unix, serving(specs["org.qpid.amqp.1"]) as listen:
            for _ in range(40):  # qemu reconnects every second
                if listen._fd is not None:
                    break
                turn(listen, 0.1)
            assert (unix.state, unix.last_error, unix._fd is not None) == (
                ChannelState.WAITING, None, True,
            )  # fmt: skip
            assert (listen.last_error, listen._fd is not None) == (None, True)
    finally:
        os.kill(pid, 9)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/{name}")


def test_a_qemu_that_binds_its_socket_after_its_last_look_still_claims_it(
    short_tmp: Path,
) -> None:
    """A socket is claimed only once qemu listens on it, and a qemu met while starting is
    looked at for a few seconds only. A TCG qemu (no uevent) slower than that would have
    its socket served from the path alone, under the directory's name: the socket's
    appearance makes discovery look at the children that name it again."""
    qemu = python_named_qemu(short_tmp)
    directory = root_dir(short_tmp, "target/domain-5-slow")
    path = directory / f"{PORT}.sock"
    args = fake_qemu_args(directory, "slow", "-accel", "tcg", sock=PORT)
    settings = replace(
        discovery_settings(short_tmp, f"{short_tmp}/target/*/org.qpid.amqp.*"),
        sources=frozenset({"watch"}),
        libvirt_retry_seconds=0.05,
    )

    async def scenario() -> None:
        slow = FakeQemuProcess(qemu, args, hold=True)
        try:
            await poll_until(lambda: "slow" in Path(f"/proc/{slow.pid}/cmdline").read_text())
            sink = RecordingSink()
            discovery = Discovery(settings, sink, asyncio.get_running_loop(), LOG)
            discovery.start()
            try:
                await asyncio.sleep(0.2)  # its window has closed
                assert sink.live(str(directory)) == {}
                slow.command("go")
                # It binds before it listens, and the watch may see the socket in between:
                # served from its path alone until the look that sees it listening.
                await sink.wait_for(lambda: str(path) in sink.of_pid(slow.pid))
                assert sink.live()[str(path)].identity.name == "slow"
            finally:
                discovery.stop()
        finally:
            slow.stop()

    asyncio.run(scenario())


def test_a_peer_connecting_in_a_loop_is_logged_once_and_counted_each_time(
    short_tmp: Path, children: list[subprocess.Popen[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Each refusal was its own warning: a process connecting in a loop flooded the log."""
    path = short_tmp / "listen.sock"
    children.append(subprocess.Popen(["sleep", "60"]))
    with caplog.at_level(logging.INFO), serving(discovered_for(children[-1].pid, path)) as ch:
        for _ in range(5):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
                stranger.connect(str(path))
                turn(ch, SETTLE_S)
                stranger.settimeout(1.0)
                assert stranger.recv(1) == b""  # refused, each time
        assert ch.errors_by_condition["connector:wrong-peer"] == 5
        assert caplog.text.count("whose channel this is") == 1
