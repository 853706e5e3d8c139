"""Who a channel belongs to, as the host sees it.

A guest's identity is asserted by the host (config, qemu's command line, libvirt's status
XML, the socket's directory), never by anything the guest sends. The upstream connection
carries it to the broker in its open-frame properties.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_PORT = "org.qpid.amqp.0"


class ChannelKind(enum.Enum):
    """How the host side of a virtio-serial port is reached."""

    UNIX = "unix"  # qemu listens (server=on); the connector connects
    UNIX_LISTEN = "unix-listen"  # the connector listens; qemu connects (server=off)
    PTY = "pty"  # qemu holds the pty master; the connector opens /dev/pts/N


@dataclass(frozen=True)
class GuestIdentity:
    """A guest as the host knows it: name, port, and where that knowledge came from."""

    name: str
    port: str = DEFAULT_PORT
    uuid: str | None = None
    pid: int | None = None
    found_by: str = "config"  # config | libvirt | cmdline | watch

    def open_properties(self, channel_path: str) -> dict[str, str]:
        """The upstream open-frame properties that tell the broker who this peer is."""
        props = {
            "qpid-virtio.guest": self.name,
            "qpid-virtio.port": self.port,
            "qpid-virtio.channel": channel_path,
        }
        if self.uuid:
            props["qpid-virtio.uuid"] = self.uuid
        return props


@dataclass(frozen=True)
class ChannelSpec:
    """One channel to serve: its kind, its host path, and whose it is.

    Channels are keyed by ``path``: one host path is one virtio-serial port.
    """

    kind: ChannelKind
    path: str
    identity: GuestIdentity
