"""Mirror link credit and drain end to end, so the guest never holds more credit than the
broker granted, and a drain on one side completes only when the other side has drained.

Proton's ``pn_link_credit`` already nets out what a link has advanced: for a sender it is the
peer's remaining credit minus deliveries we advanced; for a receiver it is the credit we
issued minus deliveries we advanced. Both links of a pair advance together (a transfer is
advanced on the receiving link and the sending link in the same step), so the credit the
receiving link should issue is exactly what the sending link has left:

    delta = credit(sending link) - credit(receiving link)

On a link to a guest, credit is also held back while the deliveries the guest has not
settled reach ``[limits] max_unsettled_per_link``, so what the connector holds for a guest
that never settles stays bounded (each is a proton delivery in both engines).

Credit can only be added, never taken back (AMQP lets a receiver lower credit, proton's API
does not), so a broker that lowers credit leaves the guest's excess queued on our upstream
sender until the broker grants again: bounded, and never over-delivered to the broker.
"""

from __future__ import annotations

from typing import Any

from cproton_ffi import ffi, lib

from .route import Route

# Proton keeps a link's credit in a C int. AMQP credit is a uint32, and a peer may grant
# "unlimited" (0xFFFFFFFF); what we pass on is capped where proton's int ends.
MAX_CREDIT = 2**31 - 1

_REMOTE_ACTIVE = lib.PN_REMOTE_ACTIVE
_LOCAL_ACTIVE = lib.PN_LOCAL_ACTIVE


def _attached(link: Any) -> bool:
    state = lib.pn_link_state(link)
    return bool(state & _REMOTE_ACTIVE) and bool(state & _LOCAL_ACTIVE)


def sync_credit(sender_route: Route) -> None:
    """The sending link of a pair changed (flow arrived, or we sent): re-issue credit.

    ``sender_route`` is our sender; its peer is the receiving link whose credit we set.
    Credit is only issued once both links are attached both ways: RabbitMQ 4 counts credit
    that arrives before its own attach wrongly.
    """
    rcv_route = sender_route.peer
    if rcv_route is None:
        return
    snd = sender_route.link
    rcv = rcv_route.link
    drain = bool(lib.pn_link_get_drain(snd))
    issued = lib.pn_link_credit(rcv)
    # Issued credit can be negative (a sender overran it); the flow call takes an int too.
    delta = min(lib.pn_link_credit(snd) - issued, MAX_CREDIT - max(issued, 0))
    if delta <= 0 and not drain and not lib.pn_link_get_drain(rcv):
        return  # the usual case, after each transfer sent: both links moved together
    cap = sender_route.max_unsettled
    if cap:
        # A guest that takes messages and never settles them must not make us hold the
        # broker's queue: what we hold unsettled for it plus the credit still out upstream
        # stays within its limit. What is held back is issued as the guest settles.
        room = cap - len(sender_route.inflight) - max(issued, 0)
        sender_route.held = room < delta
        delta = min(delta, room)
    if not (_attached(snd) and _attached(rcv)):
        return
    if drain != bool(lib.pn_link_get_drain(rcv)):
        lib.pn_link_set_drain(rcv, drain)
    if delta > 0:
        lib.pn_link_flow(rcv, delta)
    if drain:
        finish_drain(rcv_route)


def finish_drain(rcv_route: Route) -> None:
    """If the receiving link's drain is complete, tell the sender's peer it is drained.

    The receiving side asked for drain on our sender (its ``drain`` flag); we passed drain on
    to the far sender through our receiver. Once our receiver has no credit outstanding (the
    far sender used it or gave it back), we give back whatever credit our sender still has.
    """
    snd_route = rcv_route.peer
    if snd_route is None:
        return
    rcv = rcv_route.link
    snd = snd_route.link
    if not lib.pn_link_get_drain(snd):
        return
    lib.pn_link_drained(rcv)  # reset proton's drained counter on the receiver
    # A message still streaming through holds our sender's credit, though proton counts it
    # only once the message is complete: drained now, the rest could not be sent. Its
    # last frame makes proton post PN_LINK_FLOW on our sender, which comes back here.
    streaming = lib.pn_link_current(snd) != ffi.NULL
    if lib.pn_link_credit(rcv) - lib.pn_link_queued(rcv) <= 0 and not streaming:
        lib.pn_link_drained(snd)
