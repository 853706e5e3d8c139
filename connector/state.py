"""Build the snapshot that the control socket, ``qpid-virtio-status`` and the metrics read.

This is the daemon's side of ``connector.control.protocol``: it reads channels and routers
and writes the documented shape, and nothing else reads the routing internals.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from cproton_ffi import ffi, lib

from . import __version__
from .channel import Channel
from .control.protocol import PROTOCOL_VERSION
from .routing.router import RouterState

_UPSTREAM_STATE = {
    RouterState.OPENING: "connecting",
    RouterState.OPEN: "open",
    RouterState.CLOSING: "closing",
}


def channel_entry(ch: Channel) -> dict[str, Any]:
    """One channel: the row keys plus ``detail``."""
    router = ch.router
    ident = ch.spec.identity
    sessions: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    container_id = None
    upstream_state = "idle"
    if router is not None:
        guest_conn = router.guest.connection
        container = lib.pn_connection_remote_container(guest_conn)
        if container != ffi.NULL:
            container_id = ffi.string(container).decode(errors="replace")
        upstream_state = "failed" if router.upstream_dead else _UPSTREAM_STATE[router.state]
        numbers: dict[Any, int] = {}
        for route in router.guest_routes():
            ssn = lib.pn_link_session(route.link)
            number = numbers.setdefault(ssn, len(numbers))
            links.append(
                {
                    "session": number,
                    "name": route.name,
                    "direction": route.direction,
                    "address": route.address,
                    # Proton nets a sender's credit of what it holds for want of credit,
                    # which can take it below zero; what the guest has granted cannot.
                    "credit": max(0, lib.pn_link_credit(route.link)),
                    "unsettled": lib.pn_link_unsettled(route.link),
                    "deliveries": route.deliveries + (route.peer.deliveries if route.peer else 0),
                    "bytes": route.bytes + (route.peer.bytes if route.peer else 0),
                }
            )
        session_total = router.session_count()
        sessions = [
            {"channel": n, "links": sum(1 for lk in links if lk["session"] == n)}
            for n in range(max(session_total, len(numbers)))
        ]
    c = ch.counters
    deliveries_in, deliveries_out = ch.routed_deliveries()
    return {
        "guest": ident.name,
        "port": ident.port,
        "kind": ch.spec.kind.value,
        "path": ch.spec.path,
        "state": ch.state.value,
        "since": ch.since,
        "upstream": ch.upstream_url,
        "sessions": len(sessions),
        "links": len(links),
        "deliveries_in": deliveries_in,
        "deliveries_out": deliveries_out,
        "bytes_in": c.bytes_in,
        "bytes_out": c.bytes_out,
        "discarded_bytes": c.discarded_bytes,
        "last_error": ch.last_error,
        "detail": {
            "identity": {
                "name": ident.name,
                "uuid": ident.uuid,
                "pid": ident.pid,
                "found_by": ident.found_by,
            },
            "upstream": {
                "url": ch.upstream_url,
                "container_id": container_id,
                "state": upstream_state,
                "local_address": ch.upstream_local_address,
            },
            "sessions": sessions,
            "links": links,
            "errors": list(ch.errors),
            "errors_by_condition": dict(ch.errors_by_condition),
            "upstream_reconnects": c.upstream_reconnects,
            "guest_connections": c.guest_connections,
        },
    }


def snapshot(
    channels: Iterable[Channel],
    *,
    started: float,
    upstream_urls: list[str],
    discovery: dict[str, int],
) -> dict[str, Any]:
    """The whole state, in ``connector.control.protocol.Snapshot``'s shape."""
    return {
        "version": PROTOCOL_VERSION,
        "connector": {
            "pid": os.getpid(),
            "started": started,
            "version": __version__,
            "upstream_urls": upstream_urls,
        },
        "channels": [channel_entry(ch) for ch in channels],
        "discovery": discovery,
    }
