"""Pair a guest's AMQP connection with its own upstream connection, endpoint for endpoint.

The router reads both engines' collectors and answers every event on one side with the
matching action on the other:

    guest open     -> upstream open (guest container-id, host-asserted identity)
    broker open    -> guest open (broker's capabilities and properties)
    begin / end    -> begin / end, one session for one session, with error conditions
    attach         -> attach with every field proton decodes (terminus.py); the guest's
                      link is answered only when the broker has answered
    flow           -> credit and drain mirrored (credit.py)
    transfer       -> transfer, bytes untouched (deliveries.py)
    disposition    -> disposition, settled here only when settled there (deliveries.py)
    detach / close -> detach / close with error conditions

It is sans-IO: it never reads or writes a file descriptor. Whoever owns the sockets pushes
bytes into the engines, calls :meth:`Router.process`, and writes out what the engines have.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cproton_ffi import ffi, lib
from proton import Data, symbol

from ..limits import GuestLimits
from ..redirect import ESTABLISHMENT_FAILED, REDIRECT
from . import credit
from .deliveries import drop_unrouted, forget_route, no_credit, on_delivery
from .engine import Engine, copy_condition, copy_data, read_condition, set_condition
from .frames import DISPOSITION_SPAN_PER_READ
from .route import AttachRequest, GuestViolation, LinkPolicy, Route
from .terminus import copy_attach

FORCED = "amqp:connection:forced"
UNAUTHORIZED = "amqp:unauthorized-access"

# Open-frame property keys the connector asserts; a guest may not supply its own.
IDENTITY_PREFIX = "qpid-virtio."
# What a guest we have cut for a violation may still write into proton: enough for the
# frames it had in flight and its answering close. Past it, its bytes are dropped unread,
# and the close times out (or is written). Read on without bound, a guest writing begins
# and attaches after our close had proton make an object for each (some 3 KB a session:
# 350 MB in the test) for as long as the close was awaited.
AFTER_VIOLATION_INPUT = 64 * 1024

_DELIVERY = lib.PN_DELIVERY
_TRANSPORT = lib.PN_TRANSPORT
_peek = lib.pn_collector_peek
_pop = lib.pn_collector_pop
_event_type = lib.pn_event_type
_event_delivery = lib.pn_event_delivery
_delivery_link = lib.pn_delivery_link
_LINK_FLOW = lib.PN_LINK_FLOW
_LOCAL_UNINIT = lib.PN_LOCAL_UNINIT
_LOCAL_ACTIVE = lib.PN_LOCAL_ACTIVE
_LOCAL_CLOSED = lib.PN_LOCAL_CLOSED
_REMOTE_CLOSED = lib.PN_REMOTE_CLOSED
_REMOTE_UNINIT = lib.PN_REMOTE_UNINIT
# Proton's condition when a peer has been silent past our idle timeout (pn_tick_amqp).
_IDLE_EXPIRED = ("amqp:resource-limit-exceeded", "local-idle-timeout expired")


class RouterState(enum.Enum):
    """Where the guest's connection is in its life."""

    OPENING = "opening"  # guest open received, waiting for the broker's open
    OPEN = "open"
    CLOSING = "closing"  # close sent or received on either side
    CLOSED = "closed"  # both sides finished


@dataclass
class Counters:
    """What has crossed a channel, summed over its whole life like an interface's counters."""

    deliveries_in: int = 0  # guest -> broker
    deliveries_out: int = 0  # broker -> guest
    bytes_in: int = 0
    bytes_out: int = 0
    discarded_bytes: int = 0  # bytes before a protocol header, thrown away
    guest_connections: int = 0
    upstream_failures: int = 0
    upstream_reconnects: int = 0  # upstreams opened after the previous one failed
    last_upstream_failed: bool = False


