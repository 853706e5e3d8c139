"""Our idle timeout while the loop does not read a peer (Engine.input_paused/resumed).

Backpressure stops reading a peer whose far side is slow; its bytes, heartbeats included,
then wait unread. Proton judges a peer dead by the bytes pushed into it, so without
``input_paused`` it would cut a live peer that the loop itself is not reading. The clock
here is the one proton's tick takes, in milliseconds.
"""

from __future__ import annotations

from cproton_ffi import lib

from connector.routing.engine import Engine
from tests.support.routing import pump

IDLE_MS = 1000  # our idle timeout towards the peer
PEER_IDLE_MS = 400  # the peer's, so we owe it a heartbeat every 200 ms
T0 = 1_000_000
# An AMQP empty frame: a heartbeat, as a peer's proton writes one.
HEARTBEAT = b"\x00\x00\x00\x08\x02\x00\x00\x00"


def _open_pair() -> tuple[Engine, Engine]:
    """Our server engine (idle timeout IDLE_MS) and a peer that asks for heartbeats, both
    open, with proton's idle clock started at T0."""
    peer = Engine(server=False)
    lib.pn_transport_set_idle_timeout(peer.transport, PEER_IDLE_MS)
    ours = Engine(server=True)
    ours.set_limits(max_frame=65536, channel_max=16, idle_timeout_ms=IDLE_MS)
    lib.pn_connection_open(peer.connection)
    pump(peer, ours)
    lib.pn_connection_open(ours.connection)
    pump(peer, ours)
    ours.tick(T0)
    assert ours.condition() is None
    return ours, peer


def _cut(engine: Engine) -> bool:
    cond = engine.condition()
    return cond is not None and "idle-timeout" in cond[1]


def test_a_silent_peer_is_cut_at_the_idle_timeout() -> None:
    """The check the rest of this file suspends: without bytes, the peer is cut."""
    ours, _ = _open_pair()
    ours.tick(T0 + IDLE_MS)
    assert _cut(ours)


def test_a_peer_not_read_is_not_cut_and_still_gets_heartbeats() -> None:
    ours, _ = _open_pair()
    assert bytes(ours.peek_output()) == b""  # no heartbeat due yet
    ours.input_paused()
    ours.tick(T0 + 10 * IDLE_MS)
    assert ours.condition() is None
    assert bytes(ours.peek_output()) == HEARTBEAT  # the peer asked for them; it gets them


def test_with_bytes_waiting_the_check_returns_with_them() -> None:
    ours, _ = _open_pair()
    ours.input_paused()
    ours.input_resumed(True)
    ours.tick(T0 + 10 * IDLE_MS)
    assert ours.condition() is None  # the waiting bytes are not read yet
    ours.push(HEARTBEAT)
    now = T0 + 11 * IDLE_MS
    ours.tick(now)
    assert ours.condition() is None
    ours.tick(now + IDLE_MS)  # and now the peer is silent for a whole timeout
    assert _cut(ours)


def test_with_nothing_waiting_silence_counts_from_the_last_bytes_read() -> None:
    """A peer that sent nothing while it was not read was silent all along."""
    ours, _ = _open_pair()
    ours.input_paused()
    ours.tick(T0 + 10 * IDLE_MS)
    ours.input_resumed(False)
    ours.tick(T0 + 10 * IDLE_MS)
    assert _cut(ours)
