"""What a broker adapter is, and the cross-check that compares the broker's view with ours.

An adapter asks one kind of broker for its client connections and returns them as
``BrokerConnection``s; everything after that (matching them to channels, marking what is
missing on either side) is broker-neutral and lives here. A new broker needs only a new
adapter with a ``list_connections`` method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

from proton import Message, symbol
from proton.utils import BlockingConnection, BlockingReceiver

from connector.control.protocol import ChannelEntry

# The open-frame property keys the connector puts on each upstream connection.
GUEST_PROPERTY = "qpid-virtio.guest"
PORT_PROPERTY = "qpid-virtio.port"
CHANNEL_PROPERTY = "qpid-virtio.channel"
UUID_PROPERTY = "qpid-virtio.uuid"

# A management reply normally comes back in milliseconds; past this the broker is wedged or
# the address does not exist, and the operator should hear that rather than wait.
BROKER_TIMEOUT = 10.0


class BrokerError(Exception):
    """The broker could not be asked, or refused; the message is the line to print."""


@dataclass(frozen=True)
class BrokerConnection:
    """One client connection as the broker lists it."""

    container_id: str | None
    remote_address: str | None  # the client's host:port, as the broker saw it
    properties: Mapping[str, Any] = field(default_factory=dict)  # open-frame properties

    @property
    def guest(self) -> str | None:
        """The guest this connection claims to carry, when the broker shows properties."""
        value = self.properties.get(GUEST_PROPERTY)
        return str(value) if value is not None else None


class BrokerAdapter(Protocol):
    """Lists a broker's client connections over a management conversation."""

    name: str
    # True when the broker shows each connection's open-frame properties, so a connection
    # claiming a guest identity can be recognised; False when only container-id and
    # address are known.
    shows_properties: bool

    def list_connections(self, conversation: Conversation) -> list[BrokerConnection]:
        """Ask the broker for its connections; raises BrokerError."""
        ...


def decode_strings(value: Any) -> Any:
    """Binary and symbol values as str, recursively: QMF sends most strings as binary,
    which proton 0.40 hands over as memoryview (older releases: bytes)."""
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).hex()
    if isinstance(value, symbol):
        return str(value)
    if isinstance(value, Mapping):
        return {decode_strings(k): decode_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [decode_strings(v) for v in value]
    return value


class Conversation:
    """A management conversation with a broker: a connection and a dynamic reply queue."""

    def __init__(
        self,
        url: str,
        user: str | None = None,
        password: str | None = None,
        timeout: float = BROKER_TIMEOUT,
    ) -> None:
        self.url = url
        self.timeout = timeout
        try:
            # reconnect=False: a refused connection is an answer, not something to retry.
            self._conn = BlockingConnection(
                url, timeout=timeout, reconnect=False, user=user, password=password
            )
            self._replies: BlockingReceiver = self._conn.create_receiver(None, dynamic=True)
        except Exception as exc:
            raise BrokerError(f"cannot open a management connection to {url}: {exc}") from exc
        self.reply_to: str = self._replies.link.remote_source.address

    @property
    def broker_properties(self) -> dict[str, Any]:
        """The broker's own open-frame properties (its product name, version...)."""
        return decode_strings(dict(self._conn.conn.remote_properties or {}))

    def call(
        self, address: str, request: Message, more: Callable[[Message], bool] = lambda _: False
    ) -> list[Message]:
        """Send ``request`` to ``address`` and collect replies while ``more(reply)`` says so."""
        request.address = address
        request.reply_to = self.reply_to
        try:
            sender = self._conn.create_sender(address)
            sender.send(request, timeout=self.timeout)
            sender.close()
            replies = []
            while True:
                reply = self._replies.receive(timeout=self.timeout)
                self._replies.accept()
                replies.append(reply)
                if not more(reply):
                    return replies
        except Exception as exc:
            raise BrokerError(
                f"{self.url}: management request to {address!r} failed: {exc}"
            ) from exc

    def close(self) -> None:
        """Close the connection; errors on the way out do not matter any more."""
        with contextlib.suppress(Exception):
            self._conn.close()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Unlisted(TypedDict):
    """A connected channel the broker does not list."""

    guest: str
    port: str
    path: str
    container_id: str | None


class Unknown(TypedDict):
    """A broker connection claiming a guest identity the connector does not have."""

    guest: str | None
    port: str | None
    channel: str | None
    container_id: str | None
    remote_address: str | None


class CheckResult(TypedDict):
    """The outcome of --broker-check; printed as-is under "broker_check" with --json."""

    broker: str
    adapter: str
    shows_properties: bool
    matched: list[str]  # channel paths the broker lists
    missing_on_broker: list[Unlisted]
    unknown_to_connector: list[Unknown]


def cross_check(
    channels: Sequence[ChannelEntry],
    connections: Sequence[BrokerConnection],
    broker: str,
    adapter: BrokerAdapter,
) -> CheckResult:
    """Match connected channels to the broker's connections, and list what is left over.

    A connection matches a channel by, in order of certainty: the upstream socket's
    address (the broker sees the connector's local address as the peer), the identity
    properties (guest and channel path), then container-id when the broker shows no
    properties.
    """
    unclaimed = list(connections)
    matched: list[str] = []
    missing: list[Unlisted] = []
    for entry in channels:
        if entry["state"] != "connected":
            continue
        found = _find(entry, unclaimed, adapter.shows_properties)
        if found is None:
            missing.append(
                {
                    "guest": entry["guest"],
                    "port": entry["port"],
                    "path": entry["path"],
                    "container_id": entry["detail"]["upstream"]["container_id"],
                }
            )
        else:
            unclaimed.remove(found)
            matched.append(entry["path"])
    unknown: list[Unknown] = [
        {
            "guest": conn.guest,
            "port": _str_or_none(conn.properties.get(PORT_PROPERTY)),
            "channel": _str_or_none(conn.properties.get(CHANNEL_PROPERTY)),
            "container_id": conn.container_id,
            "remote_address": conn.remote_address,
        }
        for conn in unclaimed
        if conn.guest is not None
    ]
    return {
        "broker": broker,
        "adapter": adapter.name,
        "shows_properties": adapter.shows_properties,
        "matched": matched,
        "missing_on_broker": missing,
        "unknown_to_connector": unknown,
    }


def _find(
    entry: ChannelEntry, connections: Sequence[BrokerConnection], shows_properties: bool
) -> BrokerConnection | None:
    upstream = entry["detail"]["upstream"]
    local = upstream.get("local_address")
    for conn in connections:
        if local and conn.remote_address == local:
            return conn
    for conn in connections:
        channel = conn.properties.get(CHANNEL_PROPERTY)
        if conn.guest == entry["guest"] and channel in (None, entry["path"]):
            return conn
    if not shows_properties and upstream["container_id"]:
        for conn in connections:
            if conn.container_id == upstream["container_id"]:
                return conn
    return None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
