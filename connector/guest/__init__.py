"""Guest-side helper: reach the host's broker through a virtio-serial port.

Runs inside a guest that has nothing but Python 3 and proton (Debian's 0.37 or newer), so
this subpackage imports nothing else from the project. Pieces:

* :mod:`.port`   find a port by name, open it, drain the stale bytes qemu holds for it;
* :mod:`.driver` run a proton connection over any fd for a standard ``MessagingHandler``;
* :mod:`.client` a small blocking client (send, receive, request) for scripts and tests;
* :mod:`.bridge` relay unmodified TCP clients to ports (``python3 -m connector.guest bridge``);
* :mod:`.peer`   an in-memory AMQP peer that tests put at the far end of a channel.
"""

from .client import (
    AmqpError,
    Disconnected,
    GuestClient,
    GuestClientError,
    GuestTimeout,
    LinkRefused,
    Outcome,
)
from .driver import Driver
from .port import PortNotFound, drain, find_port, open_port

__all__ = [
    "AmqpError",
    "Disconnected",
    "Driver",
    "GuestClient",
    "GuestClientError",
    "GuestTimeout",
    "LinkRefused",
    "Outcome",
    "PortNotFound",
    "drain",
    "find_port",
    "open_port",
]
