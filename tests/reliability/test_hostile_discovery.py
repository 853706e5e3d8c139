"""Discovery against a hostile or unlucky host, with real parts: processes whose command
line reads like qemu's issue real ``KVM_CREATE_VM`` ioctls (the kernel sends the uevents),
and real sockets, ptys, status files and inotify.

Other suites may run qemu at the same time; every test looks only at its own pids and paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from connector.discovery import Discovery
from connector.discovery.settings import DiscoverySettings
from connector.identity import ChannelKind
from tests.integration.discovery_helpers import (
    LOG,
    NEEDS_KVM,
    FakeQemuProcess,
    RecordingSink,
    ask_unix,
    create_vms,
    kvm_settings,
    poll_until,
    python_named_qemu,
    short_tmp,
    write_status,
)

__all__ = ["short_tmp"]  # a fixture, used by name

PORT = "org.qpid.amqp.0"
Running = tuple[Discovery, RecordingSink]


def qemu_args(directory: Path, name: str, *extra: str, sock: str = "") -> list[str]:
    """A guest ``name`` with one listening unix port at ``directory/(sock or name).sock``."""
    return [
        "-name", f"guest={name},debug-threads=on",
        "-uuid", str(uuid.uuid4()),
        *extra,
        "-chardev", f"socket,id=c0,path={directory}/{sock or name}.sock,server=on,wait=off",
        "-device", f"virtserialport,chardev=c0,name={PORT}",
    ]  # fmt: skip


def watch_settings(root: Path, *more_sources: str) -> DiscoverySettings:
    """The directory watch over ``root/target/*/org.qpid.amqp.*``, without libvirt."""
    return kvm_settings(
        root / "no-libvirt",
        sources=frozenset({"watch", *more_sources}),
        watch_globs=(f"{root}/target/*/org.qpid.amqp.*",),
    )


@asynccontextmanager
async def discovering(settings: DiscoverySettings) -> AsyncIterator[Running]:
    """A started ``Discovery`` with a recording sink, stopped on the way out."""
    sink = RecordingSink()
    discovery = Discovery(settings, sink, asyncio.get_running_loop(), LOG)
    discovery.start()
    try:
        yield discovery, sink
    finally:
        discovery.stop()


async def start_found(
    fakes: list[FakeQemuProcess], sink: RecordingSink, qemu: Path, args: list[str]
) -> FakeQemuProcess:
    """Start a fake qemu (stopped by ``run``) and wait until discovery reports its VM."""
    fake = FakeQemuProcess(qemu, args)
    fakes.append(fake)
    await sink.wait_for(lambda: bool(sink.of_pid(fake.pid)))
    return fake


def run(scenario: Callable[[list[FakeQemuProcess]], object]) -> None:
    """Run ``scenario(fakes)`` on a fresh loop; every fake it starts is stopped after."""
    fakes: list[FakeQemuProcess] = []

    async def main() -> None:
        try:
            await scenario(fakes)  # type: ignore[misc]
        finally:
            for fake in fakes:
                fake.stop()

    asyncio.run(main())


# -- whom to trust -------------------------------------------------------------------------


def test_a_qemu_another_local_user_runs_does_not_speak_for_a_guest(short_tmp: Path) -> None:
    """Any local user may run qemu (``/usr/bin/qemu-system-*``, or anything named so) and
    give it any ``-name``. The connector would connect to that user's socket and offer
    the broker whatever the user sends there as that guest's traffic, under its name and
    policy. Here ``nobody`` runs a root-owned copy of the system's Python, named as qemu."""
    short_tmp.chmod(0o755)
    qemu = short_tmp / "qemu-system-x86_64"
    shutil.copy2("/usr/bin/python3.11", qemu)
    home = short_tmp / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    args = [
        "-name", "guest=web1", "-accel", "tcg",
        "-chardev", f"socket,id=c0,path={home}/impostor.sock,server=on",
        "-device", f"virtserialport,chardev=c0,name={PORT}",
    ]  # fmt: skip

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        impostor = FakeQemuProcess(qemu, args, user=65534)
        fakes.append(impostor)
        impostor.created_at()
        async with discovering(kvm_settings(short_tmp / "no-libvirt")) as (_, sink):
            assert not sink.of_pid(impostor.pid)

    run(scenario)


