"""A broker host name with several addresses: a connect tries each in turn.

``localhost`` resolves to ``::1`` first on many hosts while a broker may listen on
127.0.0.1 only; before, the connector tried the first address alone and every guest was
refused for good. The connector runs in this process (one ``Channel`` on an asyncio loop in
a thread, as the daemon runs it) so that name resolution can be scripted: the broker's name
resolves first to addresses where nothing listens, then to Artemis.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import connector.upstream as upstream_module
from connector.channel import Channel
from connector.guest.client import GuestClient
from connector.identity import ChannelKind, ChannelSpec, GuestIdentity
from connector.limits import GuestLimits
from connector.upstream import BrokerPool, BrokerURL, UpstreamSettings
from tests.brokers.common import free_port
from tests.support.connector import Qemu

pytestmark = pytest.mark.broker

TIMEOUT = 30.0
NAME = "broker.test"


@pytest.fixture
def served(
    tmp_path: Path, artemis: Any
) -> Iterator[tuple[Qemu, Channel, asyncio.AbstractEventLoop]]:
    """One unix channel to ``amqp://broker.test:PORT``, served in this process."""
    qemu = Qemu("unix", tmp_path, "multi-homed")
    loop = asyncio.new_event_loop()
    url = BrokerURL.parse(f"amqp://{NAME}:{artemis.port}")
    pool = BrokerPool(UpstreamSettings(urls=(url,), user=artemis.user, password=artemis.password))
    spec = ChannelSpec(ChannelKind.UNIX, qemu.path, GuestIdentity("multi-homed"))
    channel = Channel(spec, loop=loop, brokers=lambda: pool, limits=GuestLimits())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    loop.call_soon_threadsafe(channel.start)
    try:
        yield qemu, channel, loop
    finally:
        asyncio.run_coroutine_threadsafe(_close(channel), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
        qemu.hang_up()


async def _close(channel: Channel) -> None:
    channel.close("test over")
    await asyncio.wait_for(channel.idle.wait(), TIMEOUT)


def _resolving(monkeypatch: pytest.MonkeyPatch, addresses: list[tuple[int, Any]]) -> list[str]:
    """Make the broker's name resolve to ``addresses`` ((family, socket address), in
    order); returns the list of names resolved, which fills as the connector asks."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host != NAME:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", a) for family, a in addresses]

    monkeypatch.setattr(upstream_module.socket, "getaddrinfo", resolve)
    return asked


def _works(qemu: Qemu, channel: Channel, queue: str) -> None:
    with GuestClient(qemu.fd(), container_id="multi-homed-app", timeout=TIMEOUT) as guest:
        assert guest.send(queue, ["reached"])[0].state == "accepted"
        assert [m.body for m in guest.receive(queue, 1)] == ["reached"]
    assert channel.last_error is None


def test_each_address_of_the_brokers_name_is_tried_in_turn(
    served: tuple[Qemu, Channel, Any], artemis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu, channel, _ = served
    asked = _resolving(
        monkeypatch,
        [
            (socket.AF_INET, ("127.0.0.1", free_port())),  # refused once connecting
            # Refused once connecting, or at once on a host without IPv6.
            (socket.AF_INET6, ("::1", free_port(), 0, 0)),
            (socket.AF_INET, (artemis.host, artemis.port)),
        ],
    )
    _works(qemu, channel, "multi.homed")
    assert asked == [NAME]


def test_an_address_that_never_answers_is_left_for_the_next(
    served: tuple[Qemu, Channel, Any], artemis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A listener whose accept queue is full drops every SYN: a connect to it neither
    # succeeds nor fails, like a filtered port. It must cost ADDRESS_TIMEOUT_S, not the
    # whole connect timeout, which would refuse the guest.
    with socket.socket() as silent, socket.socket() as queued:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        queued.connect(silent.getsockname())  # fills the queue
        _resolving(
            monkeypatch,
            [
                (socket.AF_INET, silent.getsockname()),
                (socket.AF_INET, (artemis.host, artemis.port)),
            ],
        )
        _works(qemu=served[0], channel=served[1], queue="multi.homed.silent")


def test_a_name_slow_to_resolve_holds_no_other_guest(
    served: tuple[Qemu, Channel, asyncio.AbstractEventLoop],
    artemis: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resolver that does not answer holds the guest whose broker it names, not the loop.
    getaddrinfo ran on the loop, so one hung lookup stalled every guest of the daemon; a
    guest whose broker is an address is now served meanwhile, and the held one goes on
    once the name resolves."""
    qemu, channel, loop = served
    asked, release = threading.Event(), threading.Event()
    real = socket.getaddrinfo

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host == NAME:
            asked.set()
            release.wait(TIMEOUT)
            host = artemis.host
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(upstream_module.socket, "getaddrinfo", resolve)
    other = Qemu("unix", tmp_path, "by-address")
    url = BrokerURL.parse(f"amqp://{artemis.host}:{artemis.port}")
    pool = BrokerPool(UpstreamSettings(urls=(url,), user=artemis.user, password=artemis.password))
    spec = ChannelSpec(ChannelKind.UNIX, other.path, GuestIdentity("by-address"))
    second = Channel(spec, loop=loop, brokers=lambda: pool, limits=GuestLimits())
    loop.call_soon_threadsafe(second.start)
    with concurrent.futures.ThreadPoolExecutor(1) as pool_of_one:
        held = pool_of_one.submit(_works, qemu, channel, "slow.name")
        try:
            assert asked.wait(TIMEOUT), "the held guest's broker name was never looked up"
            # Well inside the hang: served only if the loop is not the one waiting.
            with GuestClient(other.fd(), container_id="by-address", timeout=5) as guest:
                assert guest.send("by.address", ["meanwhile"])[0].state == "accepted"
            assert not held.done()  # still waiting for its name
        finally:
            release.set()
        held.result(TIMEOUT)  # and it goes on once the name resolves
    asyncio.run_coroutine_threadsafe(_close(second), loop).result(TIMEOUT)
    other.hang_up()
