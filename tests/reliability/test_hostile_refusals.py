"""Refusals that cross the guest's other frames, against the real daemon and a real Artemis.

tests/unit/test_router_refusals.py makes the connector's refusals meet the guest's frames in
the harness, with a scripted broker. Here they go through the daemon, with a policy from its
configuration file, to Artemis, to show what a guest and the broker really get: Artemis
reads a message its own way, and the daemon reads the guest's frames as they come.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cproton_ffi import lib
from proton import Message

from connector.guest.client import GuestClient
from connector.routing.engine import read_condition
from tests.reliability.harness import read_until
from tests.reliability.test_hostile_crossings import _written
from tests.support.attach_peer import AttachPeer
from tests.support.connector import Connector, Qemu, serving

pytestmark = pytest.mark.broker

# Artemis answers within milliseconds; an answer that never comes is the failure.
ANSWER_TIMEOUT = 10.0
# What the guests of this module may attach to; anything else is refused.
ALLOWED = "rf-ok."
POLICY = f"[policy.default]\naddresses = ['{ALLOWED}#']\n"
CLOSE_DESCRIPTOR = b"\x00S\x18"


def _name(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def daemon(artemis: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Connector]:
    """One daemon on Artemis whose policy allows only ``ALLOWED`` addresses, with a pty
    channel (guest rf-pty) and a unix channel (guest rf-unix)."""
    workdir: Path = tmp_path_factory.mktemp("rf")
    conf = workdir / "connector.toml"
    conf.write_text(POLICY)
    channels = [Qemu("pty", workdir, "rf-pty"), Qemu("unix", workdir, "rf-unix")]
    with serving(Connector(workdir, artemis, channels, "--config", str(conf))) as running:
        yield running


class _Raw(Message):
    """A message whose bytes on the wire are given, not encoded: proton's ``Message.send``
    sends what ``encode`` returns, so a guest client sends these bytes as one message."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self._raw = raw

    def encode(self) -> bytes:
        return self._raw


def test_a_relayed_message_cannot_smuggle_a_forbidden_address_past_the_relay_check(
    daemon: Connector, artemis: Any
) -> None:
    """A guest allowed only ``rf-ok.#`` sends on the anonymous relay one message made of
    two: properties ``to`` a forbidden address and a body, then properties ``to`` an allowed
    address and a body. The connector checked the ``to`` proton decodes, the last one, and
    passed the bytes on unchanged; Artemis routes by the first properties section it
    reads, so the message landed on the forbidden address (Artemis auto-creates its queue),
    and the guest was told it was accepted. Not one well-formed message, it is rejected."""
    forbidden, allowed = _name("rf-no"), _name(ALLOWED + "relay")
    two = Message(address=forbidden, body="smuggled").encode()
    two += Message(address=allowed, body="decoy").encode()
    fd = daemon.channels[0].fd()
    with GuestClient(fd, container_id=_name("rf-relay"), timeout=ANSWER_TIMEOUT) as guest:
        [outcome] = guest.send(None, [_Raw(two)])
    # Settled by the broker, so it has routed the message by now: no wait for it.
    assert forbidden not in artemis.management("getQueueNames")
    assert outcome.state == "rejected"


@pytest.mark.parametrize("address", ["forbidden", ALLOWED + "q"], ids=["refused", "routed"])
def test_a_name_attached_and_detached_twice_before_the_brokers_open(
    daemon: Connector, address: str
) -> None:
    """A guest writes its open, a begin, and a link attached and detached twice under one
    name in one write, as a client that gives up and retries at once does. The daemon
    reads it all before Artemis has answered its open, so nothing can be answered until
    then; then both links were answered in one pass, and proton wrote both attaches before
    the detaches. The guest's proton took the second attach for a second link of that name
    and failed the whole connection, whether the links were refused by the policy or
    routed. Now the guest gets attach, detach, attach, detach."""
    fd = daemon.channels[1].fd()
    peer = AttachPeer(fd, _name("rf-twice"))
    conn = peer.engine.connection
    ssn = lib.pn_session_head(conn, 0)
    links, frames = [], b""
    for _ in range(2):
        link = lib.pn_sender(ssn, b"x")
        lib.pn_terminus_set_address(lib.pn_link_target(link), address.encode())
        lib.pn_link_open(link)
        lib.pn_link_close(link)
        links.append(link)
        # Taken out per link: in one pass the peer's proton would write both attaches first.
        frames += _written(peer)
    assert os.write(fd, frames) == len(frames)  # open, begin, attach, detach, attach, detach
    try:
        peer.pump_until(
            lambda: (
                lib.pn_link_state(links[1]) & lib.PN_REMOTE_CLOSED
                or peer.engine.condition() is not None
                or lib.pn_connection_state(conn) & lib.PN_REMOTE_CLOSED
            ),
            ANSWER_TIMEOUT,
        )
        assert peer.engine.condition() is None
        assert not lib.pn_connection_state(conn) & lib.PN_REMOTE_CLOSED, read_condition(
            lib.pn_connection_remote_condition(conn)
        )
    finally:
        if peer.engine.condition() is None:
            peer.close()
        else:  # its proton failed: its close goes out, and the daemon's answer is read
            os.write(fd, _written(peer))
            peer.engine.free()
            assert CLOSE_DESCRIPTOR in read_until(fd, CLOSE_DESCRIPTOR)
        daemon.wait_state("rf-unix", "waiting")
