"""Apache ActiveMQ Artemis 2.40 as a test fixture: one instance, one AMQP acceptor on loopback.

The distribution is unpacked by tests/install-deps.sh into the cache directory outside the
repository; here we only `artemis create` an instance (under a second, so it is done per session
rather than cached) and rewrite its acceptors so that exactly one AMQP-capable acceptor listens on
127.0.0.1 on a free port. The broker runs with `artemis run` in the foreground, its own process
group, and keeps its data directory and port across stop/start so tests can restart it mid-stream.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from proton.utils import BlockingConnection, ConnectionClosed

from tests.brokers import management
from tests.brokers.common import (
    LOOPBACK,
    PROBE_TIMEOUT,
    Broker,
    BrokerError,
    free_port,
    run_tool,
)

ARTEMIS_VERSION = "2.40.0"
# A small heap keeps two brokers, qemu guests and the suite inside a 2-core CI box; the default
# instance asks for 2 GB. Artemis sizes its global-max-size (paging threshold) as half of it.
ARTEMIS_HEAP = "512M"
# `artemis create` runs a JVM; it takes about 1 s, a slow box may take much longer.
CREATE_TIMEOUT = 120.0
# One acceptor that speaks AMQP (the connector) and CORE (the `artemis` CLI, if ever needed).
# amqpCredits/amqpLowCredits are the defaults of the generated broker.xml, kept explicit so a
# reader sees the credit a sender gets.
ACCEPTOR = (
    '<acceptors>\n         <acceptor name="amqp">tcp://{host}:{port}?protocols=AMQP,CORE;'
    "useEpoll=true;amqpCredits=1000;amqpLowCredits=300;amqpMinLargeMessageSize=102400;"
    "amqpDuplicateDetection=true</acceptor>\n      </acceptors>"
)
# Plain addresses behave as queues (a message sent before any receiver attached waits for one),
# as on qpidd and RabbitMQ's /queue/NAME. Stock Artemis creates MULTICAST addresses for AMQP
# links without capabilities, dropping messages sent before a subscriber exists
# (docs/brokers.md); a `topic` terminus capability still asks for multicast.
ROUTING_DEFAULTS = (
    "<default-address-routing-type>ANYCAST</default-address-routing-type>\n"
    "            <default-queue-routing-type>ANYCAST</default-queue-routing-type>\n"
)
# Addresses under this prefix are never auto-created, so an attach to one is refused: the
# suite's way to provoke a broker-side attach error (amqp:not-found) on purpose.
NO_AUTO_CREATE_PREFIX = "qvc.noauto."
NO_AUTO_CREATE_SETTING = (
    '<address-setting match="{prefix}#">\n'
    "            <auto-create-queues>false</auto-create-queues>\n"
    "            <auto-create-addresses>false</auto-create-addresses>\n"
    "         </address-setting>\n"
    "         "
)
# Disk checks would block producers on a nearly full CI disk; the suite writes little.
MAX_DISK_USAGE = "-1"


def cache_dir() -> Path:
    """Where install-deps.sh keeps downloads: outside the repository, shared between checkouts."""
    default = Path.home() / ".cache" / "qpid-virtio-connector"
    return Path(os.environ.get("QVC_CACHE", default))


def artemis_home() -> Path:
    """The unpacked Artemis distribution ($ARTEMIS_HOME overrides the cache location)."""
    home = Path(os.environ.get("ARTEMIS_HOME", cache_dir() / f"apache-artemis-{ARTEMIS_VERSION}"))
    if not (home / "bin" / "artemis").is_file():
        raise BrokerError(
            f"Artemis {ARTEMIS_VERSION} is not unpacked at {home}; run tests/install-deps.sh"
        )
    return home


class Artemis(Broker):
    """An Artemis instance in `workdir/instance`, with anonymous access and one admin user."""

    name = "artemis"

    def __init__(self, workdir: Path, user: str = "admin", password: str = "admin") -> None:
        super().__init__(workdir, user, password)
        self.instance = workdir / "instance"
        self._create_instance()

    def _create_instance(self) -> None:
        """`artemis create`, then edit broker.xml: one loopback acceptor on our port, no
        disk-usage limit, queue-like plain addresses and a prefix that is never auto-created."""
        run_tool(
            [
                str(artemis_home() / "bin" / "artemis"),
                "create",
                "--silent",
                "--force",
                "--allow-anonymous",
                f"--user={self.user}",
                f"--password={self.password}",
                "--no-web",
                "--no-autotune",
                "--no-fsync",
                "--no-amqp-acceptor",
                "--no-hornetq-acceptor",
                "--no-mqtt-acceptor",
                "--no-stomp-acceptor",
                f"--host={LOOPBACK}",
                f"--java-memory={ARTEMIS_HEAP}",
                "--name=qvc-test",
                str(self.instance),
            ],
            self._env(),
            CREATE_TIMEOUT,
            "artemis create",
        )
        broker_xml = self.instance / "etc" / "broker.xml"
        text = broker_xml.read_text()
        text, acceptors = re.subn(
            r"<acceptors>.*?</acceptors>",
            ACCEPTOR.format(host=LOOPBACK, port=self.port),
            text,
            flags=re.DOTALL,
        )
        text, disk = re.subn(
            r"<max-disk-usage>[^<]*</max-disk-usage>",
            f"<max-disk-usage>{MAX_DISK_USAGE}</max-disk-usage>",
            text,
        )
        text, catch_all = re.subn(
            r'(<address-setting match="#">\s*)',
            lambda m: (
                NO_AUTO_CREATE_SETTING.format(prefix=NO_AUTO_CREATE_PREFIX)
                + m.group(1)
                + ROUTING_DEFAULTS
                + "            "
            ),
            text,
        )
        if acceptors != 1 or disk != 1 or catch_all != 1:
            raise BrokerError(f"unexpected broker.xml layout in {broker_xml}")
        broker_xml.write_text(text)

    def _argv(self) -> list[str]:
        return [str(self.instance / "bin" / "artemis"), "run"]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The instance's artemis.profile sets the JVM flags; an inherited JAVA_ARGS would win.
        env.pop("JAVA_ARGS", None)
        return env

    def management(self, operation: str, *args: Any, resource: str = "broker") -> Any:
        """Invoke one management operation over AMQP and return its decoded result."""
        with self.connection() as conn:
            return management.artemis_call(conn, operation, *args, resource=resource)

    def list_connections(self) -> list[dict[str, Any]]:
        """The broker's connections as `management.artemis_connections` describes them."""
        with self.connection() as conn:
            return management.artemis_connections(conn)


