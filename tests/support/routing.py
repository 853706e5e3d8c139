"""An in-memory harness for the sans-IO routing core: a guest, the router, a scripted broker.

No sockets: bytes are moved between proton transports in memory. The guest and the broker
are plain proton objects that each test drives, so a test can exercise fields and orders
that no real broker produces (a modified outcome with annotations, an attach refused by
ending the session, a drain answered late) and check what crosses the router.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cproton_ffi import lib
from proton import Collector, Connection, Delivery, Event, Link, Message, Session, Transport

from connector.limits import GuestLimits
from connector.routing.engine import Engine
from connector.routing.router import Counters, Router

IDENTITY = {
    "qpid-virtio.guest": "vm1",
    "qpid-virtio.port": "org.qpid.amqp.0",
    "qpid-virtio.channel": "/dev/pts/9",
}


class _Log:
    """A logger stand-in that records what the router said."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _rec(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args if args else msg)

    debug = info = warning = error = _rec


class Side:
    """A proton peer (guest client or scripted broker) with its own collector."""

    def __init__(self, *, server: bool) -> None:
        self.transport = Transport(Transport.SERVER if server else Transport.CLIENT)
        self.connection = Connection()
        self.collector = Collector()
        self.connection.collect(self.collector)
        self.transport.bind(self.connection)
        if server:
            self.transport.require_auth(False)
        self.events: list[Event] = []

    def collect(self) -> list[Event]:
        """Move pending events into ``events`` and return the new ones."""
        new = []
        while True:
            ev = self.collector.peek()
            if ev is None:
                break
            new.append(ev)
            self.collector.pop()
        self.events.extend(new)
        return new

    def types(self) -> list[str]:
        """Names of the events seen so far."""
        return [ev.type.name for ev in self.events]

    def trace(self) -> list[str]:
        """From now on, the frames this side's proton sends and receives, as its frame
        tracer writes them (``<-`` for those it receives)."""
        lines: list[str] = []
        self.transport.tracer = lambda _t, line: lines.append(line)
        self.transport.trace(Transport.TRACE_FRM)
        return lines


def move_bytes(src: Any, dst: Any) -> int:
    """Move pending output of one transport (proton Transport or Engine) into another,
    no more than the receiving proton Transport has room for."""
    room = 1 << 30 if isinstance(dst, Engine) else dst.capacity()
    if room <= 0:
        return 0
    if isinstance(src, Engine):
        out = bytes(src.peek_output()[:room])
        if out:
            src.pop_output(len(out))
    else:
        n = min(src.pending(), room)
        if n <= 0:
            return 0
        out = src.peek(n)
        src.pop(n)
    if out:
        dst.push(out)
    return len(out)


def pump(a: Any, b: Any) -> None:
    """Move bytes both ways between two transports until both are quiet."""
    while move_bytes(a, b) + move_bytes(b, a):
        pass


