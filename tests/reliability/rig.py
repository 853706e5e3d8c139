"""The routing core fed raw bytes as its guest: the rig for fuzzing and bad-input tests.

``tests.support.routing.Harness`` drives the router with a well-behaved proton client. Here
the guest is replaced by a byte source (``RawGuest``) so a test can push anything at the
router's guest engine, and the scripted broker is extended (``FeedingHarness``) to grant
credit, accept what arrives and send one message per credit, so a recorded stream exercises
every performative in both directions.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cproton_ffi import lib
from proton import (
    UNDESCRIBED,
    Array,
    Data,
    Delivery,
    Described,
    Endpoint,
    Event,
    Message,
    symbol,
    ulong,
)

from connector.channels.framing import HEADER_SIZE, HeaderScanner
from connector.routing.engine import Engine, read_condition
from connector.routing.frames import FrameWriter, LinkExtras
from connector.routing.router import RouterState
from tests.support.routing import Harness

# Credit the scripted broker grants each guest sender. Small, so a recorded stream holds
# several flow frames.
BROKER_CREDIT = 10
# A bound on pump rounds per feed. One round moves everything that can move; a stream that
# needs more than this many rounds to settle is a livelock, which is what the fuzz looks for.
PUMP_ROUNDS = 200
# The guest engine's idle timeout in the rig (ms): the clock is simulated, so any value works;
# it is how a guest that stopped mid-frame is ended, as in the daemon.
IDLE_TIMEOUT_MS = 60_000
# Largest frame the rig's guest engine accepts: the connector's default (connector/limits.py).
MAX_FRAME = 65536
CHANNEL_MAX = 31


class _RawTransport:
    """Duck-types the part of ``proton.Transport`` the harness moves the router's output to.
    The guest's bytes do not go this way: ``feed`` hands them to ``Router.feed_guest``, as
    the daemon's channel does."""

    def __init__(self) -> None:
        self.received = bytearray()  # what the router wrote to the guest

    def capacity(self) -> int:
        return 1 << 30

    def pending(self) -> int:
        return 0

    def push(self, data: bytes) -> None:
        self.received += data


class RawGuest:
    """A guest that is only a byte stream: its input is what the test feeds."""

    def __init__(self) -> None:
        self.transport = _RawTransport()
        self.events: list[Event] = []

    def collect(self) -> list[Event]:
        return []


class FeedingHarness(Harness):
    """The harness whose broker also grants credit, accepts transfers and feeds receivers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tags = itertools.count()
        self.broker_received = 0

    def _broker_default(self, ev: Event) -> None:
        super()._broker_default(ev)
        if self.broker_hook is not None:
            return
        name = ev.type.name
        if name == "PN_LINK_REMOTE_OPEN" and ev.link.is_receiver:
            ev.link.flow(BROKER_CREDIT)
        elif name == "PN_DELIVERY":
            dlv = ev.delivery
            link = dlv.link
            if link.is_receiver and not dlv.partial and link.current == dlv:
                link.recv(dlv.pending)
                link.advance()
                dlv.update(Delivery.ACCEPTED)
                dlv.settle()
                self.broker_received += 1
                if link.credit < BROKER_CREDIT // 2:
                    link.flow(BROKER_CREDIT - link.credit)
            elif link.is_sender and dlv.remote_state:
                dlv.settle()
        elif name == "PN_LINK_FLOW" and ev.link.is_sender:
            link = ev.link
            while link.credit > 0 and link.state & Endpoint.LOCAL_ACTIVE:
                link.delivery(f"b{next(self._tags)}")
                link.send(Message(body="from-broker").encode())
                link.advance()


def raw_rig() -> tuple[FeedingHarness, RawGuest]:
    """A harness whose guest is raw bytes, with the connector's limits on the guest engine."""
    h = FeedingHarness()
    guest = RawGuest()
    h.guest = guest  # type: ignore[assignment]
    h.router.guest.set_limits(
        max_frame=MAX_FRAME, channel_max=CHANNEL_MAX, idle_timeout_ms=IDLE_TIMEOUT_MS
    )
    return h, guest


