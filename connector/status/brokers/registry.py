"""Which adapter speaks to which broker, and the one call the CLI makes for --broker-check."""

from __future__ import annotations

from collections.abc import Sequence

from connector.control.protocol import ChannelEntry
from connector.status.brokers.artemis import ArtemisAdapter
from connector.status.brokers.base import (
    BrokerAdapter,
    BrokerError,
    CheckResult,
    Conversation,
    cross_check,
)
from connector.status.brokers.qpidd import QpiddAdapter

# Adapters by name. A new broker: write its adapter module, add it here and to PRODUCTS.
ADAPTERS: dict[str, type[BrokerAdapter]] = {"qpidd": QpiddAdapter, "artemis": ArtemisAdapter}

# The `product` open-frame property each broker sends, for --broker-type auto.
PRODUCTS = {"qpid-cpp": "qpidd", "apache-activemq-artemis": "artemis"}


def detect(conversation: Conversation) -> BrokerAdapter:
    """The adapter for the broker at the other end, from its open-frame `product`."""
    product = conversation.broker_properties.get("product")
    name = PRODUCTS.get(str(product))
    if name is None:
        raise BrokerError(
            f"{conversation.url}: no adapter for broker product {product!r}; "
            f"give --broker-type ({', '.join(ADAPTERS)})"
        )
    return ADAPTERS[name]()


def check_broker(
    url: str,
    channels: Sequence[ChannelEntry],
    broker_type: str = "auto",
    user: str | None = None,
    password: str | None = None,
) -> CheckResult:
    """Ask the broker at ``url`` for its connections and cross-check them with ``channels``."""
    with Conversation(url, user=user, password=password) as conversation:
        adapter = detect(conversation) if broker_type == "auto" else ADAPTERS[broker_type]()
        connections = adapter.list_connections(conversation)
    # The check's own management connection is in the list; it claims no guest, so it can
    # only be left unmatched, and unmatched connections without a guest are not reported.
    return cross_check(channels, connections, url, adapter)
