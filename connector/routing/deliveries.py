"""The per-message path: a transfer in, the same transfer out, its disposition back.

This is the only code that runs once per message, so it is written for speed:
- proton's low-level C functions (``lib.pn_*``), not its Python classes, which cost about
  7x more here (docs/performance.md);
- message bytes are copied from the incoming delivery to the outgoing one through one
  reused buffer, never decoded; a large message streams through in buffer-sized pieces;
- the outgoing delivery reuses the incoming delivery's tag (a pn_bytes_t passed straight
  back to proton), so no tag is built or decoded in Python;
- the only bookkeeping is one dict entry per unsettled delivery on each side
  (``Route.inflight``), removed when the delivery settles.
Nothing here logs above debug.
"""

from __future__ import annotations

from typing import Any

from cproton_ffi import ffi, lib

from . import credit, sections
from .engine import copy_condition, copy_data, read_condition, set_condition
from .route import GuestViolation, Route

# The copy buffer for message bytes. Large enough that a 1 KiB message takes one call each
# way; a multi-megabyte message streams through it a chunk at a time.
COPY_CHUNK = 64 * 1024

_copy = bytearray(COPY_CHUNK)
_copy_ptr = ffi.from_buffer(_copy)

_ACCEPTED = lib.PN_ACCEPTED
_recv = lib.pn_link_recv
_send = lib.pn_link_send
_aborted = lib.pn_delivery_aborted
_partial = lib.pn_delivery_partial
_advance = lib.pn_link_advance
_current = lib.pn_link_current
_remote_state = lib.pn_delivery_remote_state
_local_state = lib.pn_delivery_local_state
_update = lib.pn_delivery_update
_settled = lib.pn_delivery_settled


def on_delivery(route: Route, dlv: Any) -> tuple[int, int]:
    """Handle a PN_DELIVERY event for ``dlv`` on ``route``'s link.

    Returns (deliveries completed, bytes forwarded) for the caller's counters.
    """
    twin = route.inflight.get(dlv)
    if route.receiving and _current(route.link) == dlv:
        return _forward(route, dlv, twin)
    if twin is not None:
        mirror_disposition(route, dlv, twin)
    return 0, 0


def _forward(route: Route, dlv: Any, twin: Any) -> tuple[int, int]:
    """Copy a transfer's bytes to the peer link; advance both when the message is complete."""
    if route.relay is not None:
        return _forward_relayed(route, dlv)
    link = route.link
    out_link = route.peer.link
    if twin is None:
        if route.policed:
            _admit(route)
        twin = _open_twin(route, dlv)
    moved = 0
    while True:
        n = _recv(link, _copy_ptr, COPY_CHUNK)
        if n <= 0:
            break
        _send(out_link, _copy_ptr, n)
        moved += n
        if n < COPY_CHUNK:
            break  # a short read took all that has arrived
    route.bytes += moved
    if route.max_message:
        route.message_bytes += moved
        if route.message_bytes > route.max_message:
            lib.pn_delivery_abort(twin)
            _forget(route, dlv, twin)
            raise _oversize(route)
    if _aborted(dlv):
        route.message_bytes = 0
        lib.pn_delivery_abort(twin)
        _forget(route, dlv, twin)
        lib.pn_delivery_settle(dlv)
        return 0, moved
    if _partial(dlv):
        return 0, moved
    route.message_bytes = 0
    # Complete: both links advance together, which keeps their credit in step.
    _advance(link)
    _advance(out_link)
    route.deliveries += 1
    _settle_if_presettled(route, dlv, twin)
    return 1, moved


def _admit(route: Route) -> None:
    """A guest's new delivery: it may only come with credit (proton does not check) and
    only so many may be unsettled (``max_unsettled_per_link``; 0: no limit)."""
    if _overdrawn(route.link):
        raise no_credit(route.name)
    if route.max_unsettled and len(route.inflight) >= route.max_unsettled:
        raise GuestViolation(
            "amqp:resource-limit-exceeded",
            f"more than {route.max_unsettled} unsettled deliveries on {route.name}",
        )


def _overdrawn(link: Any) -> bool:
    """Whether a receiving link's current delivery came without credit (proton does not
    check): its credit less what it has queued is below nothing."""
    return lib.pn_link_credit(link) - lib.pn_link_queued(link) < 0


