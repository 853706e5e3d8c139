"""A route: one guest link paired with one upstream link, and the deliveries in flight.

Both links of a pair point at the same kind of object from their own side, so that the
per-message code can go from an event's link to the far link with one dict lookup.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from cproton_ffi import ffi, lib


class GuestViolation(Exception):
    """The guest broke a limit or the protocol: its connection (or only the link, when
    ``link_only``) ends with this condition."""

    def __init__(self, condition: str, description: str, *, link_only: bool = False) -> None:
        super().__init__(f"{condition}: {description}")
        self.condition = condition
        self.description = description
        self.link_only = link_only  # detach the offending link, keep the connection


class AttachRequest(NamedTuple):
    """What a guest asks for when it attaches a link, as the policy needs it."""

    address: str | None  # the target when the guest sends, the source when it receives
    sending: bool  # the guest sends on this link
    dynamic: bool
    coordinator: bool  # a transaction coordinator target


class LinkPolicy:
    """What a guest may do with its links, and how its addresses map to the broker's.

    This default allows everything and maps nothing; ``connector.policy`` supplies the
    configured one. The routing core only calls these methods.
    """

    # Whether messages on anonymous-relay links must be decoded to check their 'to'.
    checks_relay = False

    def check_attach(self, req: AttachRequest) -> tuple[str, str] | None:
        """None to route the attach, or (condition, description) to refuse it."""
        return None

    def check_relay(self, address: str | None) -> tuple[str, str] | None:
        """None to relay a message to ``address``, or (condition, description)."""
        return None

    def to_broker(self, address: str) -> str:
        """The broker's name for an address the guest uses."""
        return address

    def to_guest(self, address: str) -> str:
        """The guest's name for an address the broker uses."""
        return address


class Route:
    """One side of a routed link pair.

    ``inflight`` maps a delivery on this link to its twin on the peer link, for every
    delivery that is not yet settled on both sides. It is the only per-message state.
    """

    __slots__ = (
        "address",
        "bytes",
        "deliveries",
        "from_guest",
        "held",
        "inflight",
        "link",
        "max_message",
        "max_unsettled",
        "message_bytes",
        "name",
        "peer",
        "policed",
        "receiving",
        "relay",
        "relay_buffer",
    )

    def __init__(self, link: Any, *, from_guest: bool) -> None:
        self.link = link
        self.from_guest = from_guest  # True when this link is on the guest-side connection
        self.receiving = bool(lib.pn_link_is_receiver(link))
        self.name = ffi.string(lib.pn_link_name(link)).decode(errors="replace")
        self.peer: Route | None = None
        self.inflight: dict[Any, Any] = {}
        self.deliveries = 0  # completed transfers received on this link
        self.bytes = 0  # message bytes received on this link
        self.address: str | None = None  # the node: target of 'in' links, source of 'out'
        # Limits checked on the per-message path (0 = none); set for guest-side links only.
        # On a link to the guest, max_unsettled bounds what is held for it (credit.py).
        self.max_unsettled = 0
        # A guest's link: what it sends is admitted only with credit (``_admit``).
        self.policed = False
        self.held = False  # credit held back by max_unsettled: a settlement re-issues it
        self.max_message = 0
        self.message_bytes = 0  # bytes of the message being received, while it is partial
        # Set on a guest's anonymous-relay sender when each message's 'to' is checked: its
        # messages are collected whole (relay messages are small) and decoded.
        self.relay: LinkPolicy | None = None
        self.relay_buffer = bytearray()

    @property
    def direction(self) -> str:
        """``in`` for messages travelling guest -> broker, ``out`` for broker -> guest."""
        return "in" if self.receiving == self.from_guest else "out"
