"""connector.guest under hostile conditions: dead ports, slow ports, clients that vanish.

The guest's virtio port is emulated as in the other guest tests: a socketpair (whose host end
outlives the guest's opens where that matters) or a raw pty. Bridge tests drive
``Bridge.poll`` by hand where the order of events matters, so each step is deterministic.
Tests marked ``xfail(strict=True)`` show a bug in connector/guest; the reason names it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import pty
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proton import Message
from proton.handlers import MessagingHandler
from proton.utils import BlockingConnection

from connector.guest import Disconnected, GuestClient, GuestTimeout
from connector.guest import driver as guest_driver
from connector.guest.bridge import CLOSE_FRAME, Bridge
from connector.guest.driver import Driver
from connector.guest.peer import MemoryBroker, PeerThread
from tests.support.guest import OpensOnce, bridge_running, poll_until

HEADER = b"AMQP\x00\x01\x00\x00"
REPO = Path(__file__).resolve().parents[2]


# ---- helpers -----------------------------------------------------------------------------


def read_to_eof(sock: socket.socket, limit: float = 5.0) -> bytes:
    """Everything ``sock`` receives until its peer closes."""
    sock.settimeout(limit)
    got = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return bytes(got)
        got += data


def frame(size: int, body: bytes = b"") -> bytes:
    """An AMQP frame header (doff 2, type 0, channel 0) claiming ``size`` bytes in all."""
    return size.to_bytes(4, "big") + b"\x02\x00\x00\x00" + body


def walk_frames(stream: bytes) -> tuple[list[bytes], int]:
    """Split what follows a protocol header into frames; also return the bytes left over
    (a frame whose declared size runs past the end of the stream)."""
    frames, pos = [], 0
    while pos + 4 <= len(stream):
        size = int.from_bytes(stream[pos : pos + 4], "big")
        if size < 8 or pos + size > len(stream):
            break
        frames.append(stream[pos : pos + size])
        pos += size
    return frames, len(stream) - pos


class HostEnd:
    """One host end of a port that outlives the guest's opens, like a virtio-serial port:
    each open hands the bridge a new fd on the same stream; a peer serves it."""

    def __init__(self) -> None:
        self.near, self.far = socket.socketpair()
        self.near.setblocking(False)
        self.broker = MemoryBroker()
        self.peer = PeerThread(self.far.fileno(), self.broker)
        self.opens = 0

    def open(self, _name: str) -> int:
        self.opens += 1
        return os.dup(self.near.fileno())

    def close(self) -> None:
        self.peer.close()
        self.near.close()
        self.far.close()


@pytest.fixture
def host() -> Iterator[HostEnd]:
    h = HostEnd()
    yield h
    h.close()


@pytest.fixture
def raw_pty() -> Iterator[tuple[int, int, str]]:
    """A raw pty: (master, slave, slave path). The slave fd is held so the master never
    reads EIO between the guest's opens."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    yield master, slave, os.ttyname(slave)
    for fd in (slave, master):
        with contextlib.suppress(OSError):
            os.close(fd)


# ---- bridge: sharing and failing ports ---------------------------------------------------


def test_second_client_waits_for_the_one_port_then_gets_a_clean_connection(
    host: HostEnd,
) -> None:
    with bridge_running(Bridge(("127.0.0.1", 0), ["p"], host.open)) as b:
        first = BlockingConnection(f"amqp://127.0.0.1:{b.address[1]}", timeout=5)
        snd = first.create_sender("q")
        snd.send(Message(body="one"))
        with socket.create_connection(b.address) as second:
            second.sendall(HEADER)
            snd.send(Message(body="two"))  # a round trip while the second client is queued
            assert host.opens == 1  # the second client is still in the backlog
            first.close()
            second.settimeout(5)
            assert second.recv(8) == HEADER  # served once the port is free, header answered
            assert host.opens == 2
            assert [m.body for m in host.broker.queues["q"]] == ["one", "two"]


