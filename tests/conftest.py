"""Session-wide real brokers, each started on first use and stopped at the end of the session;
and the use-after-free watch that every test runs the routing core under.

A test asks for `artemis`, `rabbitmq` or `redirecting` (an Artemis connection router in front
of `artemis`, started per module); the broker starts the first time one does (Artemis about
2 s, RabbitMQ about 6 s) and serves the rest of the session. A test that stops or kills a broker
must start it again before it ends (`try: ... finally: broker.start()`), since later tests share it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.brokers import Artemis, Broker, RabbitMQ
from tests.brokers.artemis import RedirectingArtemis
from tests.support import freed


@pytest.fixture(autouse=True)
def _freed_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run whatever the test runs of the routing core in this process under ``FreedWatch``
    (tests/support/freed.py): a call on a session or link the core has freed, or on a
    delivery it has settled, fails the test where it happens. Proton does not report such a
    use after free; it reads whatever the memory holds by then, which a test would rarely
    see fail. (The daemons the tests start run under it too: tests/support/connector.py.)"""
    freed.install(monkeypatch.setattr)


def _serve(broker: Broker) -> Iterator[Broker]:
    """Start `broker`, hand it to the session, and stop it (and its helpers) however we leave."""
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def artemis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Artemis]:
    """A running Artemis 2.40 on a free loopback port (tests.brokers.Artemis)."""
    yield from _serve(Artemis(tmp_path_factory.mktemp("artemis")))


@pytest.fixture(scope="module")
def redirecting(artemis: Artemis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Artemis]:
    """A second Artemis whose connection router sends every AMQP client to ``artemis``
    (``RedirectingArtemis.redirect_url``); about 11 s to start. One per test module, not
    per session: once ``artemis`` has been killed and restarted (tests/reliability does),
    the router's view of its target is not to be trusted."""
    yield from _serve(RedirectingArtemis(tmp_path_factory.mktemp("redirecting-artemis"), artemis))


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    """A running RabbitMQ 3.10 node with the AMQP 1.0 plugin (tests.brokers.RabbitMQ)."""
    yield from _serve(RabbitMQ(tmp_path_factory.mktemp("rabbitmq")))
