"""connector.guest.driver: standard MessagingHandlers over a file descriptor, no reactor.

The handlers below are written as for ``Container``: they only touch ``event.container``,
so these tests show that a guest application changes one line to run over a port.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from proton import Message
from proton.handlers import MessagingHandler

from connector.guest import port as guest_port
from connector.guest.driver import Driver
from connector.guest.peer import MemoryBroker, PeerThread


class Send(MessagingHandler):
    """proton's simple_send example, unchanged but for how it is run."""

    def __init__(self, url: str, count: int) -> None:
        super().__init__()
        self.url, self.total, self.sent, self.confirmed = url, count, 0, 0

    def on_start(self, event: Any) -> None:
        event.container.create_sender(self.url)

    def on_sendable(self, event: Any) -> None:
        while event.sender.credit and self.sent < self.total:
            event.sender.send(Message(id=self.sent + 1, body={"sequence": self.sent + 1}))
            self.sent += 1

    def on_accepted(self, event: Any) -> None:
        self.confirmed += 1
        if self.confirmed == self.total:
            event.connection.close()


class Recv(MessagingHandler):
    """proton's simple_recv example, plus a timer that gives up if nothing comes."""

    def __init__(self, url: str, count: int) -> None:
        super().__init__()
        self.url, self.expected, self.received = url, count, []
        self.timed_out = False

    def on_start(self, event: Any) -> None:
        event.container.create_receiver(self.url)
        self.timer = event.container.schedule(10, self)

    def on_message(self, event: Any) -> None:
        self.received.append(event.message.body["sequence"])
        if len(self.received) == self.expected:
            self.timer.cancel()
            event.connection.close()

    def on_timer_task(self, event: Any) -> None:
        self.timed_out = True
        event.container.stop()


@pytest.fixture
def channel() -> Iterator[socket.socket]:
    a, b = socket.socketpair()
    peer = PeerThread(b.fileno(), MemoryBroker())
    yield a
    peer.close()
    a.close()
    b.close()


def test_unchanged_send_and_receive_examples(channel: socket.socket) -> None:
    sock = channel
    sender = Send("amqp://ignored/examples", 50)
    Driver(sender, sock.fileno()).run()
    assert sender.confirmed == 50
    receiver = Recv("amqp://ignored/examples", 50)
    Driver(receiver, sock.fileno()).run()
    assert receiver.received == list(range(1, 51))
    assert not receiver.timed_out


def test_timer_fires_and_stop_ends_run(channel: socket.socket) -> None:
    class Tick(MessagingHandler):
        fired = 0

        def on_start(self, event: Any) -> None:
            event.container.schedule(0.05, self)

        def on_timer_task(self, event: Any) -> None:
            self.fired += 1
            if self.fired < 3:
                event.container.schedule(0.05, self)
            else:
                event.container.stop()

    tick = Tick()
    Driver(tick, channel.fileno()).run()
    assert tick.fired == 3


def test_reconnects_and_reopens_links_after_hangup() -> None:
    """The first channel is cut under an open link; the driver opens a new one and proton
    re-sends the connection's open and the link's attach on it."""
    broker = MemoryBroker()
    peers: list[tuple[socket.socket, socket.socket, PeerThread]] = []

    def opener() -> int:
        a, b = socket.socketpair()
        peers.append((a, b, PeerThread(b.fileno(), broker)))
        return a.detach()

    class Handler(MessagingHandler):
        opened = 0

        def on_start(self, event: Any) -> None:
            event.container.create_sender("q")
            self.timer = event.container.schedule(20, self)  # a bound, should the test fail

        def on_link_opened(self, event: Any) -> None:
            self.opened += 1
            if self.opened == 1:
                _, b, peer = peers[0]
                peer.close()
                b.close()  # the host side goes away
            else:
                event.sender.send(Message(body="after reconnect"))

        def on_accepted(self, event: Any) -> None:
            self.timer.cancel()
            event.connection.close()

        def on_timer_task(self, event: Any) -> None:
            event.container.stop()

    handler = Handler()
    Driver(handler, opener).run()
    assert handler.opened == 2
    assert [m.body for m in broker.queues["q"]] == ["after reconnect"]
    for _, b, peer in peers:
        peer.close()
        b.close()


def test_hang_up_with_writes_blocked_ends_the_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A virtio port whose host side left shows POLLHUP, which poll reports whether asked
    or not, while writes block until a new host side comes: with nothing left to read,
    the driver ends the channel instead of waking up at once for ever."""
    a, b = socket.socketpair()  # b never reads: our header stays pending
    waits: list[int] = []

    def hung_up(_fd: int | None, events: int, _timeout: float | None) -> int:
        waits.append(events)
        return select.POLLHUP

    class Lost(MessagingHandler):
        disconnected = False

        def on_disconnected(self, event: Any) -> None:
            self.disconnected = True

    handler = Lost()
    driver = Driver(handler, a.fileno(), idle_timeout=None)
    driver.connect()
    driver.eof = True  # the end of stream was read: only the write is waited for
    monkeypatch.setattr(guest_port, "wait_fd", hung_up)
    for _ in range(5):
        if not driver.process(1.0):
            break
    assert handler.disconnected
    assert waits == [select.POLLOUT]  # one wake-up, not a spin
    a.close()
    b.close()
