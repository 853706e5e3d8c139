"""Discovery reading what a hostile qemu user controls: real qemu processes, their
``-readconfig`` files, and what the user does to those files once qemu has read them.

The user is in ``qemu_users`` (discovery trusts its qemu to speak for its guest) but not
root: the daemon may read what the user may not, and must not tell it what that says.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.discovery import Discovery
from connector.discovery.settings import DiscoverySettings
from tests.integration.discovery_helpers import RecordingSink, short_tmp, wait_for_path
from tests.unit.test_discovery_resolve import SECRET_CFG

QEMU = shutil.which("qemu-system-x86_64")
NOBODY = 65534
pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64"),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs qemu as nobody, reads as root"),
]
__all__ = ["short_tmp"]  # a fixture, used by name


@pytest.fixture
def qemus() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def _scan(settings: DiscoverySettings, pid: int) -> set[str]:
    """The guest names a start-up scan reports for ``pid``."""

    async def scenario() -> set[str]:
        sink = RecordingSink()
        log = logging.getLogger("test.discovery.config")
        discovery = Discovery(settings, sink, asyncio.get_running_loop(), log)
        discovery.start()
        discovery.stop()
        return {spec.identity.name for spec in sink.of_pid(pid).values()}

    return asyncio.run(scenario())


def test_a_config_swapped_for_a_link_to_roots_file_tells_its_user_nothing(
    short_tmp: Path, qemus: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """nobody runs qemu with its own ``vm.cfg``, which qemu reads at start; then it
    replaces the file with a link to root's 0600 file. The daemon, reading as root, gave
    nobody's guest root's guest name and port; it now reads only what nobody may."""
    short_tmp.chmod(0o755)
    secret = short_tmp / "root.cfg"
    secret.write_text(SECRET_CFG)
    secret.chmod(0o600)
    home = short_tmp / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    config = home / "vm.cfg"
    config.write_text("# nothing yet\n")
    os.chown(config, NOBODY, NOBODY)
    args = [
        str(QEMU), "-accel", "tcg", "-machine", "microvm", "-S",
        "-display", "none", "-nodefaults", "-no-user-config",
        "-name", "mine", "-readconfig", "vm.cfg",
        "-chardev", "socket,id=c0,path=mine.sock,server=on,wait=off",
        "-device", "virtio-serial-device",
        "-device", "virtserialport,chardev=c0,name=org.qpid.amqp.0",
    ]  # fmt: skip
    qemu = subprocess.Popen(args, cwd=home, user=NOBODY, group=NOBODY, stderr=subprocess.PIPE)
    qemus.append(qemu)
    wait_for_path(home / "mine.sock")  # qemu has read its file by now
    config.unlink()
    config.symlink_to(secret)
    os.lchown(config, NOBODY, NOBODY)

    settings = DiscoverySettings(
        sources=frozenset({"kvm"}),
        qemu_users=("nobody",),
        libvirt_status_dir=str(short_tmp / "no-libvirt"),
        libvirt_retry_seconds=0,  # warn at the first look
        watch_globs=(),
    )
    with caplog.at_level(logging.INFO, logger="test.discovery.config"):
        names = _scan(settings, qemu.pid)
    assert names == {"mine"}  # its own port, under its own name
    assert "the-secret" not in caplog.text
    assert f"-readconfig vm.cfg: qemu's user (uid {NOBODY}) may not read it" in caplog.text