# -- qemu command lines ---------------------------------------------------------------------


@NEEDS_KVM
def test_a_command_line_discovery_cannot_read_hides_no_other_vm(tmp_path: Path) -> None:
    """A JSON ``-device`` whose driver is a list (qemu refuses it only after creating the
    VM) stands beside a good port; a second VM is created in the same batch of uevents."""
    qemu = python_named_qemu(tmp_path)
    poison = '{"driver":["virtserialport"],"chardev":"c0","name":"org.qpid.amqp.9"}'

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        async with discovering(kvm_settings(tmp_path / "no-libvirt")) as (discovery, sink):
            odd = FakeQemuProcess(qemu, qemu_args(tmp_path, "odd", "-device", poison))
            fakes.append(odd)
            odd.created_at()  # both VMs exist before the loop reads a uevent: one batch
            fine = FakeQemuProcess(qemu, qemu_args(tmp_path, "fine"))
            fakes.append(fine)
            fine.created_at()
            await sink.wait_for(lambda: bool(sink.of_pid(odd.pid) and sink.of_pid(fine.pid)))
            assert [s.identity.name for s in sink.of_pid(odd.pid).values()] == ["odd"]
            assert discovery.stats().get("errors", 0) == 0

    run(scenario)


@NEEDS_KVM
def test_a_guest_name_cannot_lead_to_a_status_file_outside_libvirts_directory(
    tmp_path: Path,
) -> None:
    """qemu's ``-name`` picks which ``NAME.xml`` is read; with ``../`` in it, a file
    anyone could write would name the channels, a pty of the writer's choosing included
    (here the test's own terminal), as if libvirt had."""
    qemu = python_named_qemu(tmp_path)
    status_dir, elsewhere = tmp_path / "status", tmp_path / "elsewhere"
    status_dir.mkdir()
    elsewhere.mkdir()
    master, terminal = os.openpty()

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        settings = kvm_settings(status_dir, libvirt_retry_interval=0.02)
        async with discovering(settings) as (discovery, sink):
            fake = FakeQemuProcess(qemu, qemu_args(tmp_path, "../elsewhere/vm", sock="vm"))
            fakes.append(fake)
            pty = [("pty", "org.qpid.amqp.5", os.ttyname(terminal), None)]
            write_status(elsewhere, "vm", str(uuid.uuid4()), fake.pid, pty)
            await sink.wait_for(lambda: bool(sink.of_pid(fake.pid)))
            await poll_until(lambda: discovery.stats().get("retries", 0) >= 3)
            specs = list(sink.of_pid(fake.pid).values())
            assert [(s.path, s.identity.found_by) for s in specs] == [
                (f"{tmp_path}/vm.sock", "cmdline")
            ]

    try:
        run(scenario)
    finally:
        os.close(master)
        os.close(terminal)


@NEEDS_KVM
def test_a_relative_socket_path_is_qemus_not_the_connectors(tmp_path: Path) -> None:
    """Someone running qemu by hand in their own directory writes ``path=amqp.sock``: that
    names a file in qemu's working directory, not in the connector's."""
    qemu = python_named_qemu(tmp_path)
    args = [
        "-name", "guest=by-hand",
        "-chardev", "socket,id=c0,path=amqp.sock,server=on",
        "-device", f"virtserialport,chardev=c0,name={PORT}",
        "-chardev", "socket,id=c1,path=listen.sock,server=off,reconnect=1",
        "-device", "virtserialport,chardev=c1,name=org.qpid.amqp.1",
    ]  # fmt: skip

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        async with discovering(kvm_settings(tmp_path / "no-libvirt")) as (_, sink):
            fake = FakeQemuProcess(qemu, args, cwd=tmp_path)
            fakes.append(fake)
            await sink.wait_for(lambda: len(sink.of_pid(fake.pid)) == 2)
            assert sorted(sink.of_pid(fake.pid)) == [
                f"{tmp_path}/amqp.sock",
                f"{tmp_path}/listen.sock",
            ]
            spec = sink.of_pid(fake.pid)[f"{tmp_path}/amqp.sock"]
            answer = await asyncio.to_thread(ask_unix, spec.path, b"hi")
            assert answer == f"{PORT}:hi".encode()

    run(scenario)