# What a RedirectingArtemis adds to broker.xml: a connector naming the target, a second
# acceptor that hands every AMQP connection to a connection router (Artemis's "broker
# balancer"), and the router, whose pool is the target alone. The pool logs in to the target
# (over CORE) to see that it is up, every ROUTER_CHECK_MS; until then the router refuses
# connections ("not ready") rather than redirecting them.
ROUTER_CHECK_MS = 500
ROUTER_CONNECTOR = (
    "<connectors>\n"
    '         <connector name="redirect-target">tcp://{host}:{port}</connector>\n'
    "      </connectors>\n      <acceptors>"
)
ROUTER_ACCEPTOR = (
    '<acceptor name="redirecting">tcp://{host}:{port}?protocols=AMQP;router=redirect-all'
    "</acceptor>\n      </acceptors>\n"
    "      <connection-routers>\n"
    '         <connection-router name="redirect-all">\n'
    '            <policy name="FIRST_ELEMENT"/>\n'
    "            <pool>\n"
    "               <username>{user}</username>\n"
    "               <password>{password}</password>\n"
    f"               <check-period>{ROUTER_CHECK_MS}</check-period>\n"
    "               <static-connectors>\n"
    "                  <connector-ref>redirect-target</connector-ref>\n"
    "               </static-connectors>\n"
    "            </pool>\n"
    "         </connection-router>\n"
    "      </connection-routers>"
)


class RedirectingArtemis(Artemis):
    """An Artemis that redirects every AMQP client of its ``redirect_url`` to ``target``
    (``amqp:connection:redirect``, network-host and port of the target's acceptor); its
    ordinary acceptor (``url``) serves as any Artemis does."""

    name = "artemis-redirecting"

    def __init__(self, workdir: Path, target: Broker) -> None:
        self.target = target
        self.redirect_port = free_port()
        super().__init__(workdir, target.user or "admin", target.password or "admin")

    @property
    def redirect_url(self) -> str:
        """The acceptor that redirects, without credentials."""
        return f"amqp://{self.host}:{self.redirect_port}"

    def _create_instance(self) -> None:
        super()._create_instance()
        broker_xml = self.instance / "etc" / "broker.xml"
        text = broker_xml.read_text()
        text = text.replace(
            "<acceptors>",
            ROUTER_CONNECTOR.format(host=self.target.host, port=self.target.port),
            1,
        )
        text = text.replace(
            "</acceptors>",
            ROUTER_ACCEPTOR.format(
                host=LOOPBACK, port=self.redirect_port, user=self.user, password=self.password
            ),
            1,
        )
        broker_xml.write_text(text)

    def _ready(self) -> bool:
        """Up, and its router redirects: the pool has seen the target."""
        return super()._ready() and redirects(self.redirect_url)


def redirects(url: str) -> bool:
    """Whether a broker at ``url`` closes a new connection with a redirect (rather than
    serving it, refusing it otherwise, or not answering)."""
    try:
        conn = BlockingConnection(url, timeout=PROBE_TIMEOUT)
        conn.wait(lambda: False, timeout=PROBE_TIMEOUT)  # its close raises ConnectionClosed
    except ConnectionClosed as closed:  # proton frees the condition: only its text is left
        return "amqp:connection:redirect" in str(closed)
    except Exception:  # proton raises several unrelated types for "not yet"
        return False
    return False
