"""A hostile review of four changes to the core: output produced inside ``Router.process``,
links the guest ends before their session is begun, broker names resolved off the loop,
and a redirect's failure charged to the URL that redirected. Each test shows a bug found
(strict xfail until it is fixed).
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cproton_ffi import ffi, lib
from proton import Endpoint

import connector.upstream as upstream_module
from connector.broker_reload import CurrentBrokers
from connector.resolver import Resolver
from tests.reliability.amqp import AMQP_HEADER, EMPTY_FRAME, open_frame
from tests.reliability.test_hostile_redirect_reload import (
    PROMPT,
    TIMEOUT,
    Rig,
    _broker,
    _listener,
    _port,
)
from tests.support.routing import Harness, attach


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# -- links ended before their session is begun ------------------------------------------------


def _upstream_links(h: Harness) -> list[tuple[str, int]]:
    """(name, state) of every link proton holds on the router's upstream connection."""
    found, link = [], lib.pn_link_head(h.router.upstream.connection, 0)
    while link != ffi.NULL:
        found.append((ffi.string(lib.pn_link_name(link)).decode(), lib.pn_link_state(link)))
        link = lib.pn_link_next(link, 0)
    return found


@pytest.mark.parametrize("end", ["close", "detach"])
def test_a_link_retried_under_its_name_before_the_broker_opens_is_answered(end: str) -> None:
    """A client whose attach the slow broker has not answered gives up on the link and
    attaches again under the same name (a retry): once the broker opens, the retry is
    answered like any attach."""
    h = Harness(broker_answers_open=False)
    _, ssn = h.guest_session()  # its begin waits for the broker's open
    first = attach(ssn, "retry", "q")
    h.pump()
    getattr(first, end)()
    h.pump()
    retry = attach(ssn, "retry", "q")
    h.pump()
    h.broker.connection.open()
    h.pump()
    # The broker answered the one attach it got (the retry's); the router's upstream
    # engine matched that answer by name to the first link's twin, which is dead.
    assert retry.state & Endpoint.REMOTE_ACTIVE, _upstream_links(h)


# -- broker names resolved off the loop --------------------------------------------------------

NAME = "slow-name.test"


class _Lookups:
    """getaddrinfo for NAME, scripted: each lookup waits until the test lets it answer
    (with 127.0.0.1:``port``); other names resolve as usual."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, port: int) -> None:
        self.asked: list[threading.Event] = [threading.Event() for _ in range(4)]
        self.answer: list[threading.Event] = [threading.Event() for _ in range(4)]
        self.count = 0
        real = socket.getaddrinfo

        def resolve(host: str, port_: int, *args: Any, **kwargs: Any) -> list[Any]:
            if host != NAME:
                return real(host, port_, *args, **kwargs)
            n = self.count
            self.count += 1
            self.asked[n].set()
            self.answer[n].wait(TIMEOUT)
            return [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))
            ]

        monkeypatch.setattr(upstream_module.socket, "getaddrinfo", resolve)

    def release(self) -> None:
        for event in self.answer:
            event.set()


def test_a_lookup_answering_as_the_guest_restarts_opens_one_upstream(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest's client restarts (a new protocol header in its stream) just as the
    broker's name lookup for its old connection answers. The new connection gets its own
    lookup and one upstream connection, not two."""
    listener = _listener()
    lookups = _Lookups(monkeypatch, _port(listener))
    brokers = CurrentBrokers(_broker(f"[broker]\nurls = ['amqp://{NAME}:{_port(listener)}']\n"))
    rig = Rig(tmp_path, loop, brokers)
    restart = AMQP_HEADER + open_frame("restarted")

    async def scenario() -> bool:
        await rig.guest.flush()  # header and open: the first lookup starts
        await asyncio.to_thread(lookups.asked[0].wait, TIMEOUT)
        first_lookup = Resolver.for_loop(loop)._inflight[(NAME, _port(listener))]
        first_task = rig.channel._resolving
        assert first_task is not None
        # The restarted client's bytes land in the loop turns between the lookup's answer
        # and the old connection's task resuming (what a busy loop makes likely).
        first_lookup.add_done_callback(lambda _: rig.guest.sock.send(restart))
        # Once the old task is over, any byte from the guest pumps the new connection.
        first_task.add_done_callback(lambda _: rig.guest.sock.send(EMPTY_FRAME))
        lookups.answer[0].set()
        await asyncio.to_thread(lookups.asked[1].wait, TIMEOUT)  # the new connection's
        await asyncio.wait({first_task})
        lookups.answer[1].set()
        first, _ = await loop.sock_accept(listener)
        first.close()
        # Both connects (if two) start in the loop turn the lookup answers in, and a
        # loopback connect is queued at once: a second one is waiting by now.
        return bool(select.select([listener], [], [], 0)[0])

    try:
        assert not rig.run(scenario()), "two upstream connections for one guest connection"
    finally:
        lookups.release()
        rig.close()
        listener.close()


def test_a_broker_name_that_cannot_be_looked_up_fails_the_guest_at_once(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """A broker name that is no name at all (here with an empty label; a redirect's
    network-host that the broker chose passes redirect.py's checks as well) cannot be looked
    up: the guest is told so at once, as for a name that does not resolve."""
    brokers = CurrentBrokers(_broker("[broker]\nurls = ['amqp://broker..example:5672']\n"))
    rig = Rig(tmp_path, loop, brokers)

    async def scenario() -> tuple[str, str] | None:
        await rig.guest.flush()
        await asyncio.wait_for(
            rig.guest.until(lambda: rig.guest.state & lib.PN_REMOTE_CLOSED), PROMPT
        )
        return rig.guest.told()

    try:
        told = rig.run(scenario())
        assert told is not None and "broker..example" in told[1], told
    finally:
        rig.close()


def test_the_status_names_the_broker_whose_name_is_being_looked_up(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = _listener()
    lookups = _Lookups(monkeypatch, _port(listener))
    url = f"amqp://{NAME}:{_port(listener)}"
    rig = Rig(tmp_path, loop, CurrentBrokers(_broker(f"[broker]\nurls = ['{url}']\n")))

    async def scenario() -> str | None:
        await rig.guest.flush()
        await asyncio.to_thread(lookups.asked[0].wait, TIMEOUT)
        return rig.channel.upstream_url

    try:
        assert rig.run(scenario()) == url
    finally:
        lookups.release()
        rig.close()
        listener.close()
