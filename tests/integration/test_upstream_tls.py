"""amqps to the broker: TLS verified against the configured CA, and a wrong CA refused.

The broker here is a small proton server over real TLS on loopback (proton's own SSL
layer), which also records each client's open-frame properties — something neither Artemis
nor RabbitMQ shows — so the host-asserted identity is checked as the broker receives it.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proton import SSLDomain
from proton.handlers import MessagingHandler
from proton.reactor import Container

from connector.guest.client import AmqpError, Disconnected, GuestClient
from tests.brokers.common import free_port
from tests.support.connector import Connector, Qemu

TIMEOUT = 30.0


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class _TlsBroker(MessagingHandler):
    """Accepts connections over TLS, records open properties and messages."""

    def __init__(self, port: int, cert: Path, key: Path) -> None:
        super().__init__()
        self.port = port
        self.domain = SSLDomain(SSLDomain.MODE_SERVER)
        self.domain.set_credentials(str(cert), str(key), None)
        self.opens: list[dict[str, Any]] = []
        self.messages: list[Any] = []
        self.listening = threading.Event()
        self.got_message = threading.Event()

    def on_start(self, event: Any) -> None:
        event.container.listen(f"amqps://127.0.0.1:{self.port}", ssl_domain=self.domain)
        self.listening.set()

    def on_connection_opening(self, event: Any) -> None:
        props = event.connection.remote_properties or {}
        self.opens.append(
            {
                "container": event.connection.remote_container,
                "properties": {str(k): v for k, v in props.items()},
            }
        )

    def on_link_opening(self, event: Any) -> None:
        link = event.link
        if link.remote_target and link.remote_target.address:
            link.target.address = link.remote_target.address
        if link.remote_source and link.remote_source.address:
            link.source.address = link.remote_source.address

    def on_message(self, event: Any) -> None:
        self.messages.append(event.message.body)
        self.got_message.set()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[_TlsBroker, Path]]:
    cert, key = _self_signed(tmp_path, "broker")
    broker = _TlsBroker(free_port(), cert, key)
    container = Container(broker)
    thread = threading.Thread(target=container.run, daemon=True)
    thread.start()
    assert broker.listening.wait(TIMEOUT)
    try:
        yield broker, cert
    finally:
        container.stop()
        thread.join(TIMEOUT)


class _Endpoint:
    """The broker as tests.support.connector.Connector wants to see it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.user = None
        self.password = None


def _daemon(tmp_path: Path, port: int, ca: Path, ch: Qemu) -> Connector:
    conf = tmp_path / "tls.toml"
    conf.write_text(f"[broker.tls]\nca_file = '{ca}'\n")
    return Connector(
        tmp_path, _Endpoint(f"amqps://127.0.0.1:{port}"), [ch], "--config", str(conf)
    ).start()


def test_amqps_with_the_right_ca_carries_the_guests_identity(
    tls_broker: tuple[_TlsBroker, Path], tmp_path: Path
) -> None:
    broker, cert = tls_broker
    ch = Qemu("pty", tmp_path, "secure-vm")
    daemon = _daemon(tmp_path, broker.port, cert, ch)
    try:
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
    finally:
        assert daemon.stop() == 0
        ch.hang_up()


def test_amqps_with_a_wrong_ca_is_refused_and_the_guest_told(
    tls_broker: tuple[_TlsBroker, Path], tmp_path: Path
) -> None:
    broker, _ = tls_broker
    other_ca, _ = _self_signed(tmp_path, "other")
    ch = Qemu("unix-listen", tmp_path, "mitm-vm")
    daemon = _daemon(tmp_path, broker.port, other_ca, ch)
    try:
        with pytest.raises((AmqpError, Disconnected)) as refused:
            GuestClient(ch.fd(), container_id="agent-x", timeout=TIMEOUT)
        assert "amqp:connection:forced" in str(refused.value)
        assert broker.messages == []
        last_error = daemon.wait_state("mitm-vm", "waiting")["last_error"] or ""
        assert "forced" in last_error
        assert "certificate verify failed" in last_error
    finally:
        assert daemon.stop() == 0
        ch.hang_up()