def test_pool_serves_clients_on_a_working_port_when_one_is_unplugged(host: HostEnd) -> None:
    def opener(name: str) -> int:
        if name == "p0":
            raise FileNotFoundError(2, "no virtio-serial port named 'p0'")
        return host.open(name)

    b = Bridge(("127.0.0.1", 0), ["p0", "p1"], opener)
    client = socket.create_connection(b.address)
    try:
        b.poll(2)  # the accept
        assert list(b.sessions) == ["p1"]
    finally:
        client.close()
        b.close()


@contextlib.contextmanager
def _one_port_bridge(
    sndbuf: int | None = None,
) -> Iterator[tuple[Bridge, socket.socket, socket.socket]]:
    """A bridge with one port (a socketpair whose ``far`` end plays the host) and a client
    it has paired with that port; ``sndbuf`` makes the port's buffer small."""
    near, far = socket.socketpair()
    near.setblocking(False)
    if sndbuf is not None:
        near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    b = Bridge(("127.0.0.1", 0), ["p"], lambda _name: near.detach())
    client = socket.create_connection(b.address)
    try:
        poll_until(b, lambda: bool(b.sessions))
        yield b, client, far
    finally:
        client.close()
        far.close()
        b.close()


def test_port_write_error_ends_that_session_not_the_bridge() -> None:
    with _one_port_bridge() as (b, client, far):
        session = b.sessions["p"]
        client.sendall(HEADER)
        poll_until(b, lambda: session.client_sent)
        # Read from the client in this round, written to the port in a later one (the port
        # had no write interest when this round's events were collected).
        assert session.to_port == HEADER
        # The host end goes away with the client's header still to be written to it (and
        # a last frame of its own in flight), as when a port is unplugged under load.
        far.sendall(CLOSE_FRAME)
        far.close()
        poll_until(b, lambda: not b.sessions)
        assert read_to_eof(client) == b""  # the client was let go, the bridge still runs


def test_host_bytes_before_end_of_stream_reach_the_client() -> None:
    with _one_port_bridge() as (b, client, far):
        last = frame(100, b"\x00" * 92)  # e.g. the host's close with its error condition
        far.sendall(last)
        far.close()
        poll_until(b, lambda: not b.sessions)
        assert read_to_eof(client) == last


# ---- bridge: clients that vanish ---------------------------------------------------------


def test_slow_port_gets_all_client_bytes_and_the_close_frame() -> None:
    sent = HEADER + frame(600_000, b"\x00" * (600_000 - 8))  # complete frames only
    with _one_port_bridge(sndbuf=16384) as (b, client, far):  # a small port buffer

        def send_and_leave() -> None:
            client.sendall(sent)
            client.close()

        t = threading.Thread(target=send_and_leave, daemon=True)
        t.start()
        # The host reads nothing meanwhile (a busy host): the port's buffer fills up.
        poll_until(b, lambda: not b.sessions)
        t.join(5)
        got = read_to_eof(far)
        assert len(got) == len(sent) + len(CLOSE_FRAME)
        assert got == sent + CLOSE_FRAME


def test_client_dying_mid_frame_still_gets_its_connection_closed() -> None:
    with _one_port_bridge() as (b, client, far):
        client.sendall(HEADER + frame(64, b"\x00\x53\x10"))  # 11 of the frame's 64 bytes
        session = b.sessions["p"]
        poll_until(b, lambda: session.client_sent)
        client.close()
        poll_until(b, lambda: not b.sessions)
        got = read_to_eof(far)
        assert got.startswith(HEADER)
        frames, left_over = walk_frames(got[len(HEADER) :])
        assert left_over == 0, f"{left_over} bytes of an unfinished frame swallow the close"
        assert frames[-1] == CLOSE_FRAME


def test_client_dying_inside_a_transfer_frame_gets_no_padding() -> None:
    """Zeros completing a transfer frame could hand the host a message the client never
    finished, so the bridge sends nothing after it: the host ends that connection when the
    next client's header arrives after a pause, or at its idle timeout."""
    with _one_port_bridge() as (b, client, far):
        cut = HEADER + frame(64, b"\x00\x53\x14\xc0")  # 12 of a transfer frame's 64 bytes
        client.sendall(cut)
        session = b.sessions["p"]
        poll_until(b, lambda: session.client_sent)
        client.close()
        poll_until(b, lambda: not b.sessions)
        assert read_to_eof(far) == cut


