"""connector.guest.bridge: unmodified TCP clients relayed to ports, one per port at a time.

Each "port" is a socketpair whose far end runs the in-memory AMQP peer, standing in for the
connector on the host; the TCP client is proton's own BlockingConnection.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Iterator

import pytest
from proton import Message
from proton.utils import BlockingConnection

from connector.guest.__main__ import main
from connector.guest.bridge import CLOSE_FRAME, Bridge, _FrameEdge, parse_listen
from connector.guest.peer import MemoryBroker, PeerThread
from tests.support.guest import bridge_running, poll_until

HEADER = b"AMQP\x00\x01\x00\x00"


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
    with bridge_running(b):
        yield b, ports
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


def test_client_error_other_than_a_reset_ends_only_its_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receive error that is not a ConnectionError (ETIMEDOUT after keepalives failed)
    ends that client's session; the bridge goes on serving the other one."""
    ports = Ports()
    b = Bridge(("127.0.0.1", 0), ["p0", "p1"], ports.open)
    first = socket.create_connection(b.address)
    second = socket.create_connection(b.address)
    try:
        poll_until(b, lambda: len(b.sessions) == 2)
        victim = b.sessions["p0"].client
        real_recv = socket.socket.recv

        def recv(self: socket.socket, *args: int) -> bytes:
            if self is victim:
                raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
            return real_recv(self, *args)

        monkeypatch.setattr(socket.socket, "recv", recv)
        first.sendall(HEADER)
        poll_until(b, lambda: "p0" not in b.sessions)
        monkeypatch.undo()
        second.sendall(HEADER)
        second.settimeout(0.05)
        got = b""
        end = time.monotonic() + 5
        while len(got) < len(HEADER) and time.monotonic() < end:
            b.poll(0.05)
            with contextlib.suppress(TimeoutError):
                got += second.recv(8)
        assert got == HEADER  # the other client's session still relays
    finally:
        first.close()
        second.close()
        b.close()
        ports.close()


def test_port_stays_busy_until_an_ended_session_has_written_its_last_bytes() -> None:
    """A host that is slow to read keeps the port busy while the bridge writes the ended
    session's tail: the next client waits rather than getting an EBUSY port."""
    near, far = socket.socketpair()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    near.setblocking(False)
    opens = 0

    def opener(_name: str) -> int:
        nonlocal opens
        opens += 1
        return os.dup(near.fileno())

    b = Bridge(("127.0.0.1", 0), ["p"], opener)
    first = socket.create_connection(b.address)
    second = None
    try:
        poll_until(b, lambda: bool(b.sessions))
        first.sendall(HEADER + (400_008).to_bytes(4, "big") + b"\x02\x00\x00\x00" + bytes(400_000))
        first.close()
        poll_until(b, lambda: not b.sessions)  # ended, its tail still being written
        second = socket.create_connection(b.address)
        for _ in range(5):
            b.poll(0.05)
        assert opens == 1  # the second client is still in the backlog
        far.settimeout(5)
        got = b""
        while not got.endswith(CLOSE_FRAME):
            got += far.recv(65536)
        assert len(got) == 8 + 400_008 + len(CLOSE_FRAME)
        poll_until(b, lambda: bool(b.sessions))  # the port is free: the second client on it
        assert opens == 2
    finally:
        first.close()
        if second is not None:
            second.close()
        b.close()
        near.close()
        far.close()


def test_frame_edge_follows_headers_and_frame_sizes() -> None:
    """The client's stream is split into protocol headers and frames by size alone; what
    completes an unfinished unit is counted whatever byte the client stopped at."""
    sasl = b"AMQP\x03\x01\x00\x00"
    frame = (20).to_bytes(4, "big") + b"\x02\x01\x00\x00" + bytes(12)
    stream = sasl + frame + HEADER + frame
    edge = _FrameEdge()
    starts = [0, len(sasl), len(sasl) + 20, len(sasl) + 28]
    ends = [*starts[1:], len(stream)]
    for i, byte in enumerate(stream, start=1):  # the worst case: one byte at a time
        edge.feed(bytes([byte]))
        start, end = next((s, e) for s, e in zip(starts, ends, strict=True) if i <= e)
        if i - start >= 4:  # the unit's size is known once its first 4 bytes are
            assert edge.missing() == end - i, i
    edge.feed(b"AM")  # a client that died inside a header: the header's 8 bytes
    assert edge.missing() == 6
    edge = _FrameEdge()
    edge.feed(b"\x00\x00")  # inside a size: unsent size bytes count as the padding zeros
    assert edge.missing() == 6


def test_listen_address_parsing() -> None:
    assert parse_listen("127.0.0.1:5672") == ("127.0.0.1", 5672)
    assert parse_listen("[::1]:5673") == ("::1", 5673)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("5672")


def test_command_line_requires_a_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bridge", "--listen", "127.0.0.1:0"])
    assert "--port" in capsys.readouterr().err


def test_command_line_refuses_a_port_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/guest.md: each --port must exist; a typo fails at start, not at the first client."""
    monkeypatch.setattr(logging, "basicConfig", lambda **_kw: None)  # leave pytest's alone
    with pytest.raises(SystemExit) as done:
        main(["bridge", "--listen", "127.0.0.1:0", "--port", "/dev/null", "--port", "no.such"])
    assert done.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert err.startswith("python3 -m connector.guest: --port no.such: no virtio-serial port")
