"""amqps to the broker: TLS verified against the configured CA, a wrong CA refused, and
across it the attach fields proton drops, megabyte messages and a client certificate.

The connector terminates TLS itself (``connector/tls.py``), so the upstream engine sees
plaintext frames. The broker here is a small proton server over real TLS on loopback
(proton's own SSL layer: an implementation independent of ours), which also records each
client's open-frame properties, its authenticated user and the attach frames it decoded —
things neither Artemis nor RabbitMQ shows — so what crossed is checked as the broker
received it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from proton import UNDESCRIBED, Array, Data, Message, SSLDomain, Transport, symbol
from proton.reactor import Container

from connector.guest.client import AmqpError, Disconnected, GuestClient
from connector.routing.frames import LinkExtras
from tests.brokers.common import free_port
from tests.support.attach_peer import AttachPeer
from tests.support.certs import self_signed
from tests.support.connector import Connector, Qemu, serving
from tests.support.echo_broker import AddressEchoingHandler

TIMEOUT = 30.0
# Many TLS records, more than a socket buffer holds: partial sends, records split across reads.
BIG = 5 * 1024 * 1024 + 3


class _TlsBroker(AddressEchoingHandler):
    """Accepts connections over TLS; records opens, users, attach frames and messages, and
    sends ``outbox`` to whoever receives from it."""

    def __init__(self, port: int, cert: Path, key: Path, client_ca: Path | None) -> None:
        super().__init__()
        self.port = port
        self.domain = SSLDomain(SSLDomain.MODE_SERVER)
        self.domain.set_credentials(str(cert), str(key), None)
        if client_ca is not None:  # a client certificate is required, and names the user
            self.domain.set_trusted_ca_db(str(client_ca))
            self.domain.set_peer_authentication(SSLDomain.VERIFY_PEER, str(client_ca))
        self.opens: list[dict[str, Any]] = []
        self.attaches: list[str] = []  # attaches received, as proton's frame tracer prints them
        self.messages: list[Any] = []
        self.outbox: list[Any] = []
        self.stall_s = 0.0  # stop reading this long, once, in the middle of a message
        self.listening = threading.Event()
        self.got_message = threading.Event()

    def on_start(self, event: Any) -> None:
        event.container.listen(f"amqps://127.0.0.1:{self.port}", ssl_domain=self.domain)
        self.listening.set()

    def on_connection_bound(self, event: Any) -> None:
        # Proton decodes no link capabilities, but its frame tracer prints whole frames.
        event.transport.tracer = self._trace
        event.transport.trace(Transport.TRACE_FRM)

    def _trace(self, _transport: Any, line: str) -> None:
        if "<- @attach" in line:  # received, not the answer
            self.attaches.append(line)

    def on_connection_opening(self, event: Any) -> None:
        props = event.connection.remote_properties or {}
        self.opens.append(
            {
                "container": event.connection.remote_container,
                "properties": {str(k): v for k, v in props.items()},
                "user": event.transport.user,
            }
        )

    def on_sendable(self, event: Any) -> None:
        while self.outbox and event.sender.credit:
            event.sender.send(Message(body=self.outbox.pop(0)))

    def on_delivery(self, event: Any) -> None:
        if event.delivery.partial and self.stall_s:
            time.sleep(self.stall_s)  # the connector's socket fills meanwhile
            self.stall_s = 0.0

    def on_message(self, event: Any) -> None:
        body = event.message.body  # a binary body is a memoryview of proton's buffer
        self.messages.append(bytes(body) if isinstance(body, memoryview) else body)
        self.got_message.set()


@contextlib.contextmanager
def _running(tmp: Path, client_ca: Path | None = None) -> Iterator[tuple[_TlsBroker, Path]]:
    cert, key = self_signed(tmp, "broker")
    broker = _TlsBroker(free_port(), cert, key, client_ca)
    container = Container(broker)
    thread = threading.Thread(target=container.run, daemon=True)
    thread.start()
    assert broker.listening.wait(TIMEOUT)
    try:
        yield broker, cert
    finally:
        container.stop()
        thread.join(TIMEOUT)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[_TlsBroker, Path]]:
    with _running(tmp_path) as running:
        yield running


class _Endpoint:
    """The broker as tests.support.connector.Connector wants to see it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.user = None
        self.password = None


def _daemon(
    tmp_path: Path, port: int, ca: Path, ch: Qemu, broker: str = "", tls: str = ""
) -> AbstractContextManager[Connector]:
    """The connector on ``amqps://`` to ``port``, trusting ``ca``, serving ``ch`` for a
    block; ``broker`` and ``tls`` are more lines for the ``[broker]`` and ``[broker.tls]``
    tables."""
    conf = tmp_path / "tls.toml"
    conf.write_text(f"[broker]\n{broker}[broker.tls]\nca_file = '{ca}'\n{tls}")
    return serving(
        Connector(tmp_path, _Endpoint(f"amqps://127.0.0.1:{port}"), [ch], "--config", str(conf))
    )