@dataclass
class Outcome:
    """How a raw guest connection ended, as a test asserts on it."""

    ended: bool  # the router ended it (error or close) rather than waiting for more bytes
    condition: tuple[str, str] | None  # the guest engine's transport error, if any
    close_condition: tuple[str, str] | None  # the condition on the close sent to the guest
    router_state: RouterState
    reply: bytes = field(repr=False, default=b"")


def feed(h: FeedingHarness, data: bytes, chunk: int = 0) -> None:
    """Push ``data`` through the router in ``chunk``-sized reads (0: one read)."""
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        h.router.feed_guest(data[i : i + step])
        h.pump(PUMP_ROUNDS)


def outcome(h: FeedingHarness, guest: RawGuest) -> Outcome:
    """What the router did with the guest connection so far."""
    g = h.router.guest
    state = lib.pn_connection_state(g.connection)
    closed_by_us = bool(state & lib.PN_LOCAL_CLOSED)
    return Outcome(
        ended=g.condition() is not None or closed_by_us,
        condition=g.condition(),
        close_condition=read_condition(lib.pn_connection_condition(g.connection)),
        router_state=h.router.state,
        reply=bytes(guest.transport.received),
    )


# The condition the daemon's channel ends a connection with when no open came in time
# (connector/channel.py, Channel._open_timeout).
OPEN_TIMEOUT = ("amqp:resource-limit-exceeded", "no AMQP open in time (rig)")


def expire_timers(h: FeedingHarness) -> None:
    """Let the daemon's timers fire: past the guest engine's idle timeout (proton's clock)
    and past the open timeout, which the channel enforces by ending a connection that has
    not opened (no upstream yet) with ``router.violation``."""
    eng: Engine = h.router.guest
    eng.tick(1)
    eng.tick(1 + 3 * IDLE_TIMEOUT_MS)
    h.pump(PUMP_ROUNDS)
    if h.router.upstream is None and not outcome(h, h.guest).ended:  # type: ignore[arg-type]
        h.router.violation(*OPEN_TIMEOUT)
        h.pump(PUMP_ROUNDS)


def free_rig(h: FeedingHarness) -> None:
    """Free the router's proton engines, as the channel does when a connection ends, so a
    long fuzz run's memory stays flat."""
    h.router.guest.free()
    for engine in h.upstreams:
        engine.free()


class _Tap:
    """Wraps a proton Transport and records every byte popped from its output."""

    def __init__(self, transport: Any) -> None:
        self._t = transport
        self.out = bytearray()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def pop(self, n: int) -> None:
        self.out += self._t.peek(n)
        self._t.pop(n)


def record_stream(script: Callable[[Harness], None], *, sasl: bool = False) -> bytes:
    """Run ``script`` with a real proton guest client and return the bytes it sent."""
    h = FeedingHarness(sasl=sasl)
    tap = _Tap(h.guest.transport)
    h.guest.transport = tap  # type: ignore[assignment]
    script(h)
    h.pump()
    return bytes(tap.out)


# The attach fields proton cannot send, as a Qpid JMS guest would send them.
LINK_EXTRAS = LinkExtras(
    offered=Array(UNDESCRIBED, Data.SYMBOL, symbol("SHARED-SUBS")),
    desired=Array(UNDESCRIBED, Data.SYMBOL, symbol("DELAYED_DELIVERY")),
    default_outcome=Described(ulong(0x26), []),
)


def with_link_extras(stream: bytes, links: list[tuple[str, bool]]) -> bytes:
    """``stream`` with the attach frames of ``links`` (name, receiver?) carrying
    ``LINK_EXTRAS``, written by the connector's own attach writer."""
    writer = FrameWriter()
    for key in links:
        writer.complete(key, LINK_EXTRAS)
    out = bytearray()
    view = memoryview(stream)
    while view:
        n = writer.sendable(view, lambda size, whole=view: bytes(whole[:size]))
        edit = None if n else writer.head_edit()
        if edit is not None:
            n, new = edit
            out += new
        elif n:
            out += view[:n]
        else:
            break
        view = view[n:]
        writer.popped(n)
    return bytes(out)


