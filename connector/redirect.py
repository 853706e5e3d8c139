"""A broker's ``amqp:connection:redirect``, read and checked for a guest that cannot follow it.

A guest has only its serial port: a redirect passed to it names a host it has no way to
reach. So the connector follows the redirect itself while the guest's open is unanswered
(``Channel``), and otherwise turns it into ``amqp:connection:forced``. This module reads
the close's info map (AMQP 1.0 §2.8.15, connection-error ``redirect``: ``hostname``,
``network-host``, ``port``) into a target, and refuses one that cannot be used as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .upstream import BrokerURL

REDIRECT = "amqp:connection:redirect"

# Redirects followed for one guest connection before the guest is refused. A balancer
# (Artemis's connection routers) sends a client once to the broker that serves it; a chain
# of a front balancer, a regional one and the broker is two. Past that it is most likely two
# brokers sending each other the same client, which would otherwise cost both of them a TCP
# connect and a login, forever, for every guest that opens.
MAX_REDIRECTS = 3

# The open property by which a broker says that its close follows at once: the open is only
# there because a close must follow one (Artemis sets it on every redirect and refusal).
# The guest's open is not answered with such an open, so that a redirect can still be
# followed without the guest seeing anything.
ESTABLISHMENT_FAILED = "amqp:connection-establishment-failed"

# Longest DNS name (RFC 1035); anything longer in network-host is not a host.
_MAX_HOST = 253


class BadRedirect(ValueError):
    """The redirect's info does not name a target we may connect to; the text says why."""


@dataclass(frozen=True)
class Redirect:
    """Where a broker sent the connection: the host and port to connect to, and the
    hostname its open frame must carry, when the broker gave one."""

    network_host: str
    port: int
    hostname: str | None = None

    def url(self, origin: BrokerURL) -> BrokerURL:
        """The target as a broker URL: ``origin``'s scheme and credentials, so that TLS and
        the login stay what the operator configured for the broker that redirected."""
        return dataclasses.replace(origin, host=self.network_host, port=self.port)


def read_redirect(info: dict[Any, Any], scheme: str) -> Redirect:
    """The target of a redirect whose close carried ``info``, for a connection made with
    ``scheme``; BadRedirect when it has no usable network-host and port, or asks for
    another scheme (some brokers add a ``scheme`` key, as Qpid JMS reads it): a redirect from
    amqps to amqp would send the password in clear, and one to ``ws`` is not AMQP over TCP."""
    asked = info.get("scheme")
    if asked is not None and str(asked).lower() != scheme:
        raise BadRedirect(f"to scheme {str(asked)!r}, not {scheme}: not followed")
    host = _host(info.get("network-host"))
    port = _port(info.get("port"))
    hostname = info.get("hostname")
    if hostname is not None and (not isinstance(hostname, str) or not hostname.isprintable()):
        raise BadRedirect(f"hostname {hostname!r} is not a host name")
    return Redirect(host, port, hostname or None)


def _host(value: Any) -> str:
    if value is None:
        raise BadRedirect("no network-host")
    if not isinstance(value, str):
        raise BadRedirect(f"network-host {value!r} is not text")
    host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    bad = not host or len(host) > _MAX_HOST or not host.isascii() or not host.isprintable()
    if bad or any(c in host for c in " /@?#"):  # empty, control characters, a URL, a path
        raise BadRedirect(f"network-host {value!r} is not a host")
    return host


def _port(value: Any) -> int:
    if value is None:
        raise BadRedirect("no port")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise BadRedirect(f"port {value!r} is not a port number")
    return int(value)
