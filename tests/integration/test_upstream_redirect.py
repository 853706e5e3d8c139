"""A broker that closes with ``amqp:connection:redirect``: the connector follows it for the
guest, which has only its serial port and could not.

Before the guest's open is answered the redirect is followed and the guest sees only the
target's open: a real Artemis connection router sends it to the suite's Artemis
(``RedirectingArtemis``). What Artemis never sends is scripted (``RedirectPeer``): a
redirect to itself (a loop), one without a usable target, and one mid-connection, after
which the guest is forced off and its next connection goes to the target.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from proton import Message

from connector.guest.client import AmqpError, GuestClient
from connector.redirect import ESTABLISHMENT_FAILED, MAX_REDIRECTS, REDIRECT
from connector.routing.frames import LinkExtras
from tests.brokers import Artemis
from tests.brokers.artemis import RedirectingArtemis
from tests.brokers.common import free_port
from tests.support.attach_peer import AttachPeer
from tests.support.connector import Connector, Qemu, serving
from tests.support.redirect_peer import RedirectPeer

pytestmark = pytest.mark.broker

TIMEOUT = 30.0
FORCED = "amqp:connection:forced"


@pytest.fixture
def peers() -> Iterator[list[RedirectPeer]]:
    """Scripted redirecting brokers a test makes; closed after it."""
    made: list[RedirectPeer] = []
    yield made
    for peer in made:
        peer.close()


def _peer(peers: list[RedirectPeer], info: dict[str, Any], **kw: Any) -> RedirectPeer:
    peer = RedirectPeer(info, **kw)
    peers.append(peer)
    return peer


def _daemon(
    tmp_path: Path, broker: Any, url: str, qemu: Qemu, **kw: Any
) -> AbstractContextManager[Connector]:
    """The daemon on the failover list ``url``, serving ``qemu``'s channel for a block."""
    return serving(Connector(tmp_path, broker, [qemu], broker_urls=url, **kw))


def _forced(qemu: Qemu) -> str:
    """The description of the ``amqp:connection:forced`` a new guest connection gets."""
    with pytest.raises(AmqpError) as told:
        GuestClient(qemu.fd(), container_id="redirected", timeout=TIMEOUT)
    qemu.detach_fd()  # the refused client closed its end; the daemon connects again
    assert told.value.name == FORCED, told.value
    return told.value.description or ""


def _redirects_recorded(daemon: Connector, guest: str) -> list[str]:
    detail = daemon.channel(guest)["detail"]
    return [e["description"] for e in detail["errors"] if e["condition"] == REDIRECT]


def test_a_redirect_before_the_open_is_followed_to_the_target(
    redirecting: RedirectingArtemis, artemis: Artemis, tmp_path: Path
) -> None:
    """Artemis's connection router redirects the connector's upstream to the suite's
    Artemis. The guest gets the target's open, sends and receives there, and never hears
    of the redirect; the channel records it, and the log names the guest."""
    qemu = Qemu("unix", tmp_path, "redirected")
    with _daemon(tmp_path, artemis, redirecting.redirect_url, qemu) as daemon:
        with artemis.connection() as direct:
            direct.create_sender("redirect.to.guest").send(Message(body="from the target"))
        with GuestClient(qemu.fd(), container_id="redirected", timeout=TIMEOUT) as guest:
            assert ESTABLISHMENT_FAILED not in (guest.remote_properties or {})
            assert guest.send("redirect.from.guest", ["to the target"])[0].state == "accepted"
            assert [m.body for m in guest.receive("redirect.to.guest", 1)] == ["from the target"]
            assert daemon.channel("redirected")["upstream"] == artemis.url
        with artemis.connection() as direct:
            got = direct.create_receiver("redirect.from.guest").receive(timeout=TIMEOUT)
            assert got.body == "to the target"
        recorded = _redirects_recorded(daemon, "redirected")
        assert recorded == [
            f"{redirecting.redirect_url} redirected the connection to {artemis.url}: followed"
        ]
        logged = f"guest redirected/org.qpid.amqp.0: {recorded[0].removesuffix(': followed')}"
        assert f"{logged}; following (redirect 1 of at most {MAX_REDIRECTS})" in daemon.log_text()


def test_links_attached_before_the_open_follow_the_redirect(
    redirecting: RedirectingArtemis, artemis: Artemis, tmp_path: Path
) -> None:
    """A client that sends its open, begin and attach at once (as proton's C clients do)
    has them all waiting upstream when the redirect comes: they are made again on the
    target's connection, and the attach is answered from there."""
    qemu = Qemu("unix", tmp_path, "pipelined")
    with _daemon(tmp_path, artemis, redirecting.redirect_url, qemu) as daemon:
        peer = AttachPeer(qemu.fd(), container="pipelined")
        peer.attach("early", "redirect.early", sending=True, extras=LinkExtras())
        assert peer.engine.condition() is None
        peer.close()
        assert len(_redirects_recorded(daemon, "pipelined")) == 1
        queues = artemis.management("getQueueNames")
        assert "redirect.early" in queues  # the attach made it on the target