class Router:
    """One guest connection routed to one upstream connection."""

    def __init__(
        self,
        guest: Engine,
        *,
        make_upstream: Callable[[], Engine],
        identity_properties: dict[str, str],
        log: logging.Logger | logging.LoggerAdapter,
        counters: Counters,
        policy: LinkPolicy | None = None,
        limits: GuestLimits | None = None,
    ) -> None:
        self.guest = guest
        guest.reader.disposition_limit = DISPOSITION_SPAN_PER_READ
        self.upstream: Engine | None = None
        self.state = RouterState.OPENING
        self.error: tuple[str, str] | None = None  # why the connection ended, if not cleanly
        self._violated = False  # we ended the guest's connection for breaking a rule
        self._after_violation = 0  # bytes of the guest's read since (AFTER_VIOLATION_INPUT)
        self.routes: dict[Any, Route] = {}  # link pointer (either side) -> its route
        self._sessions: dict[Any, Any] = {}  # session pointer -> its twin, both directions
        self._make_upstream = make_upstream
        self._identity = identity_properties
        self._log = log
        self._counters = counters
        self._policy = policy or LinkPolicy()
        self._upstream_dead = False
        # Whom the upstream goes to, named in every reason it fails with: the channel sets
        # the broker's URL when it connects.
        self.upstream_name = "the broker"
        # The upstream failed before the broker's open: the next guest connection tries
        # the next broker of the failover list (Channel).
        self.failed_opening = False
        self._limits = limits or GuestLimits()
        # Token bucket for attaches: a guest may burst, then attach at the set rate.
        self._attach_tokens = float(self._limits.attach_burst)
        self._attach_time = time.monotonic()
        self._deferred_refusals: list[tuple[Any, tuple[str, str]]] = []
        self._uncounted: set[bool] = set()  # sides whose unsent deliveries came off
        self._awaiting_detach: set[Any] = set()  # links we closed; their detach is due
        # Upstream sessions the guest ended before the broker answered their begin.
        self._end_when_begun: set[Any] = set()
        # Guest links the guest ended before their session was begun (the broker's open had
        # not come), and whether it only detached them. Proton writes a link's frames only
        # once its session's begin is written: ended (or freed) before, the link is never
        # written at all, and the guest never hears its detach answered. So they are
        # answered when the session is begun (``_begin``) and freed once that is written.
        # So are those ended while a namesake's detach waits to be written: their attach
        # may not go before it (``_answer_guest_attach``, ``_free_written``).
        self._ended_unbegun: dict[Any, bool] = {}
        # Links and sessions we have ended, to free once their detach or end is out
        # (``_free_written``).
        self._unwritten_links: list[Any] = []
        self._unwritten_sessions: list[Any] = []
        # Broker answers to a guest's attach, held while that guest link's namesake waits
        # for its detach to be written (``_answer_guest_attach``), and whether the broker
        # then only detached the link (None: it has not ended it).
        self._answers_held: dict[Any, bool | None] = {}
        # A broker's redirect, the info of its close, while the channel has not yet decided
        # what to do with it (follow it, or end the guest's connection): never for the guest.
        self.redirect: dict[Any, Any] | None = None
        self.redirects = 0  # redirects followed for this guest connection
        # The broker's open said its close follows (ESTABLISHMENT_FAILED), so the guest's
        # open is held: what to tell the guest if that close never comes.
        self.open_refused = False

    # -- driving -------------------------------------------------------------------------

    def feed_guest(self, data: bytes) -> bool:
        """Push bytes read from the guest; False when the guest's stream failed on them
        (the caller may then look for a new protocol header in them).

        Proton stops reading at some undecodable input (an unknown performative) without
        setting an error; that is turned into a framing error here, so the guest is told.
        """
        if self._violated:
            self._after_violation += len(data)
            if self._after_violation > AFTER_VIOLATION_INPUT:
                return True  # dropped unread: it was told, and only its close matters now
        taken = self.guest.push(data)
        if self.guest.disposition_storm:
            self._disposition_storm()
            return True  # not pushed, on purpose: no header to look for in it
        stalled = taken < len(data) or self.guest.input_closed
        # After the guest's close, proton rightly takes no more: what follows belongs to
        # the guest's next connection.
        closed = bool(lib.pn_connection_state(self.guest.connection) & _REMOTE_CLOSED)
        if stalled and not closed and self.guest.condition() is None and self.error is None:
            self.violation(
                "amqp:connection:framing-error", "the guest's input could not be decoded"
            )
        return not stalled and self.guest.condition() is None

    def _disposition_storm(self) -> None:
        """The guest's dispositions named more deliveries in one read than any settling
        needs (``frames.DISPOSITION_SPAN_PER_READ``); proton was not given them."""
        if not self._violated:
            self.violation(
                "amqp:resource-limit-exceeded",
                f"dispositions naming more than {DISPOSITION_SPAN_PER_READ} deliveries in one read",
            )

    def process(self) -> None:
        """Handle every pending event on both sides, until neither has any.

        Proton posts events while it produces output too: each transfer it frames posts
        PN_LINK_FLOW on its link (the credit went down). So both engines' output is
        produced here, and what that posted is handled in this same call. Left to
        ``events_pending`` after the writes, it cost each message of a request/response
        one more turn of the event loop and a whole pump.
        """
        guest = self.guest
        if guest.disposition_storm:
            self._disposition_storm()  # in the guest's first read, pushed by the channel
        while True:
            self._drain(guest.collector, from_guest=True)
            upstream = self.upstream  # handling the guest's open makes it
            if upstream is not None:
                self._drain(upstream.collector, from_guest=False)
            # Handling events posts more (our attach posts a local-open event), and so
            # does producing the frames (the count is not needed).
            guest.output_pending()
            if upstream is not None:
                upstream.output_pending()
            if self._unwritten_links or self._unwritten_sessions:
                self._free_written()
            if not self.events_pending():
                return

    def events_pending(self) -> bool:
        """Whether either engine holds an event ``process`` has not seen: proton posts some
        while it produces output, which writing can resume after ``process`` ran (its SASL
        client, finding no mechanism it may use, fails there). PN_TRANSPORT events, which
        change nothing, are dropped on the way."""
        for engine in (self.guest, self.upstream):
            if engine is None or engine.collector is None:
                continue  # no upstream yet, or the engines were freed
            collector = engine.collector
            ev = _peek(collector)
            while ev != ffi.NULL and _event_type(ev) == _TRANSPORT:
                _pop(collector)
                ev = _peek(collector)
            if ev != ffi.NULL:
                return True
        return False

    def _drain(self, collector: Any, *, from_guest: bool) -> bool:
        """Dispatch one collector's events; whether any was handled. The first two branches
        are the per-message path.

        A PN_TRANSPORT event (proton has output to write) is only popped: it changes
        nothing, so it does not count as handled, and ``process`` does not go round again
        for it. Most calls after the first find nothing else.
        """
        routes = self.routes
        counters = self._counters
        # Once the guest connection is closed on our side, nothing more reaches the guest:
        # a transfer the broker sent meanwhile stays unsettled (the broker redelivers it),
        # and is not counted as routed. Read once per call, not per message.
        forward = from_guest or not lib.pn_connection_state(self.guest.connection) & _LOCAL_CLOSED
        seen = False
        peek = _peek
        pop = _pop
        event_type = _event_type
        NULL = ffi.NULL
        while True:
            ev = peek(collector)
            if ev == NULL:
                return seen
            etype = event_type(ev)
            if etype == _TRANSPORT:
                pop(collector)
                continue
            seen = True
            if etype == _DELIVERY:
                dlv = _event_delivery(ev)
                route = routes.get(_delivery_link(dlv))
                # Nor anything from a guest we cut for a violation, from the event it broke
                # a rule with on: what it wrote after (a discharge, say) must not reach the
                # broker. Checked per event, since the violation comes in this same call.
                if route is not None and route.peer is not None and forward and not self._violated:
                    try:
                        done, moved = on_delivery(route, dlv)
                    except GuestViolation as err:
                        if err.link_only:
                            self._detach_for(route, err.condition, err.description)
                        else:
                            self.violation(err.condition, err.description)
                        done = moved = 0
                    if moved or done:
                        if from_guest:
                            counters.deliveries_in += done
                            counters.bytes_in += moved
                        else:
                            counters.deliveries_out += done
                            counters.bytes_out += moved
                elif route is None and drop_unrouted(dlv) and from_guest:
                    self._without_credit(_delivery_link(dlv))
            elif etype == _LINK_FLOW:
                route = routes.get(lib.pn_event_link(ev))
                if route is not None:
                    if route.receiving:
                        credit.finish_drain(route)
                    else:
                        credit.sync_credit(route)
            else:
                self._on_endpoint_event(etype, ev, from_guest)
            pop(collector)

    def _without_credit(self, link: Any) -> None:
        """The guest sent on ``link`` without credit: it never had any (refused), or sent
        past what it had. As on a routed link (``deliveries._admit``), that ends it."""
        err = no_credit(ffi.string(lib.pn_link_name(link)).decode(errors="replace"))
        self.violation(err.condition, err.description)

    # -- connection ----------------------------------------------------------------------

    def _on_endpoint_event(self, etype: int, ev: Any, from_guest: bool) -> None:
        handler = _HANDLERS.get(etype)
        if handler is None:
            return
        if from_guest and etype in _GUEST_ENDPOINTS and self._guest_closed():
            # We have closed the guest's connection (a violation, the upstream failing):
            # its sessions and links go with it unanswered. Answered, each could cost a
            # channel proton no longer has (a guest cut for churning sessions), and a guest
            # that goes on writing until it reads our close kept the loop busy answering.
            return
        handler(self, ev, from_guest)

    def _guest_closed(self) -> bool:
        return bool(lib.pn_connection_state(self.guest.connection) & _LOCAL_CLOSED)

    def _on_connection_remote_open(self, ev: Any, from_guest: bool) -> None:
        if from_guest:
            if self.upstream is not None:
                self.violation("amqp:illegal-state", "a second open on one connection")
                return
            idle_ms = lib.pn_transport_get_remote_idle_timeout(self.guest.transport)
            least_ms = int(self._limits.min_idle_timeout_s * 1000)
            if 0 < idle_ms < least_ms:
                self.violation(
                    "amqp:resource-limit-exceeded",
                    f"idle-time-out of {idle_ms} ms is below the minimum of {least_ms} ms",
                )
                return
            self._open_upstream()
        else:
            self._answer_guest_open()

    def _open_upstream(self) -> None:
        g = self.guest.connection
        counters = self._counters
        if counters.last_upstream_failed:
            counters.upstream_reconnects += 1
            counters.last_upstream_failed = False
        counters.guest_connections += 1
        self.upstream = self._make_upstream()
        self._send_open(self.upstream)
        container = lib.pn_connection_remote_container(g)
        self._log.info(
            "guest opened a connection (container-id %s); opening upstream",
            ffi.string(container).decode(errors="replace") if container != ffi.NULL else "-",
        )

    def _send_open(self, engine: Engine) -> None:
        """Open ``engine``'s connection on the guest's behalf."""
        g = self.guest.connection
        up = engine.connection
        container = lib.pn_connection_remote_container(g)
        if container != ffi.NULL:
            # The guest's own container-id, so broker state keyed on it (durable
            # subscriptions, for one) survives the guest's reconnects.
            lib.pn_connection_set_container(up, container)
        _copy_capabilities(up, g)
        props = {
            k: v
            for k, v in _read_map(lib.pn_connection_remote_properties(g)).items()
            if not str(k).startswith(IDENTITY_PREFIX)
        }
        props.update({symbol(k): v for k, v in self._identity.items()})
        _write_map(lib.pn_connection_properties(up), props)
        lib.pn_connection_open(up)

    def _answer_guest_open(self) -> None:
        g = self.guest.connection
        up = self.upstream.connection
        if lib.pn_connection_state(up) & _REMOTE_CLOSED:
            return  # its close came with it: a refusal, or a redirect still to be followed
        if _read_map(lib.pn_connection_remote_properties(up)).get(ESTABLISHMENT_FAILED):
            # Its close is announced: the same, and the guest is not answered before it.
            self.open_refused = True
            return
        if lib.pn_connection_state(g) & _LOCAL_UNINIT:
            container = lib.pn_connection_remote_container(up)
            if container != ffi.NULL:
                lib.pn_connection_set_container(g, container)
            # Clients decide what to use (ANONYMOUS-RELAY, say) from the broker's offer.
            _copy_capabilities(g, up)
            copy_data(lib.pn_connection_properties(g), lib.pn_connection_remote_properties(up))
            lib.pn_connection_open(g)
            self._begin_waiting()
            self._answer_deferred_refusals()
        if self.state is RouterState.OPENING:
            self.state = RouterState.OPEN
            self._log.info("upstream open; guest connection routed")

    def _on_connection_remote_close(self, ev: Any, from_guest: bool) -> None:
        g = self.guest.connection
        if from_guest:
            if self.upstream is not None and not self._upstream_dead:
                up = self.upstream.connection
                copy_condition(
                    lib.pn_connection_condition(up), lib.pn_connection_remote_condition(g)
                )
                _close_connection(up)
            _close_connection(g)
            cond = read_condition(lib.pn_connection_remote_condition(g))
            self._log.info("guest closed its connection%s", _fmt_cond(cond))
        else:
            up = self.upstream.connection
            cond = read_condition(lib.pn_connection_remote_condition(up))
            answered = bool(lib.pn_connection_state(up) & _LOCAL_CLOSED)  # we closed first
            if cond and cond[0] == REDIRECT and not answered:
                # The guest could not follow it: the channel follows it or ends the guest's
                # connection (``follow_redirect``, ``upstream_failed``).
                self.redirect = _read_map(
                    lib.pn_condition_info(lib.pn_connection_remote_condition(up))
                )
                self._log.info("broker closed the upstream connection%s", _fmt_cond(cond))
                return
            if lib.pn_connection_state(g) & _LOCAL_UNINIT:
                lib.pn_connection_open(g)
            if not self._guest_closed():
                # Closed already (the guest closed first, or was cut), our close says what
                # it said: not the broker's words, nor a redirect the guest cannot follow.
                copy_condition(
                    lib.pn_connection_condition(g), lib.pn_connection_remote_condition(up)
                )
            _close_connection(g)
            _close_connection(up)
            if cond and self.error is None:  # a guest's violation stays the recorded cause
                self.error = cond
            if not answered or cond:
                self._log.info("broker closed the upstream connection%s", _fmt_cond(cond))
        self.state = RouterState.CLOSING

    def _on_transport_error(self, ev: Any, from_guest: bool) -> None:
        if from_guest:
            cond = self.guest.condition() or ("amqp:internal-error", "guest transport failed")
            if self.error is not None and self._guest_closed():
                # We had ended the connection (a violation) and the guest wrote on: what
                # proton makes of that is noise, and the cause stays the one recorded.
                self._log.debug("after our close, guest protocol error: %s: %s", *cond)
            else:
                self.error = cond
                self._log.warning("guest protocol error: %s: %s", *cond)
            if self.upstream is not None and not self._upstream_dead:
                _close_connection(self.upstream.connection)
            self.state = RouterState.CLOSING
        else:
            # Proton's words alone say neither whose error it is nor, for our idle timeout
            # of the broker, that the broker is the silent one.
            name = self.upstream_name
            cond = self.upstream.condition()
            if cond == _IDLE_EXPIRED:
                idle_s = lib.pn_transport_get_idle_timeout(self.upstream.transport) / 1000
                why = f"{name} sent nothing for {idle_s:g}s (broker.idle_timeout_s)"
            else:
                why = f"{cond[0]}: {cond[1]}" if cond else "the transport failed"
                opening = self.state is RouterState.OPENING
                why = f"no AMQP open from {name}: {why}" if opening else f"{name}: {why}"
            self.upstream_failed(why)

    def _on_transport_closed(self, ev: Any, from_guest: bool) -> None:
        if not from_guest and not self._upstream_dead:
            state = lib.pn_connection_state(self.upstream.connection)
            if not (state & _REMOTE_CLOSED):
                self.upstream_failed("the broker dropped the connection")

    def upstream_failed(self, reason: str) -> None:
        """The broker refused us or the upstream broke: end the guest's connection.

        ``amqp:connection:forced`` tells the guest's client to reconnect. Its unsettled
        deliveries stay unsettled, so nothing is acknowledged that the broker did not take.
        Once we have closed the upstream ourselves it is only the end of that exchange: not
        counted as a failure, and the guest (already told, or gone) is not told again.
        """
        if self._upstream_dead:
            return
        self._upstream_dead = True
        up = self.upstream
        if up is not None and lib.pn_connection_state(up.connection) & _LOCAL_CLOSED:
            # We had begun the close exchange (the guest closed, left or broke a rule, or
            # the connector stops): the broker ending it early fails nothing and nobody.
            self._log.info("upstream ended before answering our close: %s", reason)
            return
        self.failed_opening = self.state is RouterState.OPENING
        self._counters.upstream_failures += 1
        self._counters.last_upstream_failed = True
        self.error = (FORCED, reason)
        self._log.warning("upstream failed: %s; closing the guest's connection", reason)
        g = self.guest.connection
        state = lib.pn_connection_state(g)
        if state & _LOCAL_CLOSED:
            return
        if state & _LOCAL_UNINIT:
            lib.pn_connection_open(g)  # a close must follow an open
        set_condition(lib.pn_connection_condition(g), FORCED, reason)
        lib.pn_connection_close(g)
        self.state = RouterState.CLOSING

    def follow_redirect(self, engine: Engine) -> None:
        """Go on with ``engine``, connected to where the broker redirected us, before the
        guest's open has been answered; the old upstream engine is freed.

        Until the broker's open nothing but our open went upstream (sessions wait for it in
        ``_begin``, and their links with them), so the guest's sessions and links are made
        again on the new connection, and none of them sees the redirect.
        """
        old = self.upstream
        self.redirect = None
        self.redirects += 1
        self.open_refused = False
        self.upstream = engine
        self._send_open(engine)
        # Fields proton drops, for attaches that were never written: due on the new engine.
        engine.writer.pending.update(old.writer.pending)
        g = self.guest.connection
        for ssn, twin in list(self._sessions.items()):
            if lib.pn_session_connection(ssn) == g:
                up = lib.pn_session(engine.connection)
                del self._sessions[twin]
                self._sessions[ssn] = up
                self._sessions[up] = ssn
        for groute in [r for r in self.routes.values() if r.from_guest and r.peer is not None]:
            del self.routes[groute.peer.link]
            glink = groute.link
            ulink = self._upstream_link(glink, self._sessions[lib.pn_link_session(glink)])
            self._pair(groute, ulink)
        # Links the guest detached before the broker's open went with the old connection.
        self._awaiting_detach = {
            link
            for link in self._awaiting_detach
            if lib.pn_session_connection(lib.pn_link_session(link)) == g
        }
        old.free()

    def violation(self, condition: str, description: str) -> None:
        """The guest broke a limit or the protocol: end its connection with ``condition``.

        Its upstream is closed too; what it had not settled stays unsettled at the broker.
        """
        if self.error is not None and self.error[0] == condition:
            return
        self._log.warning("ending the guest's connection: %s: %s", condition, description)
        self.error = (condition, description)
        self._violated = True
        g = self.guest.connection
        state = lib.pn_connection_state(g)
        # With no open from the guest yet, proton would hold our close back: its error path
        # tells the guest at once.
        told = bool(state & _REMOTE_UNINIT) and self.guest.fail(condition, description)
        if not told and not state & _LOCAL_CLOSED:
            if state & _LOCAL_UNINIT:
                lib.pn_connection_open(g)
            set_condition(lib.pn_connection_condition(g), condition, description)
            lib.pn_connection_close(g)
        self.close_upstream()

    def _detach_for(self, route: Route, condition: str, description: str) -> None:
        """A guest broke a link's limit: close that link (and its twin) with ``condition``;
        the connection and its other links go on."""
        self._log.warning("detaching link %s: %s: %s", route.name, condition, description)
        glink, twin = route.link, route.peer.link
        set_condition(lib.pn_link_condition(glink), condition, description)
        for link in (glink, twin):
            if not lib.pn_link_state(link) & _LOCAL_CLOSED:
                lib.pn_link_close(link)
        self._drop_route(route)

    def shutdown(self, reason: str) -> None:
        """End both connections on our initiative (the connector stops, the channel is
        removed): the guest gets ``amqp:connection:forced`` so its client reconnects."""
        g = self.guest.connection
        state = lib.pn_connection_state(g)
        if not state & _LOCAL_CLOSED:
            if state & _LOCAL_UNINIT:
                lib.pn_connection_open(g)
            set_condition(lib.pn_connection_condition(g), FORCED, reason)
            lib.pn_connection_close(g)
        if self.upstream is not None and not self._upstream_dead:
            _close_connection(self.upstream.connection)
        self.state = RouterState.CLOSING

    def guest_gone(self, reason: str) -> None:
        """The channel went away under the guest: end the upstream connection.

        The guest's unsettled deliveries towards us stay unsettled at the broker, which
        therefore redelivers them.
        """
        self._log.info("guest gone (%s); closing upstream", reason)
        self.close_upstream()

    def close_upstream(self) -> None:
        """Start (or continue) the upstream close exchange."""
        if self.upstream is not None and not self._upstream_dead:
            _close_connection(self.upstream.connection)
        self.state = RouterState.CLOSING

    @property
    def upstream_dead(self) -> bool:
        """The upstream socket failed or was dropped; nothing more goes to it."""
        return self._upstream_dead

    def broker_closed(self) -> bool:
        """The broker's close has arrived: an end of its stream after it is the clean end."""
        if self.upstream is None:
            return False
        return bool(lib.pn_connection_state(self.upstream.connection) & _REMOTE_CLOSED)

    def upstream_closed(self) -> bool:
        """The upstream close exchange is complete (or it failed): drop its socket."""
        if self.upstream is None or self._upstream_dead:
            return True
        state = lib.pn_connection_state(self.upstream.connection)
        return bool(state & _LOCAL_CLOSED) and bool(state & _REMOTE_CLOSED)

    def unsent(self, *, upstream: bool) -> int:
        """Deliveries counted as routed towards one side (``upstream``: the broker) that
        proton still holds, mostly for want of credit. What the channel shows leaves them
        out until they go, so its counters never go back (``Channel.routed_deliveries``)."""
        if upstream in self._uncounted:
            return 0
        return sum(
            lib.pn_link_queued(r.link)
            for r in self.routes.values()
            if not r.receiving and r.from_guest != upstream  # our senders on that side
        )

    def uncount_unsent(self, *, upstream: bool) -> None:
        """One side's engine is being dropped: deliveries advanced to it but never written
        were not routed after all, so they come off the channel's counters."""
        unsent = self.unsent(upstream=upstream)
        self._uncounted.add(upstream)
        self._uncount(upstream, unsent)

    def _uncount(self, upstream: bool, n: int) -> None:
        if upstream:
            self._counters.deliveries_in -= n
        else:
            self._counters.deliveries_out -= n

    def awaiting_guest_close(self) -> bool:
        """The guest connection is ending on our side and not yet finished: we closed it and
        its answering close has not come, or our close (after our own close, or proton's
        after a transport error such as the idle timeout) waits for a port that takes no
        more bytes. Neither may be waited for without a bound."""
        state = lib.pn_connection_state(self.guest.connection)
        ours = bool(state & _LOCAL_CLOSED) or self.guest.condition() is not None
        return ours and not self.guest_finished()

    def guest_finished(self) -> bool:
        """The guest connection has ended and everything for it has been written."""
        g = self.guest.connection
        state = lib.pn_connection_state(g)
        ended = (bool(state & _LOCAL_CLOSED) and bool(state & _REMOTE_CLOSED)) or (
            self.guest.condition() is not None
        )
        return ended and self.guest.output_pending() <= 0

    # -- sessions ------------------------------------------------------------------------

    def _on_session_remote_open(self, ev: Any, from_guest: bool) -> None:
        ssn = lib.pn_event_session(ev)
        if from_guest:
            if self.upstream is None or self._upstream_dead:
                return
            if self._sessions_unanswerable():
                return
            up = lib.pn_session(self.upstream.connection)
            self._sessions[ssn] = up
            self._sessions[up] = ssn
            # Before the broker's open (which answers the guest's) both wait for it: proton
            # drops work on a session opened before its connection, and only the broker's
            # open says how many sessions it allows.
            if self._guest_answered():
                self._begin(ssn, up)
        elif ssn in self._end_when_begun:  # the guest ended it meanwhile (_end_upstream)
            self._end_when_begun.discard(ssn)
            lib.pn_session_close(ssn)

    def _sessions_unanswerable(self) -> bool:
        """A guest that reads nothing yet begins and ends sessions: each ended one waits for
        our end to be written before its channel is free (``_free_written``), and proton,
        once it holds ``max_sessions`` of them, finds no channel to answer the next begin
        and fails the connection with a framing error that says nothing of why. Cut such a
        guest first, saying why. (One that reads is not held to this: its ended sessions
        go as our output is written, however many it churns in one write.)"""
        held = _count(lib.pn_session_head(self.guest.connection, 0), lib.pn_session_next)
        limit = self._limits.max_sessions
        if held <= limit or self._written(self.guest.connection):
            return False
        self.violation(
            "amqp:resource-limit-exceeded",
            f"more than {limit} sessions held: the guest reads none of our answers",
        )
        return True

    def _guest_answered(self) -> bool:
        """Whether we have answered the guest's open (once the broker's came)."""
        return bool(lib.pn_connection_state(self.guest.connection) & _LOCAL_ACTIVE)

    def _begin_waiting(self) -> None:
        """Begin the guest's sessions that wait (for the broker's open, or for the broker to
        hold fewer of this guest's: ``_begin``), in the order the guest began them."""
        g = self.guest.connection
        for ssn, twin in list(self._sessions.items()):
            if ssn not in self._sessions:
                continue  # the upstream twin of one refused just now: freed (_begin)
            guest_side = lib.pn_session_connection(ssn) == g
            if guest_side and lib.pn_session_state(ssn) & _LOCAL_UNINIT:
                self._begin(ssn, twin)

    def _begin(self, ssn: Any, up: Any) -> None:
        """Begin the guest's session ``ssn`` upstream as ``up`` and answer the guest; or
        leave it waiting while the broker holds ``max_sessions`` of this guest's, counting
        those whose end it has not answered (``_begin_waiting`` comes back once it frees
        one); or end the guest's session when the broker allows no more (its channel-max).

        The guest's begin is answered without waiting for the broker's: a begin carries
        nothing end to end (windows are per hop), and proton sends nothing for a link, not
        even a refusal, on a session it has not begun. A broker that ends the session ends
        the guest's. Past the broker's channel-max proton's engine would not refuse the
        begin: it stops writing anything at all, which would hang every link of the guest.
        """
        broker = lib.pn_transport_get_channel_max(self.upstream.transport) + 1
        # Ours too: the guest's own channel-max holds only the sessions it has open, and its
        # end is answered at once, so a guest churning sessions at a broker slow to answer
        # our end made it hold ever more of them.
        held = self._upstream_sessions()
        if held < min(broker, self._limits.max_sessions):
            lib.pn_session_open(up)
            lib.pn_session_open(ssn)
            self._answer_ended_links(ssn)
            self._open_held(up)  # links the guest attached before the open
            return
        if held < broker:
            # The guest did nothing wrong: its ends were answered at once, the broker's
            # answers to ours are late. Its begin waits for them, as its attach would.
            return
        why = f"the broker allows {broker} sessions on a connection"
        self._log.warning("refused a session: %s", why)
        del self._sessions[ssn], self._sessions[up]
        for route in [r for r in self.routes.values() if lib.pn_link_session(r.link) == ssn]:
            self._drop_route(route)  # links attached before the broker's open
        self._free_session(up)
        lib.pn_session_open(ssn)
        self._answer_ended_links(ssn)
        set_condition(lib.pn_session_condition(ssn), "amqp:resource-limit-exceeded", why)
        lib.pn_session_close(ssn)

    def _upstream_sessions(self) -> int:
        """Sessions begun on the upstream connection and not yet freed: each holds one of
        the broker's channels until its end has been exchanged (counting those still
        ending keeps proton, which frees a channel as its end goes out, from ever running
        short)."""
        count = 0
        ssn = lib.pn_session_head(self.upstream.connection, 0)
        while ssn != ffi.NULL:
            if not lib.pn_session_state(ssn) & _LOCAL_UNINIT:
                count += 1
            ssn = lib.pn_session_next(ssn, 0)
        return count

    def _on_session_remote_close(self, ev: Any, from_guest: bool) -> None:
        ssn = lib.pn_event_session(ev)
        twin = self._sessions.pop(ssn, None)
        if twin is not None:
            self._sessions.pop(twin, None)
        cond = read_condition(lib.pn_session_remote_condition(ssn))
        if cond:
            who = "guest" if from_guest else "broker"
            self._log.info("%s ended a session%s", who, _fmt_cond(cond))
        for link, route in list(self.routes.items()):
            if lib.pn_link_session(link) in (ssn, twin):
                self._drop_route(route)
        if twin is not None:
            copy_condition(lib.pn_session_condition(twin), lib.pn_session_remote_condition(ssn))
            if from_guest:
                if self._end_upstream(twin):
                    twin = None  # freed: not to be touched again below
            else:
                if lib.pn_session_state(twin) & _LOCAL_UNINIT:
                    lib.pn_session_open(twin)  # an end must follow a begin
                if not lib.pn_session_state(twin) & _LOCAL_CLOSED:
                    lib.pn_session_close(twin)
        if lib.pn_session_state(ssn) & _LOCAL_UNINIT:
            lib.pn_session_open(ssn)
        if not lib.pn_session_state(ssn) & _LOCAL_CLOSED:
            lib.pn_session_close(ssn)
        self._free_session(ssn, ended=True)
        if twin is not None and lib.pn_session_state(twin) & _REMOTE_CLOSED:
            self._free_session(twin, ended=True)

    def _end_upstream(self, up: Any) -> bool:
        """The guest ended the session whose upstream twin is ``up``: end ``up`` too, once
        that is safe.

        The guest's begin was answered at once, so its end can come before the broker has
        answered ``up``'s begin. Proton forgets a session's channel as its end goes out, and
        a broker's begin arriving after that fails the whole upstream connection ("begin
        reply to unknown channel"), and every other link of the guest with it; Artemis, given
        the end first, even answers for channel 65535. So ``up`` is ended when the broker's
        begin arrives. One never begun (the broker's open had not come) was never written:
        it is freed, and the broker never hears of it: whether it was is returned, so the
        caller does not read the freed session again.
        """
        state = lib.pn_session_state(up)
        if state & _LOCAL_UNINIT:
            self._free_session(up)
            return True
        if state & _REMOTE_UNINIT:
            self._end_when_begun.add(up)
        elif not state & _LOCAL_CLOSED:
            lib.pn_session_close(up)
        return False

    def _free_session(self, ssn: Any, *, ended: bool = False) -> None:
        """Free a session ended both ways (``ended``: once our end of it is written, in
        ``_free_written``), or one never begun. Its links go with it, so none of them is
        awaited any more: no detach comes for them, and a freed link's address, once proton
        reuses it for a new link, would make that link's detach look like the awaited one.
        The end answered their detach: a namesake held behind one of them goes up now."""
        awaiting = self._awaiting_detach
        if awaiting:
            ended = {link for link in awaiting if lib.pn_link_session(link) == ssn}
            awaiting -= ended
            if ended:
                self._open_held()
        for link in self._ended_on(ssn):
            del self._ended_unbegun[link]
        if self._deferred_refusals:  # its links go with it: no refusal is owed them
            self._deferred_refusals = [
                (link, why) for link, why in self._deferred_refusals
                if lib.pn_link_session(link) != ssn
            ]  # fmt: skip
        if self._unwritten_links:  # freed with it
            self._unwritten_links = [
                link for link in self._unwritten_links if lib.pn_link_session(link) != ssn
            ]
        if ended:
            self._unwritten_sessions.append(ssn)
        else:
            lib.pn_session_free(ssn)

    def _answer_ended_links(self, ssn: Any) -> None:
        """The guest's session ``ssn`` has just been begun: answer the attach and the
        detach of its links that the guest ended before (``_ended_unbegun``). Of several
        under one name, only the first: proton would write all their attaches before all
        their detaches, which the guest's proton takes for a second link of that name; the
        next is answered once its namesake's detach is written (``_free_written``)."""
        for link in self._ended_on(ssn):
            if not self._namesake_unwritten(link):
                self._answer_ended(link)

    def _answer_ended(self, link: Any) -> None:
        """Answer the attach and the detach of ``link``, which the guest ended before we
        could (``_ended_unbegun``); it is freed once that output is produced
        (``_free_written``)."""
        detach_only = self._ended_unbegun.pop(link)
        lib.pn_link_open(link)
        (lib.pn_link_detach if detach_only else lib.pn_link_close)(link)
        self._unwritten_links.append(link)

    def _namesake_unwritten(self, glink: Any) -> bool:
        """Whether a namesake of the guest's link ``glink`` waits for our detach of it to be
        written: ``glink``'s attach may not be written before it (``_answer_guest_attach``)."""
        return any(_namesakes(link, glink) for link in self._unwritten_links)

    def _ended_on(self, ssn: Any) -> list[Any]:
        """The links of session ``ssn`` in ``_ended_unbegun``."""
        return [link for link in self._ended_unbegun if lib.pn_link_session(link) == ssn]

    def _free_written(self) -> None:
        """Free the links and sessions we have ended (``_drop_route``,
        ``_answer_ended_links``, ``_on_session_remote_close``) once the output just produced
        holds their detach or end. Proton produces none while its output buffer is full, so
        an engine's links and sessions wait for a round in which it had room.

        Freed before its detach or end is written, a link (or every link of a session) has
        its unsettled deliveries settled by proton on the wire: its peer, which detached or
        ended first, would get a disposition settled without an outcome that the far side
        never gave (to a guest, its message looked done; to a broker, a transactional
        transfer looked settled by the guest; RabbitMQ 4's code takes one for a protocol
        error). Freed after, they go without a word."""
        waiting = []
        for link in self._unwritten_links:
            if self._written(lib.pn_session_connection(lib.pn_link_session(link))):
                lib.pn_link_free(link)
            else:
                waiting.append(link)
        self._unwritten_links = waiting
        if self._unwritten_sessions:
            sessions = []
            for ssn in self._unwritten_sessions:
                if self._written(lib.pn_session_connection(ssn)):
                    lib.pn_session_free(ssn)
                else:
                    sessions.append(ssn)
            freed = len(sessions) < len(self._unwritten_sessions)
            self._unwritten_sessions = sessions
            if freed and self.upstream is not None and self._guest_answered():
                self._begin_waiting()  # the broker holds fewer of the guest's sessions
        if self._answers_held:  # attaches waiting for a namesake's detach to go out
            held, self._answers_held = self._answers_held, {}
            for ulink, detach_only in held.items():
                self._answer_guest_attach(ulink)
                if ulink in self._answers_held:
                    self._answers_held[ulink] = detach_only  # still held
                elif detach_only is not None and ulink in self.routes:  # the broker ended it
                    self._link_ended(ulink, False, detach_only)
        for link in [link for link in self._ended_unbegun if not _session_unbegun(link)]:
            if not self._namesake_unwritten(link):  # held behind a namesake's detach
                self._answer_ended(link)
        if self._deferred_refusals and self._guest_answered():
            self._answer_deferred_refusals()  # those held behind a namesake's detach

    def _written(self, conn: Any) -> bool:
        """Whether the output just produced on ``conn`` holds everything ended on it: not
        while its engine's output buffer is full (frames may hide behind it)."""
        engine = self.guest if conn == self.guest.connection else self.upstream
        return not engine.output_hidden(lib.pn_transport_pending(engine.transport))

    # -- links ---------------------------------------------------------------------------

    def _on_link_remote_open(self, ev: Any, from_guest: bool) -> None:
        link = lib.pn_event_link(ev)
        if from_guest:
            self._attach_upstream(link)
        else:
            self._answer_guest_attach(link)

    def _attach_upstream(self, glink: Any) -> None:
        up_ssn = self._sessions.get(lib.pn_link_session(glink))
        if up_ssn is None:
            return  # the session is ending; its end will detach this link
        if lib.pn_link_name(glink) == ffi.NULL:
            self.violation("amqp:invalid-field", "an attach without a link name")
            return
        if not self._attach_allowed():
            return
        request = _attach_request(glink)
        refusal = self._policy.check_attach(request)
        if refusal is not None:
            self._refuse(glink, refusal)
            return
        ulink = self._upstream_link(glink, up_ssn)
        groute = Route(glink, from_guest=True)
        # Sent by the guest: more unsettled is a violation. Sent to it: credit waits.
        groute.max_unsettled = self._limits.max_unsettled_per_link
        groute.policed = True
        if groute.receiving:  # the guest sends on it: the per-message limits apply
            groute.max_message = self._limits.max_message_size
            if request.address is None and not request.coordinator and self._policy.checks_relay:
                groute.relay = self._policy
        groute.address = _guest_address(glink)
        self.routes[glink] = groute
        self._pair(groute, ulink)
        # Else _begin opens it (proton drops a link opened before its session's begin), or
        # _open_held does, once the broker has detached the link's namesake or another.
        if lib.pn_session_state(up_ssn) & _LOCAL_ACTIVE and self._may_attach(ulink):
            lib.pn_link_open(ulink)
        self._log.debug("attach %s %s (%s)", groute.name, groute.direction, groute.address)

    def _upstream_link(self, glink: Any, up_ssn: Any) -> Any:
        """The upstream twin of the guest's link ``glink``, on ``up_ssn``, attaching with what
        the guest's attach said (its address mapped by the policy); not yet opened."""
        request = _attach_request(glink)
        name = lib.pn_link_name(glink)
        if lib.pn_link_is_receiver(glink):
            ulink = lib.pn_sender(up_ssn, name)
        else:
            ulink = lib.pn_receiver(up_ssn, name)
        copy_attach(ulink, glink, self.upstream, self.guest)
        if request.address is not None and not request.dynamic:
            mapped = self._policy.to_broker(request.address)
            if mapped != request.address:
                term = lib.pn_link_target(ulink) if request.sending else lib.pn_link_source(ulink)
                lib.pn_terminus_set_address(term, mapped.encode())
        return ulink

    def _namesake_attached(self, ulink: Any) -> bool:
        """Whether a link of ``ulink``'s name and role is still attached at the broker: one
        we detached, and whose detach the broker has not answered yet.

        The guest's detach is answered at once, so the guest may attach the link again
        under the same name (a JMS durable subscriber made again) before the broker has
        answered ours. AMQP allows one attached link of a name at a time, and proton's
        engine writes every attach of one output pass before every detach: with both in one
        pass (they came in one read, or the upstream output was full behind a large
        message) the broker got the new attach first. A proton broker then fails the whole
        connection ("link name already attached"), and Artemis never answers it. So the new
        link waits for that answer (``_open_held``)."""
        return any(_namesakes(link, ulink) for link in self._awaiting_detach)

    def _may_attach(self, ulink: Any) -> bool:
        """Whether the upstream link ``ulink`` may attach now: not while a namesake is still
        attached at the broker (``_namesake_attached``), nor while the broker holds
        ``max_links`` of this guest's links, counting those whose detach it has not
        answered yet. The guest detaches and attaches as it likes, its detach answered at
        once; counted only by its routes, a guest churning links at a broker slow to answer
        (or never answering) made it hold ever more of them. Held, the attach waits for an
        answer (``_open_held``), and the guest for its attach's."""
        if self._namesake_attached(ulink):
            return False
        return self._attached_upstream() + len(self._awaiting_detach) < self._limits.max_links

    def _attached_upstream(self) -> int:
        """Upstream links routed and attached (or attaching) at the broker."""
        return sum(
            1
            for r in self.routes.values()
            if not r.from_guest and not lib.pn_link_state(r.link) & _LOCAL_UNINIT
        )

    def _open_held(self, up_ssn: Any = None) -> None:
        """Attach the upstream links held (``_may_attach``), in the order the guest attached
        them, of session ``up_ssn`` just begun, or of any begun session once the broker has
        answered a detach of ours (or ended its session)."""
        room = self._limits.max_links - self._attached_upstream() - len(self._awaiting_detach)
        for route in list(self.routes.values()):
            if room <= 0:
                return
            link = route.link
            if route.from_guest or not lib.pn_link_state(link) & _LOCAL_UNINIT:
                continue
            ssn = lib.pn_link_session(link)
            begun = (
                ssn == up_ssn if up_ssn is not None else lib.pn_session_state(ssn) & _LOCAL_ACTIVE
            )
            if begun and not self._namesake_attached(link):
                lib.pn_link_open(link)
                room -= 1

    def _pair(self, groute: Route, ulink: Any) -> None:
        """Route the guest's link through ``ulink``."""
        uroute = Route(ulink, from_guest=False)
        groute.peer, uroute.peer = uroute, groute
        uroute.address = groute.address
        self.routes[ulink] = uroute

    def _attach_allowed(self) -> bool:
        """Count the guest's links and attach rate; end the connection over a limit.

        Every link the guest makes us hold counts, not only routed ones: those refused whose
        detach it has not answered, and those ended whose answer waits for it to read (it
        reads nothing, say). Counted by routes alone, a guest attaching to a forbidden
        address without ever answering, or churning links while reading nothing, made the
        connector hold as many as it attached (some 2 KB each), and the lists of them grew
        dearer to walk for every guest on the loop."""
        lim = self._limits
        # Less one: the link being attached.
        held = _count(lib.pn_link_head(self.guest.connection, 0), lib.pn_link_next) - 1
        if held >= lim.max_links:
            self.violation("amqp:resource-limit-exceeded", f"more than {lim.max_links} links")
            return False
        now = time.monotonic()
        self._attach_tokens = min(
            float(lim.attach_burst),
            self._attach_tokens + (now - self._attach_time) * lim.attach_rate,
        )
        self._attach_time = now
        if self._attach_tokens < 1:
            self.violation(
                "amqp:resource-limit-exceeded",
                f"attaching faster than {lim.attach_rate:g} links/s",
            )
            return False
        self._attach_tokens -= 1
        return True

    def _refuse(self, glink: Any, refusal: tuple[str, str]) -> None:
        """Answer an attach with a null terminus, then detach it with the reason.

        Deferred (``_deferred_refusals``) until our open, which waits for the broker's; and
        while our answer to the guest's detach of a namesake is unwritten, since proton
        would write this attach before that detach (``_answer_guest_attach``)."""
        if not self._guest_answered() or self._namesake_unwritten(glink):
            self._deferred_refusals.append((glink, refusal))
            return
        condition, description = refusal
        lib.pn_link_open(glink)
        set_condition(lib.pn_link_condition(glink), condition, description)
        lib.pn_link_close(glink)
        self._log.warning(
            "refused attach of %s to %s: %s",
            ffi.string(lib.pn_link_name(glink)).decode(errors="replace"),
            _guest_address(glink),
            description,
        )

    def _answer_deferred_refusals(self) -> None:
        """Refuse the attaches ``_refuse`` deferred, unless their session has ended (which
        freed them) or they must wait longer."""
        deferred, self._deferred_refusals = self._deferred_refusals, []
        for glink, refusal in deferred:
            if not lib.pn_session_state(lib.pn_link_session(glink)) & _LOCAL_CLOSED:
                self._refuse(glink, refusal)

    def _answer_guest_attach(self, ulink: Any) -> None:
        uroute = self.routes.get(ulink)
        if uroute is None or uroute.peer is None:
            return
        glink = uroute.peer.link
        if self._namesake_unwritten(glink):
            # The guest attached this name again before our answer to its detach of the
            # last one could be written (its output was full): proton writes every attach
            # of one pass before every detach, and the guest's proton would take this
            # answer for a second link of that name and fail the connection. Answered once
            # that detach is out (``_free_written``).
            self._answers_held.setdefault(ulink, None)
            return
        copy_attach(glink, ulink, self.guest, self.upstream)
        for term in (lib.pn_link_source(glink), lib.pn_link_target(glink)):
            addr = lib.pn_terminus_get_address(term)
            if addr != ffi.NULL:
                broker_name = ffi.string(addr).decode(errors="replace")
                guest_name = self._policy.to_guest(broker_name)
                if guest_name != broker_name:
                    lib.pn_terminus_set_address(term, guest_name.encode())
        if lib.pn_link_is_sender(glink) and lib.pn_terminus_is_dynamic(
            lib.pn_link_remote_source(glink)
        ):
            addr = lib.pn_terminus_get_address(lib.pn_link_remote_source(ulink))
            if addr != ffi.NULL:
                uroute.address = uroute.peer.address = ffi.string(addr).decode(errors="replace")
        lib.pn_link_open(glink)
        sender = uroute if not uroute.receiving else uroute.peer
        credit.sync_credit(sender)

    def _on_link_remote_close(self, ev: Any, from_guest: bool) -> None:
        link = lib.pn_event_link(ev)
        detach_only = lib.pn_event_type(ev) == lib.PN_LINK_REMOTE_DETACH
        if not from_guest and link in self._answers_held:
            # Its attach's answer waits for a namesake's detach to be written: so does its
            # detach, passed on once that attach is (``_free_written``).
            self._answers_held[link] = detach_only
            return
        self._link_ended(link, from_guest, detach_only)

    def _link_ended(self, link: Any, from_guest: bool, detach_only: bool) -> None:
        """The peer on ``link``'s side detached it (``detach_only``) or closed it."""
        if link in self._awaiting_detach:
            # We already closed this one on behalf of its twin; this is the answer.
            self._awaiting_detach.discard(link)
            lib.pn_link_free(link)
            self._open_held()
            return
        if from_guest and self._deferred_refusals:
            # Refused, but the refusal waits: the answer to this detach carries the attach.
            self._deferred_refusals = [(r, why) for r, why in self._deferred_refusals if r != link]
        route = self.routes.get(link)
        end = lib.pn_link_detach if detach_only else lib.pn_link_close
        if route is not None and route.peer is not None:
            twin = route.peer.link
            tstate = lib.pn_link_state(twin)
            if not from_guest and tstate & _LOCAL_UNINIT:
                lib.pn_link_open(twin)  # refused: the guest gets an attach, then the detach
            copy_condition(lib.pn_link_condition(twin), lib.pn_link_remote_condition(link))
            # An upstream twin never attached (before the broker's open, or held behind
            # its namesake's detach) is freed unsent in _drop_route: ended, it would go up.
            if not tstate & (_LOCAL_CLOSED | (_LOCAL_UNINIT if from_guest else 0)):
                end(twin)
            cond = read_condition(lib.pn_link_remote_condition(link))
            if cond:
                who = "guest" if from_guest else "broker"
                self._log.info("%s detached link %s%s", who, route.name, _fmt_cond(cond))
        # Our answer to its attach must wait: for its session's begin, or for our answer to
        # a namesake's detach to be written (``_answer_guest_attach``).
        waits = _session_unbegun(link) or (
            lib.pn_link_state(link) & _LOCAL_UNINIT and self._namesake_unwritten(link)
        )
        if from_guest and waits:
            self._ended_unbegun[link] = detach_only
        else:
            if lib.pn_link_state(link) & _LOCAL_UNINIT:
                lib.pn_link_open(link)
            if not lib.pn_link_state(link) & _LOCAL_CLOSED:
                end(link)
        if route is not None:
            self._drop_route(route, ended=link)
        elif lib.pn_link_state(link) & _LOCAL_CLOSED and link not in self._ended_unbegun:
            # Routed nowhere and ended both ways: a link we refused (policy, limits), its
            # detach answered. Nothing else holds it; kept, every refusal would stay for the
            # session's life.
            self._unwritten_links.append(link)

    def _drop_route(self, route: Route, ended: Any = None) -> None:
        """Forget a link pair; free each link once both its ends are closed, or detached:
        ``ended`` is a link whose peer's detach just came and that we have ended too (a
        detach without closing leaves no state that tells it apart later)."""
        forget_route(route)
        for r in (route, route.peer):
            if r is None:
                continue
            upstream = not r.from_guest
            if not r.receiving and upstream not in self._uncounted:
                # Held beyond the credit our sender has (its credit is net of what it
                # holds): the link is going, so these never go, and were not routed.
                self._uncount(upstream, max(0, -lib.pn_link_credit(r.link)))
            self.routes.pop(r.link, None)
            self._answers_held.pop(r.link, None)  # gone, it is owed no answer
            if r.link in self._ended_unbegun:
                continue  # answered and freed once its session is begun
            state = lib.pn_link_state(r.link)
            if upstream and state & _LOCAL_UNINIT:
                # Never sent: our twin of a link the guest ended before the broker's open,
                # or before its namesake's detach was answered. Kept, it would take the
                # broker's answer to a later attach under the same name.
                lib.pn_link_free(r.link)
            elif r.link == ended or (state & _LOCAL_CLOSED and state & _REMOTE_CLOSED):
                self._unwritten_links.append(r.link)  # ended both ways: once our detach is out
            else:
                # Still waiting for the far end's detach; free it when that arrives.
                self._awaiting_detach.add(r.link)

    # -- inspection ----------------------------------------------------------------------

    def session_count(self) -> int:
        """Sessions the guest has open through us."""
        return sum(
            1 for ssn in self._sessions if lib.pn_session_connection(ssn) == self.guest.connection
        )

    def guest_routes(self) -> list[Route]:
        """The guest-side half of every routed link pair."""
        return [r for r in self.routes.values() if r.from_guest and r.peer is not None]


