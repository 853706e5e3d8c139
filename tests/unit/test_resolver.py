"""Broker names resolved off the loop: one lookup per name in flight, errors passed on."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

import connector.resolver as resolver_module
from connector.resolver import Resolver
from connector.upstream import BrokerURL

TIMEOUT = 10.0


def test_an_address_needs_no_lookup() -> None:
    assert Resolver.is_address("127.0.0.1")
    assert Resolver.is_address("::1")
    assert not Resolver.is_address("localhost")
    assert not Resolver.is_address("broker.example")


def test_connects_waiting_for_one_name_share_its_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that hangs costs one thread per broker name, not one per guest; each
    connect gets a list of its own (a connect pops the addresses it tries)."""
    release = threading.Event()
    calls: list[str] = []
    answer = [(socket.AF_INET, socket.SOCK_STREAM, 6, ("127.0.0.1", 5672))]

    def lookup(url: BrokerURL) -> list[Any]:
        calls.append(url.host)
        release.wait(TIMEOUT)
        return list(answer)

    monkeypatch.setattr(resolver_module, "broker_addresses", lookup)
    url = BrokerURL.parse("amqp://broker.example")

    async def main() -> list[list[Any]]:
        resolver = Resolver.for_loop(asyncio.get_running_loop())
        waits = [asyncio.ensure_future(resolver.addresses(url)) for _ in range(3)]
        await asyncio.sleep(0)  # all three are waiting now
        release.set()
        return await asyncio.wait_for(asyncio.gather(*waits), TIMEOUT)

    got = asyncio.run(main())
    assert calls == ["broker.example"]
    assert got == [answer] * 3
    got[0].pop()
    assert got[1] == answer


def test_a_name_that_does_not_resolve_raises_for_the_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def lookup(url: BrokerURL) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(resolver_module, "broker_addresses", lookup)

    async def main() -> None:
        resolver = Resolver.for_loop(asyncio.get_running_loop())
        await asyncio.wait_for(resolver.addresses(BrokerURL.parse("amqp://nowhere")), TIMEOUT)

    with pytest.raises(OSError, match="Name or service not known"):
        asyncio.run(main())


def test_a_loop_that_resolved_a_name_can_still_be_collected() -> None:
    """The per-loop resolver must not keep its loop alive (tests make many loops)."""
    import gc
    import weakref

    loop = asyncio.new_event_loop()
    Resolver.for_loop(loop)
    gone = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert gone() is None