def test_a_redirect_loop_is_bounded(peers: list[RedirectPeer], tmp_path: Path) -> None:
    """A broker that redirects to itself gets MAX_REDIRECTS more opens, no more; the guest
    is then forced off with a reason that names the loop. Each open after a redirect
    carries the redirect's hostname."""
    peer = _peer(peers, {})
    peer.info.update({"network-host": "127.0.0.1", "port": peer.port, "hostname": "vhost.test"})
    qemu = Qemu("unix", tmp_path, "looped")
    with _daemon(tmp_path, None, peer.url, qemu, credentials=False) as daemon:
        why = _forced(qemu)
        assert why.startswith(f"redirect loop: {MAX_REDIRECTS} redirects followed"), why
        assert peer.url in why, why
        assert peer.opens == MAX_REDIRECTS + 1
        assert peer.hostnames == ["127.0.0.1"] + ["vhost.test"] * MAX_REDIRECTS
        assert len(_redirects_recorded(daemon, "looped")) == MAX_REDIRECTS + 1


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        ({"port": 5672}, "no network-host"),
        ({"network-host": "127.0.0.1"}, "no port"),
        ({"network-host": "127.0.0.1", "port": 0}, "port 0 is not a port number"),
        ({"network-host": "127.0.0.1", "port": "x"}, "port 'x' is not a port number"),
        ({"network-host": "amqp://elsewhere", "port": 5672}, "is not a host"),
        (
            {"network-host": "127.0.0.1", "port": 5672, "scheme": "amqps"},
            "to scheme 'amqps', not amqp: not followed",
        ),
    ],
)
def test_a_redirect_without_a_usable_target_is_an_upstream_failure(
    peers: list[RedirectPeer], tmp_path: Path, info: dict[str, Any], reason: str
) -> None:
    peer = _peer(peers, info)
    qemu = Qemu("unix", tmp_path, "badredirect")
    with _daemon(tmp_path, None, peer.url, qemu, credentials=False):
        why = _forced(qemu)
        assert why.startswith(f"{peer.url} redirected the connection to no usable target"), why
        assert why.endswith(reason), why
        assert peer.opens == 1


def test_a_redirect_mid_connection_forces_the_guest_and_its_next_connection_goes_there(
    peers: list[RedirectPeer], artemis: Artemis, tmp_path: Path
) -> None:
    """The broker answered the guest's open, then redirects: too late to follow without the
    guest noticing. It is forced off with a reason naming both brokers, and its next
    connection goes straight to the target."""
    peer = _peer(peers, {"network-host": artemis.host, "port": artemis.port}, mid_connection=True)
    qemu = Qemu("unix", tmp_path, "midway")
    with _daemon(tmp_path, None, peer.url, qemu, credentials=False):
        guest = GuestClient(qemu.fd(), container_id="midway", timeout=TIMEOUT)
        with pytest.raises(AmqpError) as told:
            guest.send("redirect.midway", ["lost"])
        assert told.value.name == FORCED, told.value
        target = f"amqp://{artemis.host}:{artemis.port}"
        assert told.value.description == (
            f"{peer.url} redirected the connection to {target}; the next connection goes there"
        )
        guest.driver.close_fd()  # the guest's client gives up; the next one comes
        qemu.detach_fd()
        with GuestClient(qemu.fd(), container_id="midway", timeout=TIMEOUT) as again:
            assert again.send("redirect.midway", ["there"])[0].state == "accepted"
            assert [m.body for m in again.receive("redirect.midway", 1)] == ["there"]
        assert peer.opens == 1


def test_a_redirect_to_a_dead_target_moves_the_failover_list_past_the_redirector(
    peers: list[RedirectPeer], artemis: Artemis, tmp_path: Path
) -> None:
    """A balancer first in the failover list keeps sending guests to a target that is
    down: the failure is the balancer's URL's, so the next guest connection tries the
    next URL of the list instead of the same balancer again."""
    dead = free_port()
    peer = _peer(peers, {"network-host": "127.0.0.1", "port": dead})
    qemu = Qemu("unix", tmp_path, "deadtarget")
    with _daemon(tmp_path, artemis, f"{peer.url},{artemis.url}", qemu, credentials=False) as daemon:
        why = _forced(qemu)
        assert why.startswith(f"cannot connect to amqp://127.0.0.1:{dead}"), why
        with GuestClient(qemu.fd(), container_id="deadtarget", timeout=TIMEOUT) as guest:
            assert guest.send("redirect.deadtarget", ["past it"])[0].state == "accepted"
            assert daemon.channel("deadtarget")["upstream"] == artemis.url
        assert peer.opens == 1
