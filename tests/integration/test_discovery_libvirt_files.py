"""libvirt status files, written in libvirt's format, next to a qemu-like process.

Covered: a status file present at start-up (unix, pty, a connect-mode unix channel and a
port that must be ignored), a status file libvirt writes only after qemu created its VM
(found by retries on the KVM path and by the status-directory watch without KVM).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from discovery_helpers import (
    LOG,
    NEEDS_KVM,
    FakeQemuProcess,
    RecordingSink,
    ask_pty,
    ask_unix,
    kvm_settings,
    python_named_qemu,
    short_tmp,
    write_status,
)

from connector.discovery import Discovery
from connector.identity import ChannelKind

pytestmark = NEEDS_KVM
UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
__all__ = ["short_tmp"]  # a fixture, used by name


@pytest.fixture
def status_dir(short_tmp: Path) -> Path:
    path = short_tmp / "run-libvirt-qemu"
    path.mkdir()
    return path


@pytest.fixture
def qemu_exe(short_tmp: Path) -> Path:
    return python_named_qemu(short_tmp)


@pytest.fixture
def fakes() -> Iterator[list[FakeQemuProcess]]:
    started: list[FakeQemuProcess] = []
    yield started
    for fake in started:
        fake.stop()


def test_status_file_found_at_startup(
    short_tmp: Path, status_dir: Path, qemu_exe: Path, fakes: list[FakeQemuProcess]
) -> None:
    sock = f"{short_tmp}/domain-1-lv1/org.qpid.amqp.0"
    os.mkdir(os.path.dirname(sock))
    fake = FakeQemuProcess(
        qemu_exe,
        ["-name", "guest=lv1,debug-threads=on", "-S",
         "-chardev", f"socket,id=charchannel0,path={sock},server=on,wait=off",
         "-chardev", "pty,id=charchannel1",
         "-chardev", f"socket,id=charchannel2,path={short_tmp}/ga.sock,server=on,wait=off",
         "-device", "virtserialport,chardev=charchannel0,name=org.qpid.amqp.0",
         "-device", "virtserialport,chardev=charchannel1,name=org.qpid.amqp.1",
         "-device", "virtserialport,chardev=charchannel2,name=org.qemu.guest_agent.0"],
    )  # fmt: skip
    fakes.append(fake)
    fake.created_at()
    pts = fake.ptys["charchannel1"]
    write_status(
        status_dir,
        "lv1",
        UUID,
        fake.pid,
        [
            ("unix", "org.qpid.amqp.0", sock, "bind"),
            ("pty", "org.qpid.amqp.1", pts, None),
            ("unix", "org.qpid.amqp.2", f"{short_tmp}/qpid-lv1.sock", "connect"),
            ("unix", "org.qemu.guest_agent.0", f"{short_tmp}/ga.sock", "bind"),
        ],
    )

    async def scenario() -> None:
        sink = RecordingSink()
        discovery = Discovery(kvm_settings(status_dir), sink, asyncio.get_running_loop(), LOG)
        discovery.start()
        try:
            specs = {s.identity.port: s for s in sink.of_pid(fake.pid).values()}
            assert sorted(specs) == ["org.qpid.amqp.0", "org.qpid.amqp.1", "org.qpid.amqp.2"]
            assert {s.identity.found_by for s in specs.values()} == {"libvirt"}
            assert {(s.identity.name, s.identity.uuid) for s in specs.values()} == {("lv1", UUID)}
            assert (specs["org.qpid.amqp.0"].kind, specs["org.qpid.amqp.0"].path) == (
                ChannelKind.UNIX,
                sock,
            )
            assert (specs["org.qpid.amqp.1"].kind, specs["org.qpid.amqp.1"].path) == (
                ChannelKind.PTY,
                pts,
            )
            assert specs["org.qpid.amqp.2"].kind is ChannelKind.UNIX_LISTEN
            answers = await asyncio.gather(
                asyncio.to_thread(ask_unix, sock, b"x"), asyncio.to_thread(ask_pty, pts, b"y")
            )
            assert answers == [b"org.qpid.amqp.0:x", b"org.qpid.amqp.1:y"]
        finally:
            discovery.stop()

    asyncio.run(scenario())


def _late_args(short_tmp: Path) -> list[str]:
    """libvirt passes its listening socket as fd=N: the command line has no path for it."""
    return [
        "-name", "guest=late,debug-threads=on", "-uuid", UUID, "-S",
        "-chardev", "socket,id=charchannel0,fd=99,server=on,wait=off",
        "-device", '{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,'
                   '"chardev":"charchannel0","id":"channel0","name":"org.qpid.amqp.0"}',
        "-chardev", "pty,id=charchannel1",
        "-device", '{"driver":"virtserialport","bus":"virtio-serial0.0","nr":2,'
                   '"chardev":"charchannel1","id":"channel1","name":"org.qpid.amqp.1"}',
    ]  # fmt: skip


def _bind(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    return sock


@pytest.mark.parametrize("how", ["retry", "status-watch"])
def test_status_file_written_after_the_vm(
    how: str, short_tmp: Path, status_dir: Path, qemu_exe: Path, fakes: list[FakeQemuProcess]
) -> None:
    """retry: the KVM path looks again for a while. status-watch: no KVM at all (a TCG
    guest); inotify on libvirt's status directory finds the domain when it is written."""
    if how == "retry":
        settings = kvm_settings(status_dir, libvirt_retry_seconds=5.0, libvirt_retry_interval=0.05)
    else:
        settings = kvm_settings(status_dir, sources=frozenset({"watch"}), libvirt_retry_seconds=0.0)
    sock_path = f"{short_tmp}/late.sock"

    async def scenario() -> None:
        sink = RecordingSink()
        discovery = Discovery(settings, sink, asyncio.get_running_loop(), LOG)
        discovery.start()
        listener = _bind(sock_path)  # stands for the socket libvirt created for qemu
        try:
            fake = FakeQemuProcess(qemu_exe, _late_args(short_tmp))
            fakes.append(fake)
            await asyncio.to_thread(fake.created_at)
            if how == "retry":
                # The command line alone gives the pty now; the fd socket has to wait.
                await sink.wait_for(lambda: len(sink.of_pid(fake.pid)) == 1)
                (spec,) = sink.of_pid(fake.pid).values()
                assert (spec.kind, spec.identity.found_by) == (ChannelKind.PTY, "cmdline")
            pts = fake.ptys["charchannel1"]
            write_status(
                status_dir,
                "late",
                UUID,
                fake.pid,
                [
                    ("unix", "org.qpid.amqp.0", sock_path, "bind"),
                    ("pty", "org.qpid.amqp.1", pts, None),
                ],
            )
            await sink.wait_for(lambda: len(sink.of_pid(fake.pid)) == 2)
            specs = {s.identity.port: s for s in sink.of_pid(fake.pid).values()}
            assert specs["org.qpid.amqp.0"].path == sock_path
            assert specs["org.qpid.amqp.0"].identity.found_by == "libvirt"
            assert specs["org.qpid.amqp.1"].path == pts
            fake.command("exit")  # without KVM, the pidfd tells discovery qemu is gone
            await sink.wait_for(lambda: not sink.of_pid(fake.pid))
            stats = discovery.stats()
            if how == "retry":
                assert stats["retries"] >= 1
            else:
                assert stats["libvirt_status_events"] >= 1
                assert stats["process_exits"] >= 1
        finally:
            listener.close()
            discovery.stop()

    asyncio.run(scenario())


