"""connector.guest.bridge: unmodified TCP clients relayed to ports, one per port at a time.

Each "port" is a socketpair whose far end runs the in-memory AMQP peer, standing in for the
connector on the host; the TCP client is proton's own BlockingConnection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from proton import Message
from proton.utils import BlockingConnection

from connector.guest.__main__ import main
from connector.guest.bridge import CLOSE_FRAME, Bridge, parse_listen
from connector.guest.peer import MemoryBroker, PeerThread


class Ports:
    """Port name -> a fresh socketpair per open, with a peer on the far end."""

    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.opened: list[str] = []
        self.far: list[tuple[socket.socket, PeerThread]] = []

    def open(self, name: str) -> int:
        a, b = socket.socketpair()
        self.opened.append(name)
        self.far.append((b, PeerThread(b.fileno(), self.broker)))
        a.setblocking(False)
        return a.detach()

    def close(self) -> None:
        for b, peer in self.far:
            peer.close()
            b.close()


@pytest.fixture
def bridge() -> Iterator[tuple[Bridge, Ports]]:
    ports = Ports()
    b = Bridge(("127.0.0.1", 0), ["org.qpid.amqp.0", "org.qpid.amqp.1"], ports.open)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            b.poll(0.05)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield b, ports
    stop.set()
    t.join()
    b.close()
    ports.close()


def url(b: Bridge) -> str:
    return f"amqp://127.0.0.1:{b.address[1]}"


def test_clients_in_turn_each_get_a_clean_connection(bridge: tuple[Bridge, Ports]) -> None:
    b, ports = bridge
    for round_ in range(3):
        conn = BlockingConnection(url(b), timeout=10)
        conn.create_sender("q").send(Message(body=round_))
        rcv = conn.create_receiver("q")
        assert rcv.receive(timeout=10).body == round_
        rcv.accept()
        conn.close()
    assert ports.opened == ["org.qpid.amqp.0"] * 3  # one port, reopened for each client


def test_two_clients_at_once_take_two_ports(bridge: tuple[Bridge, Ports]) -> None:
    b, ports = bridge
    first = BlockingConnection(url(b), timeout=10)
    second = BlockingConnection(url(b), timeout=10)
    first.create_sender("q").send(Message(body="from first"))
    rcv = second.create_receiver("q")
    assert rcv.receive(timeout=10).body == "from first"
    rcv.accept()
    assert sorted(ports.opened) == ["org.qpid.amqp.0", "org.qpid.amqp.1"]
    first.close()
    second.close()


def test_vanished_client_is_closed_on_the_port() -> None:
    """A client that dies without an AMQP close must not leave the host's connection open:
    the bridge ends it with a close frame."""
    near, far = socket.socketpair()
    b = Bridge(("127.0.0.1", 0), ["p"], lambda _name: near.detach())
    client = socket.create_connection(b.address)
    b.poll(1)  # accept
    client.sendall(b"AMQP\x00\x01\x00\x00")
    b.poll(1)  # relay the header
    client.close()
    b.poll(1)  # see the client go, write the close frame
    far.settimeout(5)
    got = b""
    while not got.endswith(CLOSE_FRAME):
        got += far.recv(100)
    assert got == b"AMQP\x00\x01\x00\x00" + CLOSE_FRAME
    b.close()
    far.close()


def test_listen_address_parsing() -> None:
    assert parse_listen("127.0.0.1:5672") == ("127.0.0.1", 5672)
    assert parse_listen("[::1]:5673") == ("::1", 5673)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("5672")


def test_command_line_requires_a_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bridge", "--listen", "127.0.0.1:0"])
    assert "--port" in capsys.readouterr().err
