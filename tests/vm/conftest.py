"""Fixtures for the VM tests: booted guests, and an in-memory AMQP peer on a port's host end.

Booting costs about 5 s under TCG, so guests are module-scoped and reused by the tests of a
module; each test leaves its guest as it found it (no AMQP connection open).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector.guest.peer import MemoryBroker, PeerThread
from tests.vm.harness import Port, Vm, ensure_assets, open_host_side


@pytest.fixture(scope="session")
def vm_assets() -> Path:
    """The cached guest kernel, initramfs and root; built on first use (a few minutes)."""
    return ensure_assets()


@pytest.fixture(scope="module")
def make_vm(
    vm_assets: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Vm]]:
    """A factory ``make_vm(name, ports, boot=True, reboot=False)``; every VM it made is
    stopped at the end."""
    made: list[Vm] = []

    def make(name: str, ports: list[Port], boot: bool = True, reboot: bool = False) -> Vm:
        vm = Vm(name, tmp_path_factory.mktemp(name), ports, reboot=reboot)
        made.append(vm)
        if boot:
            vm.boot()
        return vm

    yield make
    for vm in made:
        vm.stop()  # asks the agent to power off, kills qemu if it lingers or already died


class HostPeer(PeerThread):
    """An in-memory AMQP peer on a port's host end, answering requests on ``service``."""

    def __init__(self, port: Port) -> None:
        broker = MemoryBroker(responders={"service": lambda m: f"re:{m.body}"})
        super().__init__(open_host_side(port), broker, name=f"peer-{port.name}")

    def close(self) -> None:
        """Stop serving and close the host end (once: tests may close before teardown)."""
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def host_peer() -> Iterator[Callable[[Port], HostPeer]]:
    """``host_peer(port)`` starts a HostPeer on that port; all are closed after the test."""
    peers: list[HostPeer] = []

    def start(port: Port) -> HostPeer:
        peer = HostPeer(port)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.close()
