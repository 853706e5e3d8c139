"""``Discovery.stats()`` and ``gauges()``: counters only grow, what is known now is apart.

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
    settings = DiscoverySettings(
        sources=frozenset({"watch"}),
        watch_globs=(f"{short_tmp}/target/*/{PORT}",),
        proc_root=str(proc.root),
        libvirt_status_dir=str(short_tmp / "no-libvirt"),
        watch_libvirt_status=False,
    )

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
