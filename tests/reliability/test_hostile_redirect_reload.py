"""A hostile review of following ``amqp:connection:redirect`` and of SIGHUP applying
``[broker]``: each test showed a bug found (strict xfail until it was fixed), or pins an
answer the review doubted.

Most run a ``Channel`` in this process on its own loop, with brokers scripted on loopback
sockets (the routing core's ``Engine`` as a server), so that the test decides when the
broker answers, and when a reload comes, to the step; one runs the real daemon between a
real Artemis connection router and the suite's Artemis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cproton_ffi import ffi, lib
from proton import Data, symbol

from connector import config
from connector.broker_reload import CurrentBrokers
from connector.channel import Channel
from connector.identity import ChannelKind, ChannelSpec, GuestIdentity
from connector.limits import GuestLimits
from connector.redirect import ESTABLISHMENT_FAILED, REDIRECT
from connector.routing.engine import IO_CHUNK, Engine, read_condition, set_condition
from tests.brokers import Artemis
from tests.brokers.artemis import RedirectingArtemis
from tests.reliability.amqp import CLOSE, frame, performative
from tests.support.connector import Connector, Qemu
from tests.support.reload import daemon_reading

TIMEOUT = 10.0
# How long a guest may wait for an answer that is due at once: far below the connector's
# CONNECT_TIMEOUT_S (10 s), whose expiry would answer it too, as a failure.
PROMPT = 3.0


# -- in-process: a channel, its guest, and scripted brokers on one loop ------------------------


def _put_map(data_ptr: Any, value: dict[str, Any]) -> None:
    data = Data(data_ptr)
    data.clear()
    data.put_object({symbol(k): v for k, v in value.items()})


class Peer:
    """One end of an AMQP connection over a socket, driven on the test's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, engine: Engine):
        self.loop = loop
        self.sock = sock
        self.engine = engine
        sock.setblocking(False)

    @property
    def state(self) -> int:
        return lib.pn_connection_state(self.engine.connection)

    async def flush(self) -> None:
        while out := self.engine.peek_output():
            data = bytes(out)
            await self.loop.sock_sendall(self.sock, data)
            self.engine.pop_output(len(data))

    async def until(
        self, done: Callable[[], Any], on_event: Callable[[int], None] | None = None
    ) -> None:
        """Read and answer until ``done()``; ``on_event`` sees each event's type first."""
        while True:
            collector = self.engine.collector
            while (ev := lib.pn_collector_peek(collector)) != ffi.NULL:
                if on_event is not None:
                    on_event(lib.pn_event_type(ev))
                lib.pn_collector_pop(collector)
            await self.flush()
            if done():
                return
            data = await self.loop.sock_recv(self.sock, IO_CHUNK)
            if not data:
                raise AssertionError("the other end hung up")
            self.engine.push(data)

    def told(self) -> tuple[str, str] | None:
        """The condition of the close the other end sent."""
        return read_condition(lib.pn_connection_remote_condition(self.engine.connection))


def _broker_engine() -> Engine:
    engine = Engine(server=True)
    engine.configure_sasl("ANONYMOUS")
    return engine


def _open_then(peer: Peer, redirect: dict[str, Any] | None) -> Callable[[int], None]:
    """Answer the connector's open as Artemis does when it will not serve it: an open with
    ``connection-establishment-failed``, then (with ``redirect``) a redirect's close."""

    def on_event(kind: int) -> None:
        if kind != lib.PN_CONNECTION_REMOTE_OPEN:
            return
        conn = peer.engine.connection
        _put_map(lib.pn_connection_properties(conn), {ESTABLISHMENT_FAILED: True})
        lib.pn_connection_open(conn)
        if redirect is not None:
            cond = lib.pn_connection_condition(conn)
            set_condition(cond, REDIRECT, "go elsewhere")
            _put_map(lib.pn_condition_info(cond), redirect)
            lib.pn_connection_close(conn)

    return on_event


def _listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def _port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def _broker(toml: str) -> Any:
    return config.build(tomllib.loads(toml)).upstream


