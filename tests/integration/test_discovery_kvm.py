"""Discovery from real KVM uevents: a process that looks like qemu issues KVM_CREATE_VM.

The fake qemu owns a real listening unix socket, a real pty and a unix socket that connects
out; discovery must find each from the uevent alone, map each to the right port (checked
by talking to the endpoint, which answers with its port name), and drop them when the VM
is destroyed or the process exits.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import uuid
from pathlib import Path

from discovery_helpers import (
    LOG,
    NEEDS_KVM,
    FakeQemuProcess,
    RecordingSink,
    ask_listen,
    ask_pty,
    ask_unix,
    kvm_settings,
    poll_until,
    python_named_qemu,
)

from connector.discovery import Discovery
from connector.discovery.settings import DiscoverySettings
from connector.identity import ChannelKind

pytestmark = NEEDS_KVM
# How many create→ready cycles the latency measurement takes.
LATENCY_SAMPLES = 40


def _qemu_args(tmp_path: Path, guest_uuid: str) -> list[str]:
    return [
        "-name", "guest=vmk,debug-threads=on",
        "-uuid", guest_uuid,
        "-S",
        "-chardev", "pty,id=charserial0",
        "-chardev", f"socket,id=c0,path={tmp_path}/amqp0.sock,server=on,wait=off",
        "-chardev", "pty,id=c1",
        "-chardev", f"socket,id=c2,path={tmp_path}/listen.sock,server=off,reconnect=0.1",
        "-chardev", f"socket,id=c3,path={tmp_path}/agent.sock,server=on,wait=off",
        "-device", "virtio-serial-pci,id=virtio-serial0",
        "-device", "virtserialport,chardev=c0,name=org.qpid.amqp.0",
        "-device", '{"driver":"virtserialport","chardev":"c1","name":"org.qpid.amqp.1"}',
        "-device", "virtserialport,chardev=c2,name=org.qpid.amqp.2",
        "-device", "virtserialport,chardev=c3,name=org.qemu.guest_agent.0",
    ]  # fmt: skip


async def _started(settings: DiscoverySettings) -> tuple[Discovery, RecordingSink]:
    sink = RecordingSink()
    discovery = Discovery(settings, sink, asyncio.get_running_loop(), LOG)
    discovery.start()
    return discovery, sink


def test_finds_routes_and_drops_channels_of_a_qemu_like_process(tmp_path: Path) -> None:
    qemu_exe = python_named_qemu(tmp_path)
    guest_uuid = str(uuid.uuid4())

    async def scenario() -> None:
        discovery, sink = await _started(kvm_settings(tmp_path / "no-libvirt"))
        fake = FakeQemuProcess(qemu_exe, _qemu_args(tmp_path, guest_uuid))
        try:
            await sink.wait_for(lambda: len(sink.of_pid(fake.pid)) == 3)
            specs = {s.identity.port: s for s in sink.of_pid(fake.pid).values()}
            assert sorted(specs) == ["org.qpid.amqp.0", "org.qpid.amqp.1", "org.qpid.amqp.2"]
            for port, spec in specs.items():
                assert (spec.identity.name, spec.identity.uuid) == ("vmk", guest_uuid), port
                assert spec.identity.found_by == "cmdline"
            assert specs["org.qpid.amqp.0"].kind is ChannelKind.UNIX
            assert specs["org.qpid.amqp.0"].path == f"{tmp_path}/amqp0.sock"
            assert specs["org.qpid.amqp.1"].kind is ChannelKind.PTY
            assert specs["org.qpid.amqp.2"].kind is ChannelKind.UNIX_LISTEN
            assert specs["org.qpid.amqp.2"].path == f"{tmp_path}/listen.sock"

            # Each endpoint really is that port's: it answers with the port's name.
            answers = await asyncio.gather(
                asyncio.to_thread(ask_unix, specs["org.qpid.amqp.0"].path, b"a"),
                asyncio.to_thread(ask_pty, specs["org.qpid.amqp.1"].path, b"b"),
                asyncio.to_thread(ask_listen, specs["org.qpid.amqp.2"].path, b"c"),
            )
            assert answers == [b"org.qpid.amqp.0:a", b"org.qpid.amqp.1:b", b"org.qpid.amqp.2:c"]

            paths = sorted(s.path for s in specs.values())
            fake.command("destroy")
            await sink.wait_for(lambda: not sink.of_pid(fake.pid))
            assert all(sink.gone(p) == ["VM destroyed"] for p in paths)

            fake.command("create")  # the same process makes a new VM: found again
            await sink.wait_for(lambda: len(sink.of_pid(fake.pid)) == 3)

            fake.command("exit")
            await sink.wait_for(lambda: not sink.of_pid(fake.pid))
            assert all(len(sink.gone(p)) == 2 for p in paths)
            stats = discovery.stats()
            assert stats["kvm_create"] >= 2 and stats["kvm_destroy"] >= 1
            assert stats["channels_found"] >= 6
        finally:
            fake.stop()
            discovery.stop()

    asyncio.run(scenario())


def test_a_process_that_is_not_qemu_is_ignored(tmp_path: Path) -> None:
    """Any process allowed to open /dev/kvm can create a VM; its sockets are not a guest's."""

    async def scenario() -> None:
        discovery, sink = await _started(kvm_settings(tmp_path / "no-libvirt"))
        fake = FakeQemuProcess(sys.executable, _qemu_args(tmp_path, str(uuid.uuid4())))
        try:
            await poll_until(lambda: discovery.stats().get("untrusted_pids", 0) >= 1)
            assert not sink.live(str(tmp_path))
            assert not sink.of_pid(fake.pid)
        finally:
            fake.stop()
            discovery.stop()

    asyncio.run(scenario())