def _copy_capabilities(dst: Any, src: Any) -> None:
    """The open's offered and desired capabilities, from ``src``'s peer to ``dst``."""
    copy_data(
        lib.pn_connection_offered_capabilities(dst),
        lib.pn_connection_remote_offered_capabilities(src),
    )
    copy_data(
        lib.pn_connection_desired_capabilities(dst),
        lib.pn_connection_remote_desired_capabilities(src),
    )


def _namesakes(a: Any, b: Any) -> bool:
    """Whether links ``a`` and ``b`` of one connection have one name and one role: one link
    as far as the peer is concerned (AMQP 1.0 §2.6.1)."""
    return (
        lib.pn_link_is_sender(a) == lib.pn_link_is_sender(b)
        and lib.pn_session_connection(lib.pn_link_session(a))
        == lib.pn_session_connection(lib.pn_link_session(b))
        and ffi.string(lib.pn_link_name(a)) == ffi.string(lib.pn_link_name(b))
    )


def _session_unbegun(link: Any) -> bool:
    """Whether ``link``'s session has not been begun on our side yet."""
    return bool(lib.pn_session_state(lib.pn_link_session(link)) & _LOCAL_UNINIT)


def _close_connection(conn: Any) -> None:
    if not lib.pn_connection_state(conn) & _LOCAL_CLOSED:
        lib.pn_connection_close(conn)


