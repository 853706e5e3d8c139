"""Frames that cross in flight, against the real daemon and a real Artemis.

tests/unit/test_router_crossings.py makes the guest's and the broker's frames cross in the
harness, with a scripted proton broker. Here the same crossings go through the daemon to
Artemis (proton-j), which answers some of them in its own way, to show what a guest really
gets.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cproton_ffi import lib

from connector.routing.engine import read_condition
from connector.routing.frames import LinkExtras
from tests.support.attach_peer import AttachPeer
from tests.support.connector import Routed, routed

pytestmark = pytest.mark.broker

# Artemis answers an attach within milliseconds; one it never answers is the failure.
ANSWER_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def art(artemis: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    """One daemon on Artemis with a unix channel (guest hc-unix)."""
    with routed(artemis, tmp_path_factory.mktemp("hc"), ("unix",), "hc") as running:
        yield running


def _written(peer: AttachPeer) -> bytes:
    """Everything the peer's proton has to send, taken out without sending it."""
    out = bytearray()
    while chunk := peer.engine.peek_output():
        out += chunk
        peer.engine.pop_output(len(chunk))
    return bytes(out)


def test_a_link_detached_and_attached_again_in_one_write_is_answered_by_artemis(
    art: Routed,
) -> None:
    # A guest writes a link's detach and its attach under the same name in one write (a
    # durable subscriber closed and made again). Proton's engine in the connector wrote the
    # attach first, and Artemis, given an attach for a link that is still attached, answers
    # nothing: the guest's new link hung.
    fd = art.channels["unix"].fd()
    peer = AttachPeer(fd, "crossing-reattach")
    conn = peer.engine.connection
    queue = f"crossing-{uuid.uuid4().hex[:8]}"
    try:
        first, _ = peer.attach("sub", queue, sending=False, extras=LinkExtras())
        lib.pn_link_close(first)
        frames = _written(peer)  # its detach, then the attach again
        again = lib.pn_receiver(lib.pn_link_session(first), b"sub")
        lib.pn_terminus_set_address(lib.pn_link_source(again), queue.encode())
        lib.pn_link_open(again)
        frames += _written(peer)
        assert os.write(fd, frames) == len(frames)
        peer.pump_until(
            lambda: (
                lib.pn_link_state(again) & lib.PN_REMOTE_ACTIVE
                or lib.pn_connection_state(conn) & lib.PN_REMOTE_CLOSED
            ),
            ANSWER_TIMEOUT,
        )
        assert not lib.pn_connection_state(conn) & lib.PN_REMOTE_CLOSED, read_condition(
            lib.pn_connection_remote_condition(conn)
        )
    finally:
        peer.close()