# ---- the command line --------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    s = socket.create_server(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize(
    "args",
    [
        ["--log-level", "loud", "bridge", "--port", "p", "--listen", "127.0.0.1:0"],
        ["bridge", "--port", "p", "--listen", "127.0.0.1:99999"],
        ["bridge", "--port", "p", "--listen", "127.0.0.1:{busy}"],
    ],
    ids=["log-level", "port-range", "address-in-use"],
)
def test_command_line_errors_are_one_line(args: list[str], busy_port: int) -> None:
    argv = [a.format(busy=busy_port) for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "connector.guest", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("python3 -m connector.guest: ")


# ---- GuestClient and the driver ----------------------------------------------------------


@pytest.fixture
def client() -> Iterator[GuestClient]:
    a, b = socket.socketpair()
    peer = PeerThread(b.fileno(), MemoryBroker())
    c = GuestClient(a.fileno(), timeout=5)
    yield c
    c.close()
    peer.close()
    a.close()
    b.close()


def test_received_binary_body_outlives_its_message(client: GuestClient) -> None:
    first, second = b"A" * 4096, b"B" * 4096
    client.send("q", [first, second])
    body = client.receive("q", 1)[0].body  # the Message itself is dropped here
    gc.collect()
    client.receive("q", 1)  # a new message of the same size reuses the freed memory
    assert bytes(body) == first


def test_failed_open_closes_the_port_it_opened() -> None:
    a, b = socket.socketpair()  # nobody answers on b
    fd, inode = a.fileno(), os.fstat(a.fileno()).st_ino
    with pytest.raises(GuestTimeout):
        GuestClient(a.detach, timeout=0.3, idle_timeout=None)
    try:
        gc.collect()
        assert read_to_eof(b, limit=1.0).startswith(HEADER)  # our end was closed
    except TimeoutError:
        raise AssertionError("the port is still open after the failed GuestClient") from None
    finally:
        b.close()
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == inode:
                os.close(fd)  # the leaked descriptor, not one reused since


def test_channel_lost_during_handshake_is_disconnected() -> None:
    a, b = socket.socketpair()
    opener = OpensOnce(a.detach)

    def host_leaves() -> None:
        b.settimeout(5)
        b.recv(100)  # the guest's header
        b.close()  # ... and the host side goes away

    t = threading.Thread(target=host_leaves, daemon=True)
    t.start()
    try:
        with pytest.raises(Disconnected):
            GuestClient(opener, timeout=5)
    except ConnectionRefusedError as e:
        raise AssertionError(f"raw {e!r} from a client that must not reopen") from None
    finally:
        t.join(5)
        b.close()
    assert opener.opens == 1


def test_client_works_on_a_high_fd() -> None:
    a, b = socket.socketpair()
    peer = PeerThread(b.fileno(), MemoryBroker())
    high = fcntl.fcntl(a.fileno(), fcntl.F_DUPFD, 1100)
    try:
        with GuestClient(high, timeout=5) as c:
            assert c.send("q", ["x"])[0].state == "accepted"
    finally:
        os.close(high)
        peer.close()
        a.close()
        b.close()


def test_large_message_over_a_raw_pty_survives_partial_writes(
    raw_pty: tuple[int, int, str],
) -> None:
    """A pty moves a few KiB per write: every frame of a 1 MiB message meets EAGAIN and
    partial writes on both sides."""
    master, _slave, path = raw_pty
    peer = PeerThread(master, MemoryBroker())
    body = bytes(range(256)) * 4096
    try:
        with GuestClient(path, timeout=10) as c:
            assert c.send("big", [body])[0].state == "accepted"
            assert bytes(c.receive("big", 1)[0].body) == body
    finally:
        peer.close()


class _Count(logging.Handler):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.count += 1


def test_driver_survives_the_port_being_unplugged_and_replugged(tmp_path: Path) -> None:
    """The port's path disappears (open: ENOENT) and comes back on a new device; the
    driver keeps retrying and re-attaches its link on the new one."""
    link = tmp_path / "org.qpid.amqp.0"
    devices: list[tuple[int, int, PeerThread, MemoryBroker]] = []

    def plug() -> None:
        master, slave = pty.openpty()
        tty.setraw(slave)
        broker = MemoryBroker()
        devices.append((master, slave, PeerThread(master, broker), broker))
        link.symlink_to(os.ttyname(slave))

    def unplug() -> None:
        master, slave, peer, _ = devices[-1]
        link.unlink()
        peer.close()
        os.close(master)  # the guest's read now fails with EIO
        os.close(slave)

    failed = _Count("cannot open the channel")
    guest_driver.log.addHandler(failed)
    guest_driver.log.setLevel(logging.INFO)

    class Handler(MessagingHandler):
        opened = 0
        accepted = False
        replugging = False

        def on_start(self, event: Any) -> None:
            event.container.create_sender("q")
            self.give_up = event.container.schedule(10, self)

        def on_link_opened(self, event: Any) -> None:
            self.opened += 1
            if self.opened == 1:
                unplug()
            else:
                event.sender.send(Message(body="after replug"))

        def on_disconnected(self, event: Any) -> None:
            # Seen more than once per loss (proton's MessagingHandler reports it on tail
            # closed and on closed, the driver once more): replug once.
            if len(devices) == 1 and not self.replugging:
                self.replugging = True
                event.container.schedule(0.02, Replug())

        def on_accepted(self, event: Any) -> None:
            self.accepted = True
            self.give_up.cancel()
            event.connection.close()

        def on_timer_task(self, event: Any) -> None:
            event.container.stop()

    class Replug:
        def on_timer_task(self, event: Any) -> None:
            if failed.count:  # the driver has met the missing port at least once
                plug()
            else:
                event.container.schedule(0.02, self)

    plug()
    handler = Handler()
    try:
        Driver(handler, str(link)).run()
    finally:
        guest_driver.log.removeHandler(failed)
        guest_driver.log.setLevel(logging.NOTSET)
        for master, slave, peer, _ in devices[1:]:
            peer.close()
            os.close(master)
            os.close(slave)
    assert handler.accepted and handler.opened == 2
    assert failed.count >= 1
    assert [m.body for m in devices[-1][3].queues["q"]] == ["after replug"]


def test_reconnect_backoff_grows_then_resets_after_a_good_connection() -> None:
    """Failed opens are retried after 0.1, 0.2, 0.5 s...; a connection the peer opened
    resets the backoff, so the next loss is retried after 0.1 s again."""
    broker = MemoryBroker()
    times: list[float] = []
    peers: list[tuple[socket.socket, PeerThread]] = []

    def opener() -> int:
        times.append(time.monotonic())
        if len(times) in (1, 2, 3, 5):
            raise ConnectionRefusedError("host side of p is not connected")
        a, b = socket.socketpair()
        peers.append((b, PeerThread(b.fileno(), broker)))
        return a.detach()

    class Handler(MessagingHandler):
        opened = 0
        lost_at = 0.0

        def on_start(self, event: Any) -> None:
            event.container.create_sender("q")
            self.give_up = event.container.schedule(10, self)

        def on_disconnected(self, event: Any) -> None:
            self.lost_at = self.lost_at or time.monotonic()  # the first loss only

        def on_link_opened(self, event: Any) -> None:
            self.opened += 1
            b, peer = peers[-1]
            if self.opened == 1:
                peer.close()
                b.close()  # the host daemon restarts
            else:
                self.give_up.cancel()
                event.connection.close()

        def on_timer_task(self, event: Any) -> None:
            event.container.stop()

    handler = Handler()
    try:
        Driver(handler, opener).run()
    finally:
        for b, peer in peers:
            peer.close()
            b.close()
    assert handler.opened == 2
    assert len(times) == 6  # opens: fail, fail, fail, ok (then lost), fail, ok
    gaps = [times[1] - times[0], times[2] - times[1], times[3] - times[2],
            times[4] - handler.lost_at, times[5] - times[4]]  # fmt: skip
    for gap, want in zip(gaps, [0.1, 0.2, 0.5, 0.1, 0.2], strict=True):
        assert want - 0.02 <= gap < want + 0.5, gaps