def forge_rows(directory: Path, inode: int, before: str) -> list[socket.socket]:
    """Bind sockets whose paths print in ``/proc/net/unix`` as a second row that claims
    socket ``inode`` for the path ``/x/e``, until one of them is listed before the row of
    ``before`` (the table's order follows a hash, so it takes a few tries)."""
    forgers: list[socket.socket] = []
    for attempt in range(200):
        row_start = directory / f"f{attempt}\n0: 0 0 0 0 0 {inode} "
        (row_start / "x").mkdir(parents=True)
        forger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        forger.bind(str(row_start / "x" / "e"))
        forgers.append(forger)
        table = Path("/proc/self/net/unix").read_text()
        if table.find(f" {inode} /x/e") < table.find(before):
            return forgers
    for forger in forgers:
        forger.close()
    pytest.skip("no forged row came before the real one in 200 tries")


@NEEDS_KVM
def test_a_forged_row_in_the_socket_table_does_not_give_a_passed_sockets_path(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """libvirt passes a channel's socket to qemu as ``fd=N``; its path is looked up by
    inode in ``/proc/PID/net/unix``, which any local user can write rows into by binding
    a path with a newline in it. Believed, the forged row would make the connector serve
    a socket of the forger's choosing as the guest's channel, under the guest's name."""
    qemu = python_named_qemu(short_tmp)
    path = str(short_tmp / PORT)

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        settings = kvm_settings(short_tmp / "no-libvirt", libvirt_retry_seconds=0.0)
        async with discovering(settings) as (_, sink):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
                bound.bind(path)
                bound.listen(1)
                forgers = forge_rows(short_tmp, os.fstat(bound.fileno()).st_ino, path)
                try:
                    args = [
                        "-name", "guest=passed",
                        "-chardev", f"socket,id=c0,fd={bound.fileno()},server=on,wait=off",
                        "-device", f"virtserialport,chardev=c0,name={PORT}",
                        "-chardev", f"socket,id=c1,path={short_tmp}/plain.sock,server=on",
                        "-device", "virtserialport,chardev=c1,name=org.qpid.amqp.1",
                    ]  # fmt: skip
                    fake = FakeQemuProcess(qemu, args, pass_fds=(bound.fileno(),))
                    fakes.append(fake)
                    await sink.wait_for(lambda: bool(sink.of_pid(fake.pid)))
                finally:
                    for forger in forgers:
                        forger.close()
            # One look (no window for more): both ports were resolved in it.
            assert list(sink.of_pid(fake.pid)) == [f"{short_tmp}/plain.sock"]
            assert "guest passed" in caplog.text and "more than one socket" in caplog.text

    run(scenario)


# -- libvirt's status files ------------------------------------------------------------


@NEEDS_KVM
def test_libvirts_late_file_replaces_what_the_command_line_said(tmp_path: Path) -> None:
    """Without the directory watch, libvirt's file is found by looking again. It is the
    most exact source: where it names another path for a port, the command line's goes."""
    qemu = python_named_qemu(tmp_path)
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    exact = str(tmp_path / "exact.sock")

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        settings = kvm_settings(status_dir, libvirt_retry_interval=0.02)
        async with discovering(settings) as (_, sink):
            fake = await start_found(fakes, sink, qemu, qemu_args(tmp_path, "late"))
            write_status(status_dir, "late", str(uuid.uuid4()), fake.pid,
                         [("unix", PORT, exact, "bind")])  # fmt: skip
            await sink.wait_for(lambda: exact in sink.of_pid(fake.pid))
            assert list(sink.of_pid(fake.pid)) == [exact]
            assert sink.gone(f"{tmp_path}/late.sock") == ["channel removed from the domain"]

    run(scenario)


@NEEDS_KVM
def test_a_status_file_under_another_name_is_not_the_qemus(tmp_path: Path) -> None:
    """A stale file (libvirtd was down when its domain died, and the pid came round to
    another qemu) names the pid of a running qemu of another name: it is not that qemu's,
    and must neither take its channels away nor add its own."""
    qemu = python_named_qemu(tmp_path)
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    stale = str(tmp_path / "stale.sock")
    settings = kvm_settings(
        status_dir, sources=frozenset({"kvm", "watch"}), libvirt_retry_seconds=0.0
    )

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        async with discovering(settings) as (discovery, sink):
            fake = await start_found(fakes, sink, qemu, qemu_args(tmp_path, "current"))
            write_status(status_dir, "gone-long-ago", str(uuid.uuid4()), fake.pid,
                         [("unix", PORT, stale, "bind")])  # fmt: skip
            await poll_until(lambda: discovery.stats().get("libvirt_status_events", 0) >= 1)
            assert list(sink.of_pid(fake.pid)) == [f"{tmp_path}/current.sock"]

    run(scenario)


# -- the directory watch ------------------------------------------------------------------


@NEEDS_KVM
def test_a_socket_seen_before_its_qemu_gets_the_qemus_identity(short_tmp: Path) -> None:
    """libvirt binds a channel's socket itself and passes it to qemu (``fd=N``), so the
    watch sees the socket before any qemu claims it, and reports it by its directory:
    libvirt shortens long names there, and there is no UUID. When the qemu comes, the
    channel must be reported again with the name and UUID qemu was given."""
    qemu = python_named_qemu(short_tmp)
    long_name = "accounting-database-primary-eu-west"
    directory = short_tmp / "target" / f"domain-7-{long_name[:20]}"
    directory.mkdir(parents=True)
    path = str(directory / PORT)
    settings = watch_settings(short_tmp, "kvm")

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        async with discovering(settings) as (_, sink):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
                bound.bind(path)  # what libvirtd does before it starts qemu
                bound.listen(1)
                await sink.wait_for(lambda: path in sink.live())
                assert sink.live()[path].identity.name == long_name[:20]
                guest_uuid = str(uuid.uuid4())
                args = [
                    "-name", f"guest={long_name}", "-uuid", guest_uuid,
                    "-chardev", f"socket,id=c0,fd={bound.fileno()},server=on,wait=off",
                    "-device", f"virtserialport,chardev=c0,name={PORT}",
                ]  # fmt: skip
                fake = FakeQemuProcess(qemu, args, pass_fds=(bound.fileno(),))
                fakes.append(fake)
                await sink.wait_for(lambda: path in sink.of_pid(fake.pid))
                identity = sink.live()[path].identity
                assert (identity.name, identity.uuid) == (long_name, guest_uuid)

    run(scenario)


def test_an_inotify_queue_overflow_loses_no_socket(short_tmp: Path) -> None:
    """While the loop is busy, a storm of entries overflows the inotify queue (16384 events
    by default) and the kernel drops the rest, a socket's removal and another's creation
    among them; the overflow marker alone must make discovery read the tree again."""
    directory = short_tmp / "target" / "domain-3-storm"
    directory.mkdir(parents=True)
    first, second = str(directory / PORT), str(directory / "org.qpid.amqp.1")
    settings = watch_settings(short_tmp)

    async def scenario(_: list[FakeQemuProcess]) -> None:
        with socket.socket(socket.AF_UNIX) as old, socket.socket(socket.AF_UNIX) as new:
            old.bind(first)
            async with discovering(settings) as (_, sink):
                assert first in sink.live()
                for index in range(6000):  # 3 events each: create, close, delete
                    (directory / f"x{index}").touch()
                    (directory / f"x{index}").unlink()
                os.unlink(first)
                new.bind(second)
                await sink.wait_for(lambda: second in sink.live() and first not in sink.live())
                assert sink.gone(first) == ["socket removed"]

    run(scenario)


def test_a_symlink_in_a_channel_directory_is_not_a_channel(short_tmp: Path) -> None:
    """qemu creates sockets in libvirt's channel directories, never symlinks. A symlink
    there (planted by a qemu a guest has broken out into: qemu's user owns the directory)
    would make the connector, which may override file permissions, connect to any socket
    on the host under that guest's name."""
    directory = short_tmp / "target" / "domain-4-escaped"
    directory.mkdir(parents=True)
    elsewhere = short_tmp / "private.sock"
    settings = watch_settings(short_tmp)

    async def scenario(_: list[FakeQemuProcess]) -> None:
        with socket.socket(socket.AF_UNIX) as private, socket.socket(socket.AF_UNIX) as real:
            private.bind(str(elsewhere))
            async with discovering(settings) as (_, sink):
                os.symlink(elsewhere, directory / PORT)
                real.bind(str(directory / "org.qpid.amqp.1"))  # one event after the link
                await sink.wait_for(lambda: str(directory / "org.qpid.amqp.1") in sink.live())
                assert list(sink.live(str(short_tmp))) == [str(directory / "org.qpid.amqp.1")]

    run(scenario)


def test_a_socket_replaced_by_another_qemus_is_that_qemus(short_tmp: Path) -> None:
    """A qemu without KVM (no uevent) exits and another starts on the same socket path (a
    service restarted, a path reused) before the loop looks: the directory holds a socket
    at that path before and after, but it is a new socket, of another qemu."""
    qemu = python_named_qemu(short_tmp)
    directory = short_tmp / "target" / "domain-8-reused"
    directory.mkdir(parents=True)
    path = str(directory / PORT)
    settings = watch_settings(short_tmp)

    def tcg_qemu(name: str) -> FakeQemuProcess:
        return FakeQemuProcess(qemu, [
            "-name", f"guest={name}", "-accel", "tcg",
            "-chardev", f"socket,id=c0,path={path},server=on",
            "-device", f"virtserialport,chardev=c0,name={PORT}",
        ])  # fmt: skip

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        first = tcg_qemu("first")
        fakes.append(first)
        first.created_at()
        async with discovering(settings) as (_, sink):
            assert sink.live()[path].identity.name == "first"
            first.stop()  # the loop does not turn until the next await: one batch
            second = tcg_qemu("second")
            fakes.append(second)
            second.created_at()
            await sink.wait_for(lambda: path in sink.of_pid(second.pid))
            assert sink.live()[path].identity.name == "second"

    run(scenario)


@NEEDS_KVM
def test_the_connectors_own_listener_bound_again_is_not_news(short_tmp: Path) -> None:
    """For a ``server=off`` chardev the connector binds the socket qemu connects to; in a
    watched directory, binding it again (a channel restarted) is a new socket at a path a
    running qemu claims, and must not take the channel away."""
    qemu = python_named_qemu(short_tmp)
    directory = short_tmp / "target" / "domain-9-listen"
    directory.mkdir(parents=True)
    path = str(directory / PORT)
    args = [
        "-name", "guest=listen",
        "-chardev", f"socket,id=c0,path={path},server=off,reconnect=1",
        "-device", f"virtserialport,chardev=c0,name={PORT}",
    ]  # fmt: skip

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        async with discovering(watch_settings(short_tmp, "kvm")) as (discovery, sink):
            fake = await start_found(fakes, sink, qemu, args)

            async def seen(step: Callable[[], object]) -> None:
                events = discovery.stats().get("watch_events", 0)
                step()
                await poll_until(lambda: discovery.stats().get("watch_events", 0) > events)

            def bind() -> None:
                listener = socket.socket(socket.AF_UNIX)
                listeners.append(listener)
                listener.bind(path)

            # As the daemon's unix-listen endpoint does when a channel is restarted: the
            # old one's close unlinks, the new one binds; seen apart, then together.
            listeners: list[socket.socket] = []
            try:
                await seen(bind)
                await seen(lambda: os.unlink(path))
                await seen(bind)
                await seen(lambda: (os.unlink(path), bind()))
            finally:
                for listener in listeners:
                    listener.close()
            assert sink.gone(path) == []
            assert path in sink.of_pid(fake.pid)

    run(scenario)


def discovery_log_as_nobody(
    settings: DiscoverySettings, meanwhile: Callable[[], object] = lambda: None
) -> str:
    """What discovery logs when it runs as ``nobody`` (a forked child: the test's Python
    lives where ``nobody`` cannot run it) while ``meanwhile()`` runs in the parent, up to
    its first KVM uevent read, if it reads uevents."""
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            handler = logging.StreamHandler(os.fdopen(write_end, "w"))
            LOG.addHandler(handler)
            LOG.setLevel(logging.INFO)

            async def start() -> None:
                async with discovering(settings) as (discovery, _):
                    os.write(ready_write, b"x")
                    if "kvm" in settings.sources:
                        await poll_until(lambda: discovery.stats().get("kvm_create", 0) > 0)

            asyncio.run(start())
            handler.flush()
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    os.close(ready_write)
    os.read(ready_read, 1)  # the child's discovery has started
    os.close(ready_read)
    meanwhile()
    with os.fdopen(read_end) as lines:
        log = lines.read()
    _, status = os.waitpid(child, 0)
    assert status == 0, log
    return log


def test_a_directory_the_connector_may_not_read_is_named_in_a_warning(short_tmp: Path) -> None:
    """Run in the wrong group, the connector cannot read libvirt's channel directories
    (qemu's user owns them, mode 0750): it must say so, not find nothing without a word."""
    short_tmp.chmod(0o755)
    target = short_tmp / "target"
    (target / "domain-6-locked").mkdir(parents=True)
    target.chmod(0o755)
    (target / "domain-6-locked").chmod(0o700)
    log = discovery_log_as_nobody(watch_settings(short_tmp))
    assert f"{target}/domain-6-locked" in log and "Permission denied" in log, log


@NEEDS_KVM
def test_a_connector_that_may_not_read_qemus_executable_says_so(tmp_path: Path) -> None:
    """Without CAP_SYS_PTRACE the connector cannot read another user's ``/proc/PID/exe``,
    so it can trust no qemu: every VM it hears of is passed over. That must be a warning
    that says why, not an info line that calls each VM 'not qemu'."""
    tmp_path.chmod(0o755)
    qemu = python_named_qemu(tmp_path)
    fakes: list[FakeQemuProcess] = []

    def create_a_vm() -> None:
        fake = FakeQemuProcess(qemu, qemu_args(tmp_path, "unseen"))
        fakes.append(fake)
        fake.created_at()

    try:
        log = discovery_log_as_nobody(kvm_settings(tmp_path / "no-libvirt"), create_a_vm)
    finally:
        for fake in fakes:
            fake.stop()
    assert "Permission denied" in log and "CAP_SYS_PTRACE" in log, log


# -- uevents ------------------------------------------------------------------------------


@NEEDS_KVM
def test_a_qemu_seen_while_starting_is_looked_at_again_when_it_creates_its_vm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up scan (or a watch's scan) can meet a qemu that has not opened its
    chardevs yet, and its pty may take longer than the window for looking again. The VM's
    ``create`` uevent says that every chardev exists now."""
    qemu = python_named_qemu(tmp_path)
    extra = ("-chardev", "pty,id=c1", "-device", "virtserialport,chardev=c1,name=org.qpid.amqp.1")

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        starting = FakeQemuProcess(qemu, qemu_args(tmp_path, "slow", *extra), hold=True)
        fakes.append(starting)
        await poll_until(lambda: "slow" in Path(f"/proc/{starting.pid}/cmdline").read_text())
        settings = kvm_settings(tmp_path / "no-libvirt", libvirt_retry_seconds=0.05)
        async with discovering(settings) as (_, sink):
            # Neither its socket nor its pty exists yet: a socket is claimed only once qemu
            # listens on it (test_hostile_channel_claims.py).
            assert sink.of_pid(starting.pid) == {}
            await poll_until(lambda: "1 pty chardevs" in caplog.text)  # given up on the pty
            starting.command("go")
            starting.created_at()  # reads the pty's name too
            await sink.wait_for(lambda: len(sink.of_pid(starting.pid)) == 2)
            pty = {s.kind: s.path for s in sink.of_pid(starting.pid).values()}[ChannelKind.PTY]
            assert pty == starting.ptys["c1"]

    run(scenario)


@NEEDS_KVM
def test_vms_created_together_each_get_their_own_channels(tmp_path: Path) -> None:
    """Several qemus open their ptys and create their VMs while the loop is busy: one
    batch of uevents, ptys handed out interleaved. Each port must map to its own VM's
    endpoint (checked against the pty each fake reports opening)."""
    qemu = python_named_qemu(tmp_path)
    pty = ("-chardev", "pty,id=c1", "-device", "virtserialport,chardev=c1,name=org.qpid.amqp.1")
    names = [f"crowd{n}" for n in range(6)]

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        async with discovering(kvm_settings(tmp_path / "no-libvirt")) as (_, sink):
            fakes.extend(FakeQemuProcess(qemu, qemu_args(tmp_path, n, *pty)) for n in names)
            for fake in fakes:
                fake.created_at()
            await sink.wait_for(lambda: all(len(sink.of_pid(f.pid)) == 2 for f in fakes))
            for name, fake in zip(names, fakes, strict=True):
                found = {s.kind: s for s in sink.of_pid(fake.pid).values()}
                assert found[ChannelKind.PTY].path == fake.ptys["c1"]
                assert found[ChannelKind.UNIX].path == f"{tmp_path}/{name}.sock"
                assert {s.identity.name for s in found.values()} == {name}

    run(scenario)


@NEEDS_KVM
def test_a_storm_of_destroys_and_creates_ends_as_the_vm_does(tmp_path: Path) -> None:
    """One qemu destroys and creates its VM 50 times while the loop is busy, so each
    ``destroy`` is read before the ``create`` after it is handled; whatever the churn, the
    channels end as the VM does: there while it exists, gone once it is destroyed."""
    qemu = python_named_qemu(tmp_path)
    path = f"{tmp_path}/churn.sock"

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        async with discovering(kvm_settings(tmp_path / "no-libvirt")) as (discovery, sink):
            fake = FakeQemuProcess(qemu, qemu_args(tmp_path, "churn"))
            fakes.append(fake)
            fake.created_at()
            for _ in range(50):
                fake.command("destroy")
                fake.command("create")
                fake.created_at()
            await poll_until(lambda: discovery.stats().get("kvm_create", 0) >= 51)
            assert list(sink.of_pid(fake.pid)) == [path]
            assert discovery.gauges()["processes"] >= 1
            fake.command("destroy")
            await sink.wait_for(lambda: not sink.of_pid(fake.pid))
            assert len(sink.gone(path)) == 51

    run(scenario)


@NEEDS_KVM
def test_uevents_lost_to_a_full_buffer_are_made_up_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel drops uevents when the monitor's buffer is full and flags the socket.
    Here the buffer is the smallest the kernel allows and the loop is busy while a storm of
    VMs (from a process that is not qemu) fills it; a qemu's ``create`` is then lost."""
    monkeypatch.setattr("connector.discovery.kvm.RECEIVE_BUFFER_BYTES", 1)
    qemu = python_named_qemu(tmp_path)

    async def scenario(fakes: list[FakeQemuProcess]) -> None:
        async with discovering(kvm_settings(tmp_path / "no-libvirt")) as (discovery, sink):
            create_vms(40)  # the loop does not turn until the first await: nothing is read
            missed = FakeQemuProcess(qemu, qemu_args(tmp_path, "missed"))
            fakes.append(missed)
            missed.created_at()
            await sink.wait_for(lambda: bool(sink.of_pid(missed.pid)))
            assert discovery.stats()["kvm_lost"] >= 1  # and "missed" was found by a scan
            later = FakeQemuProcess(qemu, qemu_args(tmp_path, "later"))  # uevents flow again
            fakes.append(later)
            await sink.wait_for(lambda: bool(sink.of_pid(later.pid)))
            assert discovery.stats()["processes_kvm"] >= 1  # "later", by its uevent
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("dropped KVM uevents" in w for w in warnings)

    run(scenario)
