"""Fixtures for the VM tests: booted guests, and an in-memory AMQP peer on a port's host end.

Booting costs about 5 s under TCG, so guests are module-scoped and reused by the tests of a
module; each test leaves its guest as it found it (no AMQP connection open).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector.guest.driver import Driver
from connector.guest.peer import MemoryBroker
from tests.vm.harness import Port, Vm, ensure_assets, open_host_side


@pytest.fixture(scope="session")
def vm_assets() -> Path:
    """The cached guest kernel, initramfs and root; built on first use (a few minutes)."""
    return ensure_assets()


@pytest.fixture(scope="module")
def make_vm(
    vm_assets: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Vm]]:
    """A factory ``make_vm(name, ports, boot=True)``; every VM it made is stopped at the end."""
    made: list[Vm] = []

    def make(name: str, ports: list[Port], boot: bool = True) -> Vm:
        vm = Vm(name, tmp_path_factory.mktemp(name), ports)
        made.append(vm)
        if boot:
            vm.boot()
        return vm

    yield make
    for vm in made:
        vm.kill() if vm.proc is not None and vm.proc.poll() is not None else vm.stop()


class HostPeer:
    """An in-memory AMQP peer serving a port's host end in a thread, one guest connection
    after another (a new server transport for each, as a channel outlives connections)."""

    def __init__(self, port: Port, broker: MemoryBroker | None = None) -> None:
        self.broker = broker or MemoryBroker(responders={"service": lambda m: f"re:{m.body}"})
        self.fd = open_host_side(port)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"peer-{port.name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            driver = Driver(self.broker, self.fd, server=True, close_fd=False)
            driver.connect()
            while not self._stop.is_set() and driver.process(0.1):
                pass
            self.connections += 1
            if driver.eof:
                return  # qemu went away: the channel is finished

    def close(self) -> None:
        """Stop serving and close the host end."""
        self._stop.set()
        self._thread.join(10)
        os.close(self.fd)


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
