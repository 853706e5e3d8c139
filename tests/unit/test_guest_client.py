"""connector.guest.client against the in-memory peer over a socketpair, in-process.

The peer (``PeerThread`` + ``MemoryBroker``) runs a proton server transport on the other
end, so every frame crosses a real fd through the same driver a guest uses.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Iterator

import pytest
from proton import Message

from connector.guest import Disconnected, GuestClient, GuestTimeout, LinkRefused
from connector.guest.bridge import CLOSE_FRAME
from connector.guest.peer import MemoryBroker, PeerThread
from tests.support.guest import OpensOnce


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(refuse={"forbidden"}, responders={"upper": lambda m: m.body.upper()})


@pytest.fixture
def client(broker: MemoryBroker) -> Iterator[GuestClient]:
    a, b = socket.socketpair()
    peer = PeerThread(b.fileno(), broker)
    c = GuestClient(a.fileno(), container_id="unit-guest", timeout=10)
    yield c
    c.close()
    peer.close()
    a.close()
    b.close()


def test_open_carries_container_id(client: GuestClient, broker: MemoryBroker) -> None:
    assert broker.remote_container == "unit-guest"


def test_send_counts_every_accepted_outcome(client: GuestClient, broker: MemoryBroker) -> None:
    outcomes = client.send("q", [f"m{i}" for i in range(500)])
    assert [o.state for o in outcomes] == ["accepted"] * 500
    assert len(broker.queues["q"]) == 500


def test_receive_exactly_n_in_order(client: GuestClient, broker: MemoryBroker) -> None:
    client.send("q", [f"m{i}" for i in range(10)])
    assert [m.body for m in client.receive("q", 4)] == ["m0", "m1", "m2", "m3"]
    assert len(broker.queues["q"]) == 6  # no prefetch: exactly 4 credits were granted
    assert [m.body for m in client.receive("q", 6)] == [f"m{i}" for i in range(4, 10)]


def test_at_most_once_sends_presettled(client: GuestClient, broker: MemoryBroker) -> None:
    outcomes = client.send("q", ["a", "b"], settle="at-most-once")
    assert [o.state for o in outcomes] == ["settled", "settled"]
    assert [m.body for m in client.receive("q", 2)] == ["a", "b"]


@pytest.mark.parametrize(
    ("outcome", "requeued"),
    [("accepted", False), ("rejected", False), ("released", True), ("modified", True)],
)
def test_every_receiver_outcome_reaches_the_peer(
    client: GuestClient, broker: MemoryBroker, outcome: str, requeued: bool
) -> None:
    client.send("q", ["only"])
    client.receive("q", 1, outcome=outcome)
    client.send("sync", ["x"])  # a round trip after the disposition: the peer has seen it
    assert broker.outcomes == [outcome]
    assert len(broker.queues["q"]) == (1 if requeued else 0)


def test_drain_returns_what_there_is(client: GuestClient) -> None:
    client.send("q", ["a", "b"])
    assert [m.body for m in client.receive("q", 5, drain=True)] == ["a", "b"]


def test_receive_times_out_with_what_arrived(client: GuestClient) -> None:
    client.send("q", ["a"])
    with pytest.raises(GuestTimeout) as err:
        client.receive("q", 2, timeout=0.3)
    assert [m.body for m in err.value.partial] == ["a"]


def test_anonymous_sender_routes_by_to(client: GuestClient, broker: MemoryBroker) -> None:
    outcomes = client.send(None, [Message(body=1, address="x"), Message(body=2, address="y")])
    assert [o.state for o in outcomes] == ["accepted", "accepted"]
    assert [m.body for m in broker.queues["x"]] == [1]
    assert [m.body for m in broker.queues["y"]] == [2]


def test_refused_attach_carries_the_condition(client: GuestClient) -> None:
    with pytest.raises(LinkRefused) as err:
        client.send("forbidden", ["x"])
    assert err.value.name == "amqp:not-found"
    assert "forbidden" in (err.value.description or "")
    assert client.send("q", ["still usable"])[0].state == "accepted"


def test_request_uses_a_dynamic_reply_address(client: GuestClient) -> None:
    assert client.request("upper", "hello").body == "HELLO"
    assert client.request("upper", "again").body == "AGAIN"


def test_received_binaries_are_bytes_of_their_own(client: GuestClient) -> None:
    """proton 0.40 decodes binaries as views into the message's C buffer: the client copies
    every one of them, however nested, so none outlives the memory it points into."""
    sent = Message(
        body=[b"in a list", {"k": b"in a map"}],
        properties={"p": b"a property"},
        annotations={"x-opt-a": b"an annotation"},
    )
    client.send("q", [sent])
    got = client.receive("q", 1)[0]
    assert got.body == [b"in a list", {"k": b"in a map"}]
    assert type(got.body[0]) is bytes and type(got.body[1]["k"]) is bytes
    assert type(got.properties["p"]) is bytes
    assert type(got.annotations["x-opt-a"]) is bytes


def test_twenty_megabyte_message(client: GuestClient) -> None:
    body = b"\x5a" * (20 * 1024 * 1024)
    assert client.send("big", [body])[0].state == "accepted"
    assert client.receive("big", 1)[0].body == body


def test_lost_channel_is_disconnected_not_a_hang() -> None:
    a, b = socket.socketpair()
    peer = PeerThread(b.fileno())
    c = GuestClient(a.fileno(), timeout=10)
    peer.close()
    b.close()
    with pytest.raises(Disconnected):
        c.send("q", ["x"])
    a.close()


def test_silent_peer_fails_on_idle_timeout() -> None:
    a, b = socket.socketpair()  # nobody ever answers on b
    with pytest.raises(Disconnected) as err:
        GuestClient(a.fileno(), idle_timeout=0.5, timeout=10)
    assert "idle-timeout" in str(err.value)
    a.close()
    b.close()


@pytest.mark.parametrize("target", ["fd", "opener"])
def test_header_answered_by_leftovers_is_retried(target: str) -> None:
    """A host that still believed an older connection open answers our header with that
    connection's last frame, then waits for a header again: the client starts over on the
    same fd (it never reconnects, so it never reopens a port it opened itself)."""
    a, b = socket.socketpair()
    opener = OpensOnce(lambda: os.dup(a.fileno()))
    c, d = socket.socketpair()
    header = b"AMQP\x00\x01\x00\x00"
    peer = PeerThread(d.fileno(), MemoryBroker())

    def host() -> None:
        b.recv(4096)  # the first header (and open)
        b.sendall(CLOSE_FRAME)  # the tail of a connection the guest left long ago
        seen = b""
        while header not in seen:
            seen += b.recv(4096)
        c.sendall(seen[seen.index(header) :])
        relay(b, c)

    t = threading.Thread(target=host, daemon=True)
    t.start()
    with GuestClient(a.fileno() if target == "fd" else opener, timeout=10) as client:
        assert client.send("q", ["after retry"])[0].state == "accepted"
    assert opener.opens == (1 if target == "opener" else 0)
    a.close()
    t.join(10)
    peer.close()
    for s in (b, c, d):
        s.close()


def relay(x: socket.socket, y: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    while True:
        readable, _, _ = select.select([x, y], [], [])
        for src in readable:
            data = src.recv(65536)
            if not data:
                return
            (y if src is x else x).sendall(data)
