"""The control protocol: the one definition of what the daemon reports and how it is asked.

Everything that crosses the control socket, everything ``qpid-virtio-status --json`` prints
and every Prometheus metric is derived from one *snapshot* whose shape is defined here. The
daemon builds a snapshot (``StateSource.snapshot()``); the server, the metrics endpoint and
the status tool only read it through the functions below, so a key is named in one place.

Wire format: newline-delimited JSON over a unix stream socket, one request per line, one
reply per line. A request is ``{"command": NAME, ...}``; a reply is ``{"ok": true,
"version": PROTOCOL_VERSION, ...}`` or ``{"ok": false, "version": PROTOCOL_VERSION,
"error": TEXT}``. ``docs/status.md`` documents the same shapes for script writers.
"""

from __future__ import annotations

import os
from typing import Any, Literal, NotRequired, Protocol, TypedDict

# Bumped whenever a reply loses a key or a key changes meaning; adding a key does not bump
# it. Clients refuse a connector whose version is lower than the one they need.
PROTOCOL_VERSION = 1

# Longest request line the server reads. Requests are a few dozen bytes; the cap stops a
# confused client (or `cat /dev/zero | socat`) from growing the daemon's memory.
MAX_REQUEST_BYTES = 64 * 1024

# Longest path a unix socket can have: sockaddr_un's sun_path is 108 bytes on Linux, the
# terminating NUL included. A longer path can be neither bound nor connected to, and Python
# says so with an OSError that has no errno or strerror, so both ends check it themselves.
MAX_SOCKET_PATH_BYTES = 107

# How many recent errors a channel keeps for `qpid-virtio-status guest`: enough to see a
# pattern, small enough that a flapping guest cannot grow the snapshot without bound.
MAX_RECENT_ERRORS = 20

COMMANDS = ("channels", "guest", "links", "snapshot")

ChannelState = Literal["waiting", "connected", "error", "gone"]
CHANNEL_STATES: tuple[ChannelState, ...] = ("waiting", "connected", "error", "gone")

UpstreamState = Literal["idle", "connecting", "open", "closing", "failed"]
UPSTREAM_STATES: tuple[UpstreamState, ...] = ("idle", "connecting", "open", "closing", "failed")

# The issue-2 channel row: `qpid-virtio-status --json` prints exactly these keys, in this
# order. Scripts depend on them: never remove or rename one.
ROW_KEYS: tuple[str, ...] = (
    "guest",
    "port",
    "kind",
    "path",
    "state",
    "since",
    "upstream",
    "sessions",
    "links",
    "deliveries_in",
    "deliveries_out",
    "bytes_in",
    "bytes_out",
    "discarded_bytes",
    "last_error",
)


class ChannelRow(TypedDict):
    """One channel as `qpid-virtio-status --json` prints it. "in" = guest towards broker."""

    guest: str
    port: str
    kind: str  # a connector.identity.ChannelKind value
    path: str
    state: ChannelState
    since: float  # unix time of the last state change
    upstream: str | None  # broker URL of the open upstream connection
    sessions: int  # open now
    links: int  # attached now
    deliveries_in: int  # over the channel's whole life, like an interface counter
    deliveries_out: int
    bytes_in: int
    bytes_out: int
    discarded_bytes: int  # bytes dropped while waiting for a protocol header
    last_error: str | None


class Identity(TypedDict):
    """Who the host says the guest is, and how it found out."""

    name: str
    uuid: str | None
    pid: int | None  # qemu's pid
    found_by: str  # config | libvirt | cmdline | watch


class Upstream(TypedDict):
    """The channel's current (or last) broker connection."""

    url: str | None
    container_id: str | None  # the guest's container-id, passed through
    state: UpstreamState
    # host:port of the upstream socket's own end: the broker lists it as the peer address,
    # which lets --broker-check match connections on brokers that hide open properties.
    local_address: NotRequired[str | None]


class Session(TypedDict):
    """An open session, numbered 0, 1, 2... in the order the connector first saw a link on
    it (sessions without links last), not by the guest's own channel numbers."""

    channel: int
    links: int


class Link(TypedDict):
    """A routed link. direction "in" = guest sends to the broker; "out" = guest receives."""

    session: int
    name: str
    direction: Literal["in", "out"]
    address: str | None  # target for "in", source for "out"; None for anonymous relay
    credit: int
    unsettled: int
    deliveries: int
    bytes: int


class ErrorEntry(TypedDict):
    """One recent error: when, the AMQP condition (or a connector one), and its text."""

    time: float
    condition: str
    description: str | None


class ChannelDetail(TypedDict):
    """What `guest NAME`, `links` and the metrics need beyond the row."""

    identity: Identity
    upstream: Upstream
    sessions: list[Session]
    links: list[Link]
    errors: list[ErrorEntry]  # newest last, at most MAX_RECENT_ERRORS
    errors_by_condition: dict[str, int]  # over the channel's whole life
    upstream_reconnects: int  # upstream connections opened after the first
    guest_connections: int  # guest AMQP connections accepted over the channel's life


