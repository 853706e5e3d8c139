"""The broker side: URLs with failover, SASL and TLS settings, and the socket to the broker.

Each guest connection gets its own upstream connection (so each guest is its own peer on
the broker). This module builds the proton client engine for it, the TLS session for an
amqps URL (``tls.py``: TLS is ours, not proton's, so the engine sees plaintext frames), and
opens the TCP socket without blocking; the channel drives all three.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from cproton_ffi import lib

from .errors import ConfigError
from .routing.engine import Engine
from .tls import OutputSource, TLSSession, ssl_reason

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}

# How long we give the broker to answer our close before dropping the socket. RabbitMQ
# keeps the TCP connection open after the AMQP close exchange, and a broker that has
# gone silent must not hold a channel hostage.
CLOSE_TIMEOUT_S = 5.0

# How long a TCP connect plus AMQP open may take before the guest is told to retry.
CONNECT_TIMEOUT_S = 10.0

# How long the connect to one of a broker name's addresses may go unanswered before the
# next address is tried, when there is one. An address that drops the connect without a
# word (a filtered port, a down interface) would otherwise hold it for all of
# CONNECT_TIMEOUT_S; RFC 8305 moves on after 250 ms, but in turn rather than in parallel,
# 2 s leaves a busy broker time to answer.
ADDRESS_TIMEOUT_S = 2.0

# Our idle timeout towards the broker, by default: the broker is presumed dead after this
# much silence (proton heartbeats at half the broker's own). A minute rides out a broker's
# garbage-collection pause; `[broker] idle_timeout_s` sets it.
UPSTREAM_IDLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BrokerURL:
    """One broker address: ``amqp[s]://[user[:password]@]host[:port]``."""

    scheme: str
    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str, where: str = "broker.urls") -> BrokerURL:
        """Parse and check a URL; ConfigError names ``where`` when it is wrong."""
        if "://" not in text:
            text = "amqp://" + text
        parts = urlsplit(text)
        shown = _without_password(text, parts)  # errors reach the log and stderr
        if parts.scheme not in DEFAULT_PORTS:
            raise ConfigError(where, f"{shown!r}: scheme must be amqp or amqps")
        if not parts.hostname:
            raise ConfigError(where, f"{shown!r}: no host")
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError as err:
            raise ConfigError(where, f"{shown!r}: bad port") from err
        if parts.path not in ("", "/"):
            raise ConfigError(where, f"{shown!r}: a broker URL has no path")
        return cls(
            parts.scheme,
            parts.hostname,
            port,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        """The URL without credentials, for logs and status output."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _without_password(text: str, parts: SplitResult) -> str:
    """``text`` with the password in its user info masked, to be shown in an error."""
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


@dataclass(frozen=True)
class TLSSettings:
    """amqps options: whom to trust, and our certificate if the broker asks for one."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_hostname: bool = True


@dataclass(frozen=True)
class UpstreamSettings:
    """How to reach the broker."""

    urls: tuple[BrokerURL, ...]
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    sasl_mechanisms: str | None = None  # None: PLAIN with a password, else ANONYMOUS
    tls: TLSSettings = TLSSettings()
    hostname: str | None = None  # the open frame's hostname (a virtual host); default: URL's
    idle_timeout_s: float = UPSTREAM_IDLE_TIMEOUT_S  # 0: the broker is never presumed dead


class BrokerPool:
    """The failover list, shared by every channel.

    All guests use the current URL; when a connection to it fails, the next guest
    connection tries the next one. A broker outage is the same for every guest, so the
    position is shared rather than per channel. A pool never changes its settings: a
    reload that changes ``[broker]`` puts a new pool in its place (``broker_reload.py``),
    and an upstream made from this one reports its failure here, not to its successor.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        """Raises ConfigError when a TLS file cannot be used (not PEM, key not matching)."""
        self.settings = settings
        self._index = 0
        # Loading the trust store and our key is done once, not per guest connection.
        amqps = any(url.scheme == "amqps" for url in settings.urls)
        self._tls_context = tls_context(settings.tls) if amqps else None

    @property
    def current(self) -> BrokerURL:
        """The URL the next upstream connection goes to."""
        return self.settings.urls[self._index]

    def failed(self, url: BrokerURL) -> None:
        """A connection to ``url`` failed: move on, unless another channel already did."""
        if url == self.current and len(self.settings.urls) > 1:
            self._index = (self._index + 1) % len(self.settings.urls)

    def take_position(self, old: BrokerPool) -> None:
        """Start at ``old``'s current URL when a reload keeps the same brokers in the same
        order (a new password, say): a failover that already moved off a dead broker is
        not undone. A changed list is the operator's new order, tried from its first URL.
        Credentials inside the URLs do not count: they do not change where a broker is."""
        if [str(u) for u in old.settings.urls] == [str(u) for u in self.settings.urls]:
            self._index = old._index

    def make_engine(self, url: BrokerURL, hostname: str | None = None) -> Engine:
        """A proton client engine configured for ``url``: SASL, hostname (``hostname``, a
        redirect's, over the configured one), heartbeats."""
        s = self.settings
        user = url.user or s.user
        password = url.password or s.password
        hostname = hostname or s.hostname or url.host
        engine = Engine(server=False, user=user, password=password, hostname=hostname)
        mechs = s.sasl_mechanisms or ("PLAIN" if password else "ANONYMOUS")
        # Proton's SASL client refuses PLAIN on a transport it does not see encrypted, and
        # it never sees our TLS (tls.py); plain amqp has always allowed PLAIN too.
        engine.configure_sasl(mechs, allow_insecure=True)
        lib.pn_transport_set_idle_timeout(engine.transport, int(s.idle_timeout_s * 1000))
        return engine

    def tls_session(self, url: BrokerURL, plaintext: OutputSource) -> TLSSession | None:
        """The TLS session between ``plaintext`` (the upstream engine) and the socket to
        ``url``, or None for plain amqp."""
        if url.scheme != "amqps" or self._tls_context is None:
            return None
        return TLSSession(self._tls_context, url.host, plaintext)


def tls_context(tls: TLSSettings) -> ssl.SSLContext:
    """The client context for every amqps connection: the broker's certificate verified
    against ``ca_file`` (else the system's trust store), its host name checked unless
    ``verify_hostname`` is false, our certificate offered if one is set.

    Raises ConfigError naming the key whose file cannot be used.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    except OSError as err:  # ssl.SSLError included
        raise ConfigError("broker.tls.ca_file", f"{tls.ca_file}: {ssl_reason(err)}") from err
    context.check_hostname = tls.verify_hostname
    if tls.cert_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except OSError as err:
            files = f"{tls.cert_file} and {tls.key_file}" if tls.key_file else tls.cert_file
            why = f"{files}: not a usable PEM certificate and key: {ssl_reason(err)}"
            raise ConfigError("broker.tls.cert_file", why) from err
    return context


# One way to reach the broker: (family, type, protocol, socket address), as getaddrinfo
# gives them.
Address = tuple[int, int, int, Any]


def broker_addresses(url: BrokerURL) -> list[Address]:
    """Every address of the broker's host, in the resolver's order of preference.

    A name can have several, and the first need not work: ``localhost`` resolves to ``::1``
    first on many hosts while a broker may listen on 127.0.0.1 only. So a connect tries
    them in turn (``open_socket``, and again when a started connect fails). It blocks for
    as long as the resolver takes: a channel calls it off the loop for a host name
    (``resolver.py``), and on the loop only for an address.
    """
    infos = socket.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
    return [(family, stype, proto, addr) for family, stype, proto, _, addr in infos]


def open_socket(url: BrokerURL, addresses: list[Address]) -> socket.socket:
    """Start a non-blocking TCP connect to the first of ``addresses`` that takes one,
    removing each address tried; the socket becomes writable when the connect completes.
    Raises the last address's error when none takes one."""
    error = OSError(errno.EADDRNOTAVAIL, f"connect to {url}: no address")
    while addresses:
        family, stype, proto, addr = addresses.pop(0)
        try:  # a host without IPv6 refuses even the socket
            sock = socket.socket(family, stype | socket.SOCK_CLOEXEC, proto)
        except OSError as err:
            error = err
            continue
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(addr)
        if code in (0, errno.EINPROGRESS):
            return sock
        sock.close()
        error = OSError(code, f"connect to {url}: {errno.errorcode.get(code, code)}")
    raise error