def full_session(h: Harness) -> None:
    """Every performative a guest sends: open, begin, attach both ways, transfer, flow,
    disposition, detach, end, close."""
    conn = h.open_guest("recorded-guest")
    ssn = conn.session()
    ssn.open()
    snd = ssn.sender("rec-snd")
    snd.target.address = "q-rec"
    snd.open()
    rcv = ssn.receiver("rec-rcv")
    rcv.source.address = "q-rec"
    rcv.open()
    h.pump()
    sent = []
    for i in range(3):
        sent.append(snd.delivery(f"t{i}"))
        snd.send(Message(body=f"m{i}", durable=True).encode())
        snd.advance()
    rcv.flow(2)
    h.pump()
    while rcv.current is not None:
        dlv = rcv.current
        rcv.recv(dlv.pending)
        rcv.advance()
        dlv.update(Delivery.ACCEPTED)
        dlv.settle()
    h.pump()
    for dlv in sent:
        dlv.settle()
    snd.close()
    rcv.close()
    ssn.close()
    conn.close()


class GoodGuest:
    """A well-behaved guest on its own router, sending one message at a time, to show that a
    hostile guest's connection does not disturb another one in the same process."""

    def __init__(self) -> None:
        self.h = FeedingHarness()
        conn = self.h.open_guest("good-guest")
        ssn = conn.session()
        ssn.open()
        self.snd = ssn.sender("good-snd")
        self.snd.target.address = "q-good"
        self.snd.open()
        self.h.pump()
        self.sent = 0

    def send_one(self) -> None:
        """Send one message and require it accepted by the broker and settled end to end."""
        dlv = self.snd.delivery(f"g{self.sent}")
        self.snd.send(Message(body=self.sent).encode())
        self.snd.advance()
        self.sent += 1
        self.h.pump(PUMP_ROUNDS)
        if dlv.remote_state != Delivery.ACCEPTED:
            raise AssertionError(f"good message {self.sent} not accepted: {dlv.remote_state}")
        dlv.settle()
        self.h.pump(PUMP_ROUNDS)
        if self.h.broker_received != self.sent:
            raise AssertionError(f"broker got {self.h.broker_received} of {self.sent}")
        # This guest lives across the whole fuzz run: drop the events it has seen, or their
        # proton objects (and every delivery) stay referenced and memory grows per input.
        for side in (self.h.guest, self.h.broker):
            side.events.clear()


# What the fuzz saw over the run, for the report: how connections ended, known bugs hit.
STATS: collections.Counter[str] = collections.Counter()


def run_hostile(data: bytes, chunk: int, good: GoodGuest | None = None) -> Outcome | None:
    """Feed ``data`` as a guest in ``chunk``-byte reads, interleaved with a good guest's
    messages, and check the properties every input must keep:

    - as in the daemon, bytes before a protocol header go to the header scanner, which
      discards them (None is returned when no header ever came: nothing was started);
    - nothing raises out of the router or engine, and every feed settles within
      ``PUMP_ROUNDS`` (no livelock);
    - the connection either has ended (error condition or close) or, once the guest has
      been silent past the idle timeout, ends then: never silently stuck;
    - the good guest's messages all get through.
    """
    h = raw_rig()
    try:
        result = _run_hostile(h, data, chunk, good)
    finally:
        free_rig(h[0])
    if result is None:
        STATS["no protocol header: all discarded"] += 1
    else:
        cond = result.condition or result.close_condition
        STATS[f"ended: {cond[0] if cond else 'closed cleanly'}"] += 1
    return result


def _run_hostile(
    rig: tuple[FeedingHarness, RawGuest], data: bytes, chunk: int, good: GoodGuest | None
) -> Outcome | None:
    h, guest = rig
    scanner = HeaderScanner()
    header = None
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        piece = data[i : i + step]
        if header is None:
            found = scanner.feed(piece)
            if found is None:
                continue
            header = found.header
            piece = found.header + found.rest
        h.router.feed_guest(piece)
        h.pump(PUMP_ROUNDS)
        if good is not None:
            good.send_one()
    if header is None:
        if scanner.discarded > len(data) or scanner.discarded < len(data) - HEADER_SIZE:
            raise AssertionError(f"{scanner.discarded} of {len(data)} bytes counted discarded")
        return None
    result = outcome(h, guest)
    if not result.ended:
        expire_timers(h)
        result = outcome(h, guest)
    if not result.ended:
        raise AssertionError(f"guest connection neither ended nor timed out: {result}")
    return result