class ChannelEntry(ChannelRow):
    """A channel in the snapshot: the row keys plus ``detail``."""

    detail: ChannelDetail


class ConnectorInfo(TypedDict):
    """The daemon itself."""

    pid: int
    started: float  # unix time
    version: str
    upstream_urls: list[str]  # the configured broker URLs, failover order


class Snapshot(TypedDict):
    """The whole state the daemon reports, JSON-ready."""

    version: int
    connector: ConnectorInfo
    channels: list[ChannelEntry]
    discovery: dict[str, int]  # event name (appeared, gone, ...) -> count


class GuestView(TypedDict):
    """One guest: its identity and all its channels (one per virtio-serial port)."""

    name: str
    uuid: str | None
    pid: int | None
    found_by: str
    channels: list[ChannelEntry]


class LinkView(Link):
    """A link with the channel it is routed over, for `qpid-virtio-status links`."""

    guest: str
    port: str
    path: str


class StateSource(Protocol):
    """What the daemon gives the control server and the metrics endpoint."""

    def snapshot(self) -> Snapshot | dict[str, Any]:
        """The whole current state, in the shape of ``Snapshot``."""
        ...


def socket_path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a unix socket, or None when it can.

    The daemon (binding) and qpid-virtio-status (connecting) both ask, so an operator who
    put the control socket deep in a tree reads the same reason from either.
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        return (
            f"the path is too long for a unix socket ({size} bytes; "
            f"at most {MAX_SOCKET_PATH_BYTES})"
        )
    return None


def socket_error_text(path: str, exc: OSError) -> str:
    """The reason an OSError about the unix socket at ``path`` gives a person.

    Never "None": an OSError raised by Python itself rather than the kernel has no
    strerror, and the path's own problem (or the exception's text) says more.
    """
    return exc.strerror or socket_path_problem(path) or str(exc)


def channel_row(entry: ChannelEntry | dict[str, Any]) -> ChannelRow:
    """The issue-2 row of one channel: exactly ROW_KEYS, in order."""
    return {key: entry[key] for key in ROW_KEYS}  # type: ignore[return-value]


def channel_rows(snapshot: Snapshot | dict[str, Any]) -> list[ChannelRow]:
    """The rows `channels` returns, sorted by guest, then port, then path."""
    return [channel_row(entry) for entry in sorted_channels(snapshot)]


def sorted_channels(snapshot: Snapshot | dict[str, Any]) -> list[ChannelEntry]:
    """The snapshot's channels in the order every view shows them."""
    return sorted(snapshot["channels"], key=lambda c: (c["guest"], c["port"], c["path"]))


def guest_view(snapshot: Snapshot | dict[str, Any], name: str) -> GuestView | None:
    """Everything about one guest, or None when no channel belongs to it."""
    channels = [c for c in sorted_channels(snapshot) if c["guest"] == name]
    if not channels:
        return None
    # The identity is per channel because discovery finds channels; prefer the newest
    # channel that knows a uuid or pid, since a restarted qemu has a new pid.
    known = [c["detail"]["identity"] for c in channels]
    best = max(known, key=lambda i: (i["pid"] is not None, i["uuid"] is not None))
    return {
        "name": name,
        "uuid": best["uuid"],
        "pid": best["pid"],
        "found_by": best["found_by"],
        "channels": channels,
    }


def link_views(snapshot: Snapshot | dict[str, Any]) -> list[LinkView]:
    """Every routed link across guests, in channel order then session and name."""
    views: list[LinkView] = []
    for entry in sorted_channels(snapshot):
        for link in sorted(entry["detail"]["links"], key=lambda lk: (lk["session"], lk["name"])):
            views.append(
                {"guest": entry["guest"], "port": entry["port"], "path": entry["path"], **link}
            )
    return views


def ok_reply(**payload: Any) -> dict[str, Any]:
    """A successful reply carrying the protocol version."""
    return {"ok": True, "version": PROTOCOL_VERSION, **payload}


def error_reply(message: str) -> dict[str, Any]:
    """A failed reply; still carries the version so an old client can say why."""
    return {"ok": False, "version": PROTOCOL_VERSION, "error": message}


def answer(request: Any, snapshot: Snapshot | dict[str, Any]) -> dict[str, Any]:
    """The reply to one decoded request, given the current snapshot.

    Pure, so the server's dispatch is tested without a socket and every reply shape lives
    here beside the types it returns.
    """
    if not isinstance(request, dict):
        return error_reply("request must be a JSON object")
    command = request.get("command")
    if command == "channels":
        return ok_reply(channels=channel_rows(snapshot))
    if command == "guest":
        name = request.get("name")
        if not isinstance(name, str) or not name:
            return error_reply("guest: 'name' must be a non-empty string")
        view = guest_view(snapshot, name)
        if view is None:
            return error_reply(f"no guest named {name!r}")
        return ok_reply(guest=view)
    if command == "links":
        return ok_reply(links=link_views(snapshot))
    if command == "snapshot":
        return ok_reply(snapshot=snapshot)
    return error_reply(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