def test_hotplugged_channels_follow_the_status_file(
    short_tmp: Path, status_dir: Path, qemu_exe: Path, fakes: list[FakeQemuProcess]
) -> None:
    """``virsh attach-device``/``detach-device`` on a channel: libvirt rewrites the file."""
    settings = kvm_settings(status_dir, sources=frozenset({"watch"}), libvirt_retry_seconds=0.0)
    first, second = f"{short_tmp}/hot0.sock", f"{short_tmp}/hot1.sock"

    async def scenario() -> None:
        sink = RecordingSink()
        discovery = Discovery(settings, sink, asyncio.get_running_loop(), LOG)
        discovery.start()
        try:
            fake = FakeQemuProcess(qemu_exe, ["-name", "guest=hot", "-S"])
            fakes.append(fake)
            await asyncio.to_thread(fake.created_at)

            def status(*channels: tuple[str, str, str, str | None]) -> None:
                write_status(status_dir, "hot", UUID, fake.pid, [*channels])

            status(("unix", "org.qpid.amqp.0", first, "bind"))
            await sink.wait_for(lambda: set(sink.of_pid(fake.pid)) == {first})
            status(("unix", "org.qpid.amqp.0", first, "bind"),
                   ("unix", "org.qpid.amqp.1", second, "bind"))  # fmt: skip
            await sink.wait_for(lambda: set(sink.of_pid(fake.pid)) == {first, second})
            status(("unix", "org.qpid.amqp.1", second, "bind"))
            await sink.wait_for(lambda: set(sink.of_pid(fake.pid)) == {second})
            assert sink.gone(first) == ["channel removed from the domain"]
        finally:
            discovery.stop()

    asyncio.run(scenario())