def test_allowed_executables_are_configurable(tmp_path: Path) -> None:
    """The other way to let a test helper pass: name its real executable in the settings."""
    python = os.path.basename(os.path.realpath(sys.executable))
    settings = kvm_settings(tmp_path / "no-libvirt", qemu_executables=("qemu-system-*", python))

    async def scenario() -> None:
        discovery, sink = await _started(settings)
        fake = FakeQemuProcess(sys.executable, _qemu_args(tmp_path, str(uuid.uuid4())))
        try:
            await sink.wait_for(lambda: len(sink.of_pid(fake.pid)) == 3)
        finally:
            fake.stop()
            discovery.stop()

    asyncio.run(scenario())


def test_startup_scan_finds_a_running_vm(tmp_path: Path) -> None:
    qemu_exe = python_named_qemu(tmp_path)

    async def scenario() -> None:
        fake = FakeQemuProcess(qemu_exe, _qemu_args(tmp_path, str(uuid.uuid4())))
        try:
            fake.created_at()  # the VM exists before discovery starts
            discovery, sink = await _started(kvm_settings(tmp_path / "no-libvirt"))
            try:
                assert len(sink.of_pid(fake.pid)) == 3  # found by start() itself
                assert discovery.stats()["processes_scan"] >= 1
                fake.command("exit")
                await sink.wait_for(lambda: not sink.of_pid(fake.pid))
            finally:
                discovery.stop()
        finally:
            fake.stop()

    asyncio.run(scenario())


def test_latency_from_create_ioctl_to_channels(tmp_path: Path) -> None:
    """A measurement, not a timed test: create→reported for the first and the last port."""
    qemu_exe = python_named_qemu(tmp_path)
    first: list[float] = []
    last: list[float] = []

    async def scenario() -> None:
        discovery, sink = await _started(kvm_settings(tmp_path / "no-libvirt"))
        fake = FakeQemuProcess(qemu_exe, _qemu_args(tmp_path, str(uuid.uuid4())))
        try:
            for sample in range(LATENCY_SAMPLES):
                if sample:
                    fake.command("create")
                await sink.wait_for(lambda: len(sink.of_pid(fake.pid)) == 3)
                created = fake.created_at()
                times = [r.at for r in sink.records if r.spec and r.spec.identity.pid == fake.pid]
                first.append(times[-3] - created)
                last.append(times[-1] - created)
                fake.command("destroy")
                await sink.wait_for(lambda: not sink.of_pid(fake.pid))
        finally:
            fake.stop()
            discovery.stop()

    asyncio.run(scenario())
    first_ms = sorted(x * 1000 for x in first)
    last_ms = sorted(x * 1000 for x in last)
    p95 = int(len(first_ms) * 0.95) - 1
    print(
        f"\ndiscovery latency, KVM_CREATE_VM ioctl -> channel_appeared, n={len(first_ms)}:"
        f" first port median {statistics.median(first_ms):.2f} ms p95 {first_ms[p95]:.2f} ms"
        f" max {first_ms[-1]:.2f} ms; all 3 ports median {statistics.median(last_ms):.2f} ms"
        f" p95 {last_ms[p95]:.2f} ms"
    )
    assert all(0 < x < 5000 for x in first_ms)