def _attach_request(glink: Any) -> AttachRequest:
    """What a guest link asks for: its target when the guest sends, its source otherwise."""
    sending = bool(lib.pn_link_is_receiver(glink))
    term = lib.pn_link_remote_target(glink) if sending else lib.pn_link_remote_source(glink)
    addr = lib.pn_terminus_get_address(term)
    return AttachRequest(
        address=ffi.string(addr).decode(errors="replace") if addr != ffi.NULL else None,
        sending=sending,
        dynamic=bool(lib.pn_terminus_is_dynamic(term)),
        coordinator=lib.pn_terminus_get_type(term) == lib.PN_COORDINATOR,
    )


def _guest_address(glink: Any) -> str | None:
    """The address to show for a guest link in logs and status."""
    req = _attach_request(glink)
    if req.coordinator:
        return "(coordinator)"
    if req.dynamic:
        return "(dynamic)"
    return req.address


def _read_map(data_ptr: Any) -> dict:
    data = Data(data_ptr)
    data.rewind()
    if not data.next():
        return {}
    value = data.get_object()
    return dict(value) if isinstance(value, dict) else {}


def _write_map(data_ptr: Any, value: dict) -> None:
    data = Data(data_ptr)
    data.clear()
    data.put_object(value)


def _fmt_cond(cond: tuple[str, str] | None) -> str:
    return f": {cond[0]}: {cond[1]}" if cond else ""


