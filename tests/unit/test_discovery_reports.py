"""What ``Discovery`` reports: counters that only grow, and only paths it can name.

A fake /proc names this test's own process as a qemu (so its pidfd is real and never
fires) whose listening socket the directory watch sees; removing the socket makes the
channel go, as qemu unlinking it on exit does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from connector.discovery import Discovery
from connector.discovery.settings import DiscoverySettings
from connector.identity import ChannelSpec
from tests.unit.test_discovery_resolve import QEMU, FakeProc

PORT = "org.qpid.amqp.0"


class Sink:
    """Remembers what discovery reported."""

    def __init__(self) -> None:
        self.live: dict[str, ChannelSpec] = {}

    def channel_appeared(self, spec: ChannelSpec) -> None:
        self.live[spec.path] = spec

    def channel_gone(self, path: str, reason: str) -> None:
        del self.live[path]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A unix socket path must fit in 108 bytes; pytest's ``tmp_path`` may not."""
    path = Path(tempfile.mkdtemp(prefix="qvs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def scan_settings(proc_root: Path, watch_globs: tuple[str, ...]) -> DiscoverySettings:
    """The directory watch over a fake /proc, without libvirt."""
    return DiscoverySettings(
        sources=frozenset({"watch"}),
        watch_globs=watch_globs,
        proc_root=str(proc_root),
        libvirt_status_dir=str(proc_root.parent / "no-libvirt"),
        watch_libvirt_status=False,
    )


def start_and_stop(settings: DiscoverySettings, sink: Sink) -> dict[str, int]:
    """What the start-up scan alone reports to ``sink``; returns the counters."""

    async def scenario() -> dict[str, int]:
        discovery = Discovery(settings, sink, asyncio.get_running_loop(), logging.getLogger())
        discovery.start()
        discovery.stop()
        return discovery.stats()

    return asyncio.run(scenario())


async def _until(condition: object, what: str) -> None:
    for _ in range(500):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_counters_never_go_down_when_a_vm_goes_away(short_tmp: Path) -> None:
    sock_path = short_tmp / "target" / "domain-1-vm1" / PORT
    sock_path.parent.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    proc = FakeProc(short_tmp / "proc")
    argv = ["qemu", "-name", "guest=vm1", "-chardev", f"socket,id=c0,path={sock_path},server=on"]
    proc.process(os.getpid(), QEMU, [*argv, "-device", f"virtserialport,chardev=c0,name={PORT}"])
    settings = scan_settings(proc.root, (f"{short_tmp}/target/*/{PORT}",))

    async def scenario() -> None:
        sink = Sink()
        discovery = Discovery(settings, sink, asyncio.get_running_loop(), logging.getLogger())
        discovery.start()
        try:
            assert list(sink.live) == [str(sock_path)]
            before = discovery.stats()
            assert discovery.gauges() == {"channels": 1, "processes": 1}
            sock_path.unlink()
            await _until(lambda: not sink.live, "the channel to go")
            after = discovery.stats()
            assert after["channels_gone"] == 1
            assert all(after[key] >= value for key, value in before.items()), (before, after)
            assert "channels" not in after and "processes" not in after
            assert discovery.gauges() == {"channels": 0, "processes": 1}
        finally:
            discovery.stop()
            listener.close()

    asyncio.run(scenario())


def test_a_watched_socket_whose_name_is_not_utf8_is_refused_with_a_warning(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch reads directory entries, whose names may hold any bytes; such a path could
    be opened but not shown in the status, logs or metrics, so it is not served."""
    target = os.fsencode(short_tmp / "target")
    listeners = []
    for guest in (b"vm1", b"caf\xe9"):
        os.makedirs(target + b"/domain-1-" + guest)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(target + b"/domain-1-" + guest + b"/" + PORT.encode())
        listeners.append(listener)
    (short_tmp / "proc").mkdir()
    sink = Sink()
    try:
        stats = start_and_stop(
            scan_settings(short_tmp / "proc", (f"{short_tmp}/target/*/{PORT}",)), sink
        )
    finally:
        for listener in listeners:
            listener.close()
    assert [spec.identity.name for spec in sink.live.values()] == ["vm1"]
    assert stats["errors"] == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "domain-1-caf\\xe9" in warning and "not UTF-8" in warning


def test_a_qemu_with_thousands_of_problems_writes_a_few_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever runs qemu may name 100,000 missing config files (or ports without a
    chardev) in its 2 MiB of arguments: a warning each, at the end of every window, would
    be megabytes of log for one VM, and bury the warnings of every other."""
    proc = FakeProc(tmp_path / "proc")
    argv = ["qemu", "-name", "noisy"]
    for n in range(1000):
        argv += ["-readconfig", f"/nonexistent/{n}.cfg"]
    proc.process(os.getpid(), QEMU, argv)
    settings = replace(scan_settings(proc.root, ()), libvirt_retry_seconds=0)
    with caplog.at_level(logging.WARNING):
        start_and_stop(settings, Sink())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 < len(warnings) <= 20
    assert warnings[0].startswith(f"discovery: guest noisy (qemu pid {os.getpid()}): -readconfig /")
    shown = len(warnings) - 1
    assert warnings[-1] == (
        f"discovery: guest noisy (qemu pid {os.getpid()}): {1000 - shown} more problems, not shown"
    )