def no_credit(name: str) -> GuestViolation:
    """What a guest that sent on link ``name`` without credit is told; it ends its
    connection."""
    return GuestViolation("amqp:link:transfer-limit-exceeded", f"transfer without credit on {name}")


def _oversize(route: Route) -> GuestViolation:
    """A message over the guest's size limit costs it that link, not its connection."""
    return GuestViolation(
        "amqp:link:message-size-exceeded",
        f"a message on {route.name} is over {route.max_message} bytes",
        link_only=True,
    )


def _open_twin(route: Route, dlv: Any) -> Any:
    """Open the outgoing twin of ``dlv`` on the peer link, with the same tag."""
    twin = lib.pn_delivery(route.peer.link, lib.pn_delivery_tag(dlv))
    route.inflight[dlv] = twin
    route.peer.inflight[twin] = dlv
    state = lib.pn_delivery_remote_state(dlv)
    if state:
        # A state on the transfer itself (transactional-state): carry it across.
        copy_state(lib.pn_delivery_remote(dlv), lib.pn_delivery_local(twin))
        lib.pn_delivery_update(twin, state)
    return twin


def _settle_if_presettled(route: Route, dlv: Any, twin: Any) -> None:
    """Pre-settled by the sender (at-most-once): settle the twin as it is sent."""
    if _settled(dlv):
        _settle_both(route, dlv, twin)


def _settle_both(route: Route, dlv: Any, twin: Any) -> None:
    """``dlv``'s sender settled it: settle it and its twin, and forget the pair."""
    _forget(route, dlv, twin)
    lib.pn_delivery_settle(twin)
    lib.pn_delivery_settle(dlv)


def drop_unrouted(dlv: Any) -> bool:
    """A transfer on a link that is routed no more (refused, or detached for a limit or by
    the far side), sent before its sender read our detach or never reading it: its bytes
    are read and dropped as they come. Left alone, proton would keep every byte of it for
    the link's life, and a guest could grow the connector without bound. It is not
    settled: the far side said nothing of it (the broker redelivers its own; the guest's
    stays unsettled, its fate unknown, until the link goes).

    Returns whether it came without credit (the caller ends a guest's connection for that,
    as for a routed link): a refused link never had any, so only a bounded number of
    deliveries can arrive on one, each read to nothing."""
    link = lib.pn_delivery_link(dlv)
    if not lib.pn_link_is_receiver(link) or _current(link) != dlv:
        return False  # a disposition on a link we sent on, or a delivery already dropped
    while _recv(link, _copy_ptr, COPY_CHUNK) > 0:
        pass
    overdrawn = _overdrawn(link)
    if not _partial(dlv):
        _advance(link)
    return overdrawn


def _forward_relayed(route: Route, dlv: Any) -> tuple[int, int]:
    """An anonymous-relay message whose 'to' the policy checks: collect it whole, read its
    sections (``sections.read``), then refuse it (rejected, settled) or send it on, its 'to'
    mapped. A message that is not one well-formed message is refused: its 'to' cannot be
    checked.

    Off the fast path: only relay links of guests whose policy restricts addresses.
    """
    link = route.link
    buf = route.relay_buffer
    if not buf:
        _admit(route)
    moved = 0
    while True:
        n = lib.pn_link_recv(link, _copy_ptr, COPY_CHUNK)
        if n <= 0:
            break
        buf += _copy[:n]
        moved += n
    route.bytes += moved
    if route.max_message and len(buf) > route.max_message:
        buf.clear()
        raise _oversize(route)
    if lib.pn_delivery_aborted(dlv):
        buf.clear()
        lib.pn_delivery_settle(dlv)
        # Nothing went upstream, so the broker still grants this message's credit: the guest
        # gets it back, as it does for a refused message below.
        credit.sync_credit(route.peer)
        return 0, 0
    if lib.pn_delivery_partial(dlv):
        return 0, 0
    data = bytes(buf)
    buf.clear()
    lib.pn_link_advance(link)
    try:
        msg = sections.read(data)
    except sections.BadMessage as err:
        refusal: tuple[str, str] | None = ("amqp:decode-error", f"a relayed message: {err}")
    else:
        refusal = route.relay.check_relay(msg.to)
    if refusal is not None:
        local = lib.pn_delivery_local(dlv)
        set_condition(lib.pn_disposition_condition(local), *refusal)
        lib.pn_delivery_update(dlv, lib.PN_REJECTED)
        lib.pn_delivery_settle(dlv)
        credit.sync_credit(route.peer)  # the refused message's credit goes back to the guest
        return 0, 0
    assert msg.to is not None  # check_relay refuses a message without one
    mapped = route.relay.to_broker(msg.to)
    if mapped != msg.to:
        data = msg.with_to(mapped)
    twin = _open_twin(route, dlv)
    out_link = route.peer.link
    lib.pn_link_send(out_link, ffi.from_buffer(data), len(data))
    lib.pn_link_advance(out_link)
    route.deliveries += 1
    _settle_if_presettled(route, dlv, twin)
    return 1, len(data)