class Rig:
    """A unix-listen channel served on ``loop`` from ``brokers``, and a guest on it whose
    open is written on the first ``flush``."""

    def __init__(
        self, tmp_path: Path, loop: asyncio.AbstractEventLoop, brokers: CurrentBrokers
    ) -> None:
        self.loop = loop
        spec = ChannelSpec(ChannelKind.UNIX_LISTEN, str(tmp_path / "port"), GuestIdentity("vm"))
        self.channel = Channel(spec, loop=loop, brokers=brokers, limits=GuestLimits())
        self.channel.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(spec.path)
        engine = Engine(server=False)
        lib.pn_connection_set_container(engine.connection, b"hostile-review")
        lib.pn_connection_open(engine.connection)
        self.guest = Peer(loop, sock, engine)

    def run(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self.channel.close("test over")
        self.run(self.channel.idle.wait())
        self.guest.sock.close()
        self.guest.engine.free()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


async def _first_accept(*listeners: socket.socket) -> socket.socket:
    """The listener that a connection arrives on first."""
    loop = asyncio.get_running_loop()
    waits = {asyncio.ensure_future(loop.sock_accept(s)): s for s in listeners}
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()
    first = done.pop()
    first.result()[0].close()
    return waits[first]


def test_a_redirect_that_comes_after_a_reload_is_still_followed_to_its_target(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """A reload between the connect to the redirecting broker and its redirect must not
    send the connector back to the failover list while it says it follows the redirect."""
    redirector, target = _listener(), _listener()
    text = f"[broker]\nurls = ['amqp://127.0.0.1:{_port(redirector)}']\n"
    brokers = CurrentBrokers(_broker(text))
    rig = Rig(tmp_path, loop, brokers)

    async def scenario() -> socket.socket:
        await rig.guest.flush()
        sock, _ = await loop.sock_accept(redirector)
        # The operator's reload (say, a longer idle timeout) while that connect is open.
        change = brokers.prepare(_broker(text + "idle_timeout_s = 30\n"))
        assert change is not None
        brokers.apply(change)
        broker = Peer(loop, sock, _broker_engine())
        info = {"network-host": "127.0.0.1", "port": _port(target)}
        await broker.until(lambda: broker.state & lib.PN_LOCAL_CLOSED, _open_then(broker, info))
        return await _first_accept(redirector, target)

    try:
        assert rig.run(scenario()) is target
    finally:
        rig.close()
        redirector.close()
        target.close()


def test_an_open_that_announces_a_close_which_never_comes_is_named_as_such(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker whose open says it will not serve the connection, and whose close never
    follows, did answer: the guest is told that, not 'no answer'."""
    monkeypatch.setattr("connector.channel.CONNECT_TIMEOUT_S", 0.5)
    refuser = _listener()
    brokers = CurrentBrokers(_broker(f"[broker]\nurls = ['amqp://127.0.0.1:{_port(refuser)}']\n"))
    rig = Rig(tmp_path, loop, brokers)

    async def scenario() -> tuple[str, str] | None:
        await rig.guest.flush()
        sock, _ = await loop.sock_accept(refuser)
        broker = Peer(loop, sock, _broker_engine())
        await broker.until(lambda: broker.state & lib.PN_LOCAL_ACTIVE, _open_then(broker, None))
        await rig.guest.until(lambda: rig.guest.state & lib.PN_REMOTE_CLOSED)
        return rig.guest.told()

    try:
        name, description = rig.run(scenario())
        assert name == "amqp:connection:forced"
        assert "no answer" not in description, description
        assert "establishment-failed" in description, description
    finally:
        rig.close()
        refuser.close()


def test_a_guest_that_closes_while_a_redirect_is_followed_is_answered_at_once(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """A guest closing before its open is answered (here while a redirect's target is
    being connected) gets its close answered at once, not at the connect timeout. (Kept
    from the review: its first form closed a proton guest, which holds its close back.)"""
    redirector, target = _listener(), _listener()
    brokers = CurrentBrokers(
        _broker(f"[broker]\nurls = ['amqp://127.0.0.1:{_port(redirector)}']\n")
    )
    rig = Rig(tmp_path, loop, brokers)

    async def scenario() -> None:
        await rig.guest.flush()
        sock, _ = await loop.sock_accept(redirector)
        broker = Peer(loop, sock, _broker_engine())
        info = {"network-host": "127.0.0.1", "port": _port(target)}
        await broker.until(lambda: broker.state & lib.PN_LOCAL_CLOSED, _open_then(broker, info))
        silent, _ = await loop.sock_accept(target)  # the target takes its time to answer
        try:
            # The guest gives up, as a client that is not proton's may (proton's own hold
            # their close until they are answered).
            rig.guest.sock.send(frame(performative(CLOSE)))
            await asyncio.wait_for(
                rig.guest.until(lambda: rig.guest.state & lib.PN_REMOTE_CLOSED), PROMPT
            )
        finally:
            silent.close()

    try:
        rig.run(scenario())
    finally:
        rig.close()
        redirector.close()
        target.close()


# -- SIGHUP: what a failed reload logs ---------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["amqp://user:s3cret-pw@broker:99999", "amqq://user:s3cret-pw@broker", "amqp://u:s3cret-pw@"],
)
def test_a_reload_that_fails_on_a_broker_url_never_logs_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, url: str
) -> None:
    """A typo in a URL that carries credentials must not write the password to the journal."""
    channel = f"[[channel]]\nkind = 'unix-listen'\npath = '{tmp_path / 'vm'}'\n"
    files = {"text": "[broker]\nurls = ['amqp://broker']\n" + channel}
    daemon = daemon_reading(monkeypatch, files)
    files["text"] = f"[broker]\nurls = ['{url}']\n" + channel
    with caplog.at_level(logging.INFO, logger="connector"):
        daemon.reload()
    failed = [r.getMessage() for r in caplog.records if "reload failed" in r.getMessage()]
    assert failed, caplog.text  # the reload did fail, and said so
    assert "broker.urls" in failed[0]
    assert "s3cret-pw" not in caplog.text


# -- the real daemon between a real Artemis connection router and the suite's Artemis ----------


def _pump(fd: int, engine: Engine, done: Callable[[], Any], timeout: float) -> None:
    """Move bytes between ``engine`` and ``fd`` until ``done()``; AssertionError at the
    deadline."""
    deadline = time.monotonic() + timeout
    while not done():
        while out := engine.peek_output():
            engine.pop_output(os.write(fd, out))
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no answer in {timeout}s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, IO_CHUNK)
            if not data:
                raise AssertionError("the connector hung up")
            engine.push(data)
        while lib.pn_collector_peek(engine.collector) != ffi.NULL:
            lib.pn_collector_pop(engine.collector)


def _sender(session: Any, name: str, address: str) -> Any:
    link = lib.pn_sender(session, name.encode())
    lib.pn_terminus_set_address(lib.pn_link_target(link), address.encode())
    lib.pn_link_open(link)
    return link


@pytest.mark.broker
def test_a_link_detached_before_the_broker_open_gets_its_detach_across_a_redirect(
    redirecting: RedirectingArtemis, artemis: Artemis, tmp_path: Path
) -> None:
    """A link the guest attaches and detaches before the broker's open (a client giving up
    on a slow attach) gets its attach and detach answered, across a followed redirect."""
    qemu = Qemu("unix", tmp_path, "hasty")
    daemon = Connector(tmp_path, artemis, [qemu], broker_urls=redirecting.redirect_url).start()
    guest = Engine(server=False)
    try:
        fd = qemu.fd()
        conn = guest.connection
        lib.pn_connection_set_container(conn, b"hasty")
        lib.pn_connection_open(conn)
        session = lib.pn_session(conn)
        lib.pn_session_open(session)
        kept = _sender(session, "kept", "hostile.redirect.kept")
        given_up = _sender(session, "given-up", "hostile.redirect.given-up")
        lib.pn_link_close(given_up)  # open, begin, both attaches and the detach: one write
        _pump(fd, guest, lambda: lib.pn_link_state(kept) & lib.PN_REMOTE_ACTIVE, TIMEOUT)
        assert "followed" in daemon.channel("hasty")["last_error"]  # it went by the redirect
        _pump(fd, guest, lambda: lib.pn_link_state(given_up) & lib.PN_REMOTE_CLOSED, PROMPT)
    finally:
        assert daemon.stop() == 0
        guest.free()
        qemu.hang_up()