def _count(first: Any, next_: Callable[[Any, int], Any]) -> int:
    """How many sessions or links a proton list holds, from ``first`` (its head)."""
    count, item = 0, first
    while item != ffi.NULL:
        count += 1
        item = next_(item, 0)
    return count


# The guest's endpoint events that go unanswered once we have closed its connection.
_GUEST_ENDPOINTS = frozenset(
    {
        lib.PN_SESSION_REMOTE_OPEN,
        lib.PN_SESSION_REMOTE_CLOSE,
        lib.PN_LINK_REMOTE_OPEN,
        lib.PN_LINK_REMOTE_CLOSE,
        lib.PN_LINK_REMOTE_DETACH,
    }
)
_HANDLERS: dict[int, Callable[[Router, Any, bool], None]] = {
    lib.PN_CONNECTION_REMOTE_OPEN: Router._on_connection_remote_open,
    lib.PN_CONNECTION_REMOTE_CLOSE: Router._on_connection_remote_close,
    lib.PN_SESSION_REMOTE_OPEN: Router._on_session_remote_open,
    lib.PN_SESSION_REMOTE_CLOSE: Router._on_session_remote_close,
    lib.PN_LINK_REMOTE_OPEN: Router._on_link_remote_open,
    lib.PN_LINK_REMOTE_CLOSE: Router._on_link_remote_close,
    lib.PN_LINK_REMOTE_DETACH: Router._on_link_remote_close,
    lib.PN_TRANSPORT_ERROR: Router._on_transport_error,
    lib.PN_TRANSPORT_CLOSED: Router._on_transport_closed,
}