class Harness:
    """guest (client) <-> Router(guest engine | upstream engine) <-> broker (server)."""

    def __init__(
        self,
        *,
        broker_answers_open: bool = True,
        sasl: bool = False,
        limits: GuestLimits | None = None,
        guest: bool = True,
    ) -> None:
        # guest=False: the test writes the guest's bytes itself (router.guest.push) and
        # finds what the router wrote back in ``written``.
        self.guest = Side(server=False) if guest else None
        self.written = bytearray()
        if sasl:
            self.guest.transport.sasl().allowed_mechs("ANONYMOUS")
        self.broker = Side(server=True)
        self.broker_answers_open = broker_answers_open
        self.log = _Log()
        self.counters = Counters()
        engine = Engine(server=True)
        engine.configure_sasl("ANONYMOUS EXTERNAL")
        self.upstreams: list[Engine] = []
        self.router = Router(
            engine,
            make_upstream=self._make_upstream,
            identity_properties=IDENTITY,
            log=self.log,  # type: ignore[arg-type]
            counters=self.counters,
            limits=limits,
        )
        self.broker_hook: Callable[[Event], None] | None = None

    def _make_upstream(self) -> Engine:
        engine = Engine(server=False)
        self.upstreams.append(engine)
        return engine

    def pump(self, rounds: int = 50) -> None:
        """Move bytes and process events until nothing moves."""
        for _ in range(rounds):
            moved = 0
            if self.guest is not None:
                moved += move_bytes(self.guest.transport, self.router.guest)
                moved += move_bytes(self.router.guest, self.guest.transport)
            else:
                out = self.router.guest.peek_output()
                self.written.extend(out)
                moved += len(out)
                self.router.guest.pop_output(len(out))
            self.router.process()
            up = self.router.upstream
            if up is not None and not self.router.upstream_dead:
                moved += move_bytes(up, self.broker.transport)
                moved += move_bytes(self.broker.transport, up)
            self.router.process()
            for ev in self.broker.collect():
                self._broker_default(ev)
            if self.guest is not None:
                self.guest.collect()
            if not moved:
                return
        raise AssertionError(f"the harness did not settle in {rounds} rounds")

    def hops(self, *hops: str) -> None:
        """Move what is pending along ``hops``, one at a time and in that order, each with
        what it sets off: "guest>" the guest's frames into the router, ">guest" the
        router's to the guest, "broker>" and ">broker" the same for the broker. A side whose
        frames were written first (``transport.pending()`` writes them) has them cross
        what the other side sends meanwhile."""
        for hop in hops:
            up = self.router.upstream
            if hop == "guest>":
                move_bytes(self.guest.transport, self.router.guest)
                self.router.process()
            elif hop == ">guest":
                move_bytes(self.router.guest, self.guest.transport)
                self.guest.collect()
            elif hop == "broker>":
                move_bytes(self.broker.transport, up)
                self.router.process()
            elif hop == ">broker":
                move_bytes(up, self.broker.transport)
                for ev in self.broker.collect():
                    self._broker_default(ev)
            else:
                raise ValueError(f"no such hop: {hop}")

    def _broker_default(self, ev: Event) -> None:
        """A minimal broker: answers open, begin and attach unless the test hooks in."""
        if self.broker_hook is not None:
            self.broker_hook(ev)
            return
        name = ev.type.name
        if name == "PN_CONNECTION_REMOTE_OPEN" and self.broker_answers_open:
            ev.connection.offered_capabilities = "ANONYMOUS-RELAY"
            ev.connection.properties = {"product": "scripted-broker"}
            ev.connection.open()
        elif name == "PN_SESSION_REMOTE_OPEN":
            ev.session.open()
        elif name == "PN_LINK_REMOTE_OPEN":
            link = ev.link
            link.source.copy(link.remote_source)
            link.target.copy(link.remote_target)
            link.open()

    def answering(self, answer: Callable[[Event], None], *events: str) -> None:
        """Have the scripted broker answer ``events`` (proton event types' names) with
        ``answer``, and everything else as it does by default."""

        def hook(ev: Event) -> None:
            if ev.type.name in events:
                answer(ev)
            else:
                self.broker_hook = None
                self._broker_default(ev)
                self.broker_hook = hook

        self.broker_hook = hook

    def open_guest(self, container: str = "guest-app") -> Connection:
        """Open the guest's connection and pump until the router answered."""
        conn = self.guest.connection
        conn.container = container
        conn.open()
        self.pump()
        return conn

    def guest_session(self) -> tuple[Connection, Session]:
        """Open the guest's connection and one session, pumped until answered."""
        conn = self.open_guest()
        ssn = conn.session()
        ssn.open()
        self.pump()
        return conn, ssn

    def pipelined(self, name: str, address: str | None) -> tuple[Session, Link]:
        """Open the guest's connection, a session and a sender to ``address`` all before
        anything is answered, as proton clients write them (in one write), then pump;
        return the session and the sender."""
        conn = self.guest.connection
        conn.open()
        ssn = conn.session()
        ssn.open()
        snd = attach(ssn, name, address)
        self.pump()
        return ssn, snd

    def sender(
        self, name: str, address: str | None, *, credit: int = 0
    ) -> tuple[Connection, Link, Link]:
        """Open a guest session with a sender to ``address`` (None: the anonymous relay),
        to which the broker grants ``credit``; return the guest's connection, its sender,
        and the broker's end of the link."""
        conn, snd, brcv = self._attached(name, address, sending=True)
        if credit:
            brcv.flow(credit)
            self.pump()
        return conn, snd, brcv

    def receiver(self, name: str, address: str) -> tuple[Connection, Link, Link]:
        """Open a guest session with a receiver from ``address``; return the guest's
        connection, its receiver, and the broker's end of the link (its sender)."""
        return self._attached(name, address, sending=False)

    def _attached(
        self, name: str, address: str | None, *, sending: bool
    ) -> tuple[Connection, Link, Link]:
        """What sender() and receiver() share: a guest session with one link, answered."""
        conn, ssn = self.guest_session()
        link = attach(ssn, name, address, sending=sending)
        self.pump()
        return conn, link, self.broker_link(name)

    def broker_link(self, name: str) -> Link:
        """The broker's end of the link the guest attached as ``name`` (the latest)."""
        for ev in reversed(self.broker.events):
            if ev.type.name == "PN_LINK_REMOTE_OPEN" and ev.link.name == name:
                return ev.link
        raise AssertionError(f"the broker never saw link {name}")


def attach(ssn: Session, name: str, address: str | None, *, sending: bool = True) -> Link:
    """Attach a guest link (a sender to ``address``, or a receiver from it); not pumped."""
    if sending:
        link = ssn.sender(name)
        link.target.address = address
    else:
        link = ssn.receiver(name)
        link.source.address = address
    link.open()
    return link


def send_message(link: Link, tag: str, body: Any, *, to: str | None = None) -> Delivery:
    """Send one whole message with ``body`` (and the ``to`` address, when given) on
    ``link``, the guest's or the broker's; not pumped. Returns its delivery."""
    dlv = link.delivery(tag)
    link.send(Message(address=to, body=body).encode())
    link.advance()
    return dlv


def receive_all(link: Link) -> list[tuple[Delivery, bytes]]:
    """Take every whole message that has arrived on ``link``: (delivery, its bytes) each."""
    got = []
    while link.current is not None and not link.current.partial:
        dlv = link.current
        got.append((dlv, link.recv(dlv.pending)))
        link.advance()
    return got


def link_count(conn: Any) -> int:
    """Link objects proton still holds on a connection (a proton pointer)."""
    return _held(lib.pn_link_head(conn, 0), lib.pn_link_next)


def session_count(conn: Any) -> int:
    """Session objects proton still holds on a connection (a proton pointer)."""
    return _held(lib.pn_session_head(conn, 0), lib.pn_session_next)


def _held(item: Any, next_: Callable[[Any, int], Any]) -> int:
    count = 0
    while item:
        count += 1
        item = next_(item, 0)
    return count