def mirror_disposition(route: Route, dlv: Any, twin: Any) -> None:
    """The peer of ``dlv`` sent a disposition: say the same on ``twin``; settle if it did."""
    state = _remote_state(dlv)
    if state and state != _local_state(twin):
        # A new outcome (proton's engine keeps no "seen" flag we can clear, so compare).
        if state != _ACCEPTED:  # accepted has no fields; everything else carries some
            copy_state(lib.pn_delivery_remote(dlv), lib.pn_delivery_local(twin))
        _update(twin, state)
    elif state and state != _ACCEPTED:
        # The same type again: passed on if its fields are new (received with more progress,
        # transactional-state in another transaction), not if this event is for something
        # else (proton writes a disposition for every update, duplicates included).
        remote, local = lib.pn_delivery_remote(dlv), lib.pn_delivery_local(twin)
        if _state_fields(remote) != _state_fields(local):
            copy_state(remote, local)
            _update(twin, state)
    if _settled(dlv):
        # Settled on the far side: only now settle here, so nothing is acknowledged early.
        _settle_both(route, dlv, twin)
        if route.held:  # the guest's unsettled limit held credit back: room again
            credit.sync_credit(route)


def copy_state(src: Any, dst: Any) -> None:
    """Copy a disposition's fields (rejected's error, modified's flags and annotations,
    received's section, and the raw fields of any other outcome such as declared or
    transactional-state)."""
    lib.pn_disposition_set_section_number(dst, lib.pn_disposition_get_section_number(src))
    lib.pn_disposition_set_section_offset(dst, lib.pn_disposition_get_section_offset(src))
    lib.pn_disposition_set_failed(dst, lib.pn_disposition_is_failed(src))
    lib.pn_disposition_set_undeliverable(dst, lib.pn_disposition_is_undeliverable(src))
    copy_data(lib.pn_disposition_annotations(dst), lib.pn_disposition_annotations(src))
    copy_data(lib.pn_disposition_data(dst), lib.pn_disposition_data(src))
    copy_condition(lib.pn_disposition_condition(dst), lib.pn_disposition_condition(src))


def _state_fields(disp: Any) -> tuple[Any, ...]:
    """Everything ``copy_state`` copies of a disposition, comparable."""
    return (
        lib.pn_disposition_get_section_number(disp),
        lib.pn_disposition_get_section_offset(disp),
        lib.pn_disposition_is_failed(disp),
        lib.pn_disposition_is_undeliverable(disp),
        _encoded(lib.pn_disposition_annotations(disp)),
        _encoded(lib.pn_disposition_data(disp)),
        read_condition(lib.pn_disposition_condition(disp)),
    )


def _encoded(data: Any) -> bytes:
    """A pn_data_t's contents in AMQP encoding (empty when it holds nothing)."""
    size = lib.pn_data_encoded_size(data)
    if size <= 0:
        return b""
    buf = ffi.new("char[]", size)
    n = lib.pn_data_encode(data, buf, size)
    return ffi.buffer(buf, n)[:] if n > 0 else b""


def _forget(route: Route, dlv: Any, twin: Any) -> None:
    route.inflight.pop(dlv, None)
    route.peer.inflight.pop(twin, None)


def forget_route(route: Route) -> None:
    """A link pair is going away: drop its in-flight map on both sides.

    The deliveries stay unsettled on the wire, so the broker redelivers what the guest had
    not settled, and the guest resends what the broker had not settled.
    """
    peer = route.peer
    if peer is not None:
        for twin in route.inflight.values():
            peer.inflight.pop(twin, None)
    route.inflight.clear()