def test_amqps_with_the_right_ca_carries_the_guests_identity(
    tls_broker: tuple[_TlsBroker, Path], tmp_path: Path
) -> None:
    broker, cert = tls_broker
    ch = Qemu("pty", tmp_path, "secure-vm")
    with _daemon(tmp_path, broker.port, cert, ch):
        with GuestClient(ch.fd(), container_id="agent-tls", timeout=TIMEOUT) as guest:
            guest.send("inbox", ["over TLS"])
            assert broker.got_message.wait(TIMEOUT)
        assert broker.messages == ["over TLS"]
        (opened,) = broker.opens
        assert opened["container"] == "agent-tls"
        props = opened["properties"]
        assert props["qpid-virtio.guest"] == "secure-vm"
        assert props["qpid-virtio.port"] == "org.qpid.amqp.0"
        assert props["qpid-virtio.channel"] == ch.path


def test_amqps_with_a_wrong_ca_is_refused_and_the_guest_told(
    tls_broker: tuple[_TlsBroker, Path], tmp_path: Path
) -> None:
    broker, _ = tls_broker
    other_ca, _ = self_signed(tmp_path, "other")
    ch = Qemu("unix-listen", tmp_path, "mitm-vm")
    with _daemon(tmp_path, broker.port, other_ca, ch) as daemon:
        with pytest.raises((AmqpError, Disconnected)) as refused:
            GuestClient(ch.fd(), container_id="agent-x", timeout=TIMEOUT)
        assert "amqp:connection:forced" in str(refused.value)
        assert broker.messages == []
        last_error = daemon.wait_state("mitm-vm", "waiting")["last_error"] or ""
        assert "forced" in last_error
        url = f"amqps://127.0.0.1:{broker.port}"
        assert f"{url}: TLS: certificate verify failed: self-signed certificate" in last_error


def test_attach_fields_proton_drops_cross_over_amqps(
    tls_broker: tuple[_TlsBroker, Path], tmp_path: Path
) -> None:
    # The connector writes a guest's desired-capabilities into its own attach frame, which
    # it can do only because it sees that frame in plaintext: TLS is outside the engine.
    broker, cert = tls_broker
    ch = Qemu("unix", tmp_path, "caps-vm")
    wish = LinkExtras(desired=Array(UNDESCRIBED, Data.SYMBOL, symbol("DELAYED_DELIVERY")))
    with _daemon(tmp_path, broker.port, cert, ch):
        peer = AttachPeer(ch.fd(), "caps-guest")
        try:
            peer.attach("s", "inbox", sending=True, extras=wish)
        finally:
            peer.close()
        (attach,) = broker.attaches
        assert 'desired-capabilities=@<symbol>[:"DELAYED_DELIVERY"]' in attach


def test_a_large_message_each_way_over_amqps(
    tls_broker: tuple[_TlsBroker, Path], tmp_path: Path
) -> None:
    # Megabytes both ways: while the broker stops reading, our socket takes ciphertext a
    # part at a time and then none (the rest waits for writability); the broker's records
    # arrive split across reads, and each read is decrypted whole.
    broker, cert = tls_broker
    up, down = os.urandom(BIG), os.urandom(BIG)
    broker.outbox.append(down)
    broker.stall_s = 1.0
    ch = Qemu("unix", tmp_path, "big-vm")
    with _daemon(tmp_path, broker.port, cert, ch):
        with GuestClient(ch.fd(), container_id="agent-big", timeout=TIMEOUT) as guest:
            assert guest.send("inbox", [up])[0].state == "accepted"
            (got,) = guest.receive("outbox", 1)
        assert broker.messages == [up]
        assert bytes(got.body) == down


def test_sasl_external_over_amqps_is_our_client_certificate(tmp_path: Path) -> None:
    # Proton's SASL client chooses EXTERNAL whenever it is allowed and offered, with no TLS
    # layer of its own; the broker offers it for, and names the user after, the client
    # certificate it verified, which our TLS session presented.
    agent_cert, agent_key = self_signed(tmp_path, "agent", cn="host-a")
    with _running(tmp_path, client_ca=agent_cert) as (broker, cert):
        ch = Qemu("pty", tmp_path, "cert-vm")
        mechs = "sasl_mechanisms = 'EXTERNAL'\n"
        mine = f"cert_file = '{agent_cert}'\nkey_file = '{agent_key}'\n"
        with _daemon(tmp_path, broker.port, cert, ch, broker=mechs, tls=mine):
            with GuestClient(ch.fd(), container_id="agent-ext", timeout=TIMEOUT) as guest:
                guest.send("inbox", ["as host-a"])
            (opened,) = broker.opens
            assert opened["user"] == "CN=host-a"
            assert broker.messages == ["as host-a"]
