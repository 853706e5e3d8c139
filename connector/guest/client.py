"""A small blocking AMQP client over a file descriptor or a virtio-serial port.

Built on :class:`~connector.guest.driver.Driver`, it is both a convenience for guest
scripts and the project's simulated guest in host-side tests (over a pty master or a
socket). Every call takes a timeout and fails with a clear exception: an AMQP error
carries the condition's name and description, so a test can assert on
``amqp:not-found`` rather than on a hang.

It manages credit and dispositions itself (no prefetch), so a test can count outcomes and
messages exactly: ``receive(addr, 5)`` grants exactly five credits.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from proton import Array, Delivery, Described, Endpoint, Handler, Link, Message

from .driver import DEFAULT_IDLE_TIMEOUT, Driver, Opener

# Default for every blocking call (seconds): generous, because a TCG guest is slow, but
# finite so that a broken peer fails a test instead of hanging it.
DEFAULT_TIMEOUT = 30.0

SETTLE_MODES = ("at-most-once", "at-least-once")
# Outcomes a receiver may give; "none" leaves the delivery unsettled (for redelivery tests).
OUTCOMES = ("accepted", "rejected", "released", "modified", "none")

STATE_NAMES = {
    Delivery.ACCEPTED: "accepted",
    Delivery.REJECTED: "rejected",
    Delivery.RELEASED: "released",
    Delivery.MODIFIED: "modified",
    Delivery.RECEIVED: "received",
}


class GuestClientError(Exception):
    """Base class of the client's errors."""


class AmqpError(GuestClientError):
    """The peer closed a connection, session or link with an AMQP error condition."""

    def __init__(self, where: str, name: str | None, description: str | None) -> None:
        super().__init__(f"{where} closed by peer: {name}: {description}")
        self.where = where
        self.name = name
        self.description = description


class LinkRefused(AmqpError):
    """An attach was answered with a detach carrying an error (e.g. ``amqp:not-found``)."""


class GuestTimeout(GuestClientError, TimeoutError):
    """A call did not complete in time; ``partial`` holds what had arrived."""

    def __init__(self, what: str, timeout: float, partial: list[Any] | None = None) -> None:
        super().__init__(f"timed out after {timeout:.1f} s waiting for {what}")
        self.partial = partial or []


class Disconnected(GuestClientError, ConnectionError):
    """The channel ended (end of stream, hang-up, idle timeout) before the call completed."""


@dataclass(frozen=True)
class Outcome:
    """The remote outcome of one sent delivery, as a test wants to assert on it."""

    state: str  # accepted | rejected | released | modified | received | settled
    condition: str | None = None
    description: str | None = None
    delivery_failed: bool | None = None
    undeliverable_here: bool | None = None


class _Tracker(Handler):
    """Collects what the engine reports: received messages per link, transport end."""

    def __init__(self) -> None:
        self.inbox: dict[str, list[tuple[Message, Delivery]]] = {}
        self.disconnected: str | None = None

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        link = dlv.link
        if link.is_receiver and dlv.readable and not dlv.partial:
            msg = Message()
            msg.decode(link.recv(dlv.pending))
            _own_binaries(msg)
            link.advance()
            self.inbox.setdefault(link.name, []).append((msg, dlv))

    def on_transport_error(self, event: Any) -> None:
        cond = event.transport.condition
        self.disconnected = f"{cond.name}: {cond.description}" if cond else "transport error"

    def on_disconnected(self, event: Any) -> None:
        self.disconnected = self.disconnected or "channel closed"


def _own_binaries(msg: Message) -> None:
    """Replace every binary value decoded into ``msg`` by ``bytes`` of its own.

    proton 0.40 decodes an AMQP binary as a ``memoryview`` over the message's C buffer
    (0.37 copies it into ``bytes``): a body or property kept after the ``Message`` is freed
    would read freed memory. The ids (``id``, ``correlation_id``) are read from that buffer
    on each access, so they stay valid while the message lives and need nothing here.
    """
    msg.body = _owned(msg.body)
    msg.properties = _owned(msg.properties)
    msg.annotations = _owned(msg.annotations)
    msg.instructions = _owned(msg.instructions)


def _owned(value: Any) -> Any:
    """``value`` with every ``memoryview`` in it, however nested, copied into ``bytes``.

    Lists and maps are changed in place so that proton's own subclasses (``SymbolList``,
    ``PropertyDict``...) keep their type.
    """
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, list):
        value[:] = [_owned(v) for v in value]
    elif isinstance(value, dict):
        for key, v in list(value.items()):
            value[key] = _owned(v)
    elif isinstance(value, Described):
        return Described(value.descriptor, _owned(value.value))
    elif isinstance(value, Array):
        return Array(value.descriptor, value.type, *[_owned(v) for v in value.elements])
    return value


def _to_message(item: Any) -> Message:
    return item if isinstance(item, Message) else Message(body=item)


def _outcome(dlv: Delivery, presettled: bool) -> Outcome:
    if presettled:
        return Outcome("settled")
    remote = dlv.remote
    cond = remote.condition
    return Outcome(
        STATE_NAMES.get(dlv.remote_state, "settled"),
        cond.name if cond else None,
        cond.description if cond else None,
        remote.failed if dlv.remote_state == Delivery.MODIFIED else None,
        remote.undeliverable if dlv.remote_state == Delivery.MODIFIED else None,
    )


class GuestClient:
    """A blocking AMQP 1.0 connection over ``target`` (port name, path, fd or opener).

    Use as a context manager. No reconnect: a test wants to see a lost channel as
    :class:`Disconnected`, not have it hidden.
    """

    def __init__(
        self,
        target: str | int | Opener,
        *,
        container_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        properties: dict[Any, Any] | None = None,
        hostname: str | None = None,
        sasl_mechanisms: str | None = None,
    ) -> None:
        self.timeout = timeout
        self._tracker = _Tracker()
        self.driver = Driver(
            self._tracker,
            target,
            container_id=container_id,
            idle_timeout=idle_timeout,
            reconnect=False,
            properties=properties,
            hostname=hostname,
            sasl_mechanisms=sasl_mechanisms,
        )
        self._senders: dict[str, Link] = {}
        self._receivers: dict[str, Link] = {}
        self._reply: Link | None = None
        self.connection = self.driver.connect()
        try:
            self._wait(
                lambda: bool(self.connection.state & Endpoint.REMOTE_ACTIVE), None, "open", list
            )
        except BaseException:
            # No one gets a client to close: release the port here, or (a virtio port
            # allowing one opener) every retry would fail with EBUSY.
            self.driver.close_fd()
            raise

    def __enter__(self) -> GuestClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def remote_properties(self) -> dict[Any, Any] | None:
        """The peer's open-frame properties (a router may announce itself there)."""
        return self.connection.remote_properties

    # ---- sending -------------------------------------------------------------------------

    def send(
        self,
        address: str | None,
        messages: Iterable[Any],
        settle: str = "at-least-once",
        timeout: float | None = None,
    ) -> list[Outcome]:
        """Send ``messages`` (``proton.Message`` or bodies) to ``address`` and return one
        :class:`Outcome` per message, in order.

        ``address=None`` uses an anonymous sender (null target): each message needs ``to``.
        ``at-least-once`` waits for every disposition and settles; ``at-most-once`` sends
        pre-settled and returns ``settled`` outcomes once the bytes are written.
        """
        if settle not in SETTLE_MODES:
            raise ValueError(f"settle must be one of {SETTLE_MODES}")
        presettled = settle == "at-most-once"
        snd = self._sender(address, presettled, timeout)
        pending = [_to_message(m) for m in messages]
        sent: list[Delivery] = []

        def pump() -> bool:
            while len(sent) < len(pending) and snd.credit > 0:
                dlv = pending[len(sent)].send(snd)
                if presettled:
                    dlv.settle()
                sent.append(dlv)
            if len(sent) < len(pending):
                return False
            if presettled:
                return self.driver.transport is not None and self.driver.transport.pending() <= 0
            return all(d.remote_state or d.settled for d in sent)

        self._wait(
            pump, snd, f"{len(pending)} outcomes from {address}",
            lambda: [_outcome(d, presettled) for d in sent if d.remote_state], timeout,
        )  # fmt: skip
        outcomes = [_outcome(d, presettled) for d in sent]
        if not presettled:
            for d in sent:
                d.settle()
        return outcomes

    def _sender(self, address: str | None, presettled: bool, timeout: float | None) -> Link:
        key = (address or "") + ("#presettled" if presettled else "")
        snd = self._senders.get(key)
        if snd is None:
            snd = self.driver.create_sender(self.connection, address)
            if presettled:
                snd.snd_settle_mode = Link.SND_SETTLED
            self._senders[key] = snd
            self._attach(snd, timeout)
        return snd

    # ---- receiving -----------------------------------------------------------------------

    def receive(
        self,
        address: str,
        count: int,
        timeout: float | None = None,
        *,
        outcome: str = "accepted",
        drain: bool = False,
    ) -> list[Message]:
        """Receive exactly ``count`` messages from ``address`` (granting exactly that much
        credit) and give each the ``outcome``. With ``drain`` the peer is asked to use the
        credit or return it, and fewer messages are a normal result, not a timeout."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}")
        rcv = self._receivers.get(address)
        if rcv is None:
            rcv = self.driver.create_receiver(self.connection, address)
            self._receivers[address] = rcv
            self._attach(rcv, timeout)
        inbox = self._tracker.inbox.setdefault(rcv.name, [])
        want = count - len(inbox)
        if want > 0:
            if drain:
                rcv.drain(want)
            else:
                rcv.flow(max(0, want - rcv.credit))

        def done() -> bool:
            return len(inbox) >= count or (drain and not rcv.draining())

        self._wait(
            done, rcv, f"{count} messages from {address}", lambda: [m for m, _ in inbox], timeout
        )
        got, inbox[:] = inbox[:count], inbox[count:]
        for _, dlv in got:
            _settle(dlv, outcome)
        return [m for m, _ in got]

    def request(self, address: str, body: Any, timeout: float | None = None) -> Message:
        """Send ``body`` to ``address`` with ``reply_to`` set to a dynamic receiver, and
        return the reply whose ``correlation_id`` matches."""
        if self._reply is None:
            self._reply = self.driver.create_receiver(self.connection, None, dynamic=True)
            self._attach(self._reply, timeout)
        rcv = self._reply
        reply_to = rcv.remote_source.address
        cid = str(uuid.uuid4())
        msg = Message(body=body, reply_to=reply_to, correlation_id=cid)
        outcomes = self.send(address, [msg], timeout=timeout)
        if outcomes[0].state != "accepted":
            raise GuestClientError(f"request to {address} was {outcomes[0]}")
        rcv.flow(1)
        inbox = self._tracker.inbox.setdefault(rcv.name, [])

        def replied() -> bool:
            return any(m.correlation_id == cid for m, _ in inbox)

        self._wait(replied, rcv, f"the reply from {address}", list, timeout)
        for i, (m, dlv) in enumerate(inbox):
            if m.correlation_id == cid:
                del inbox[i]
                _settle(dlv, "accepted")
                return m
        raise AssertionError("unreachable: replied() found the reply")

    # ---- lifecycle -----------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Close the AMQP connection cleanly (waiting for the peer's close), then the fd."""
        if self.connection.state & Endpoint.LOCAL_ACTIVE:
            self.connection.close()
            # Wait for the peer's close, then for our own close frame to be written: when the
            # peer closed first, its close is already here and ours is still unwritten (the
            # host would then wait its close timeout for it). A lost channel is fine.
            with contextlib.suppress(Disconnected):
                self._wait(
                    lambda: bool(self.connection.state & Endpoint.REMOTE_CLOSED),
                    None, "close", list, timeout, closing=True,
                )  # fmt: skip
                self._wait(self._written, None, "our close to be written", list, timeout,
                           closing=True)  # fmt: skip
        self.driver.close_fd()

    def _written(self) -> bool:
        transport = self.driver.transport
        return transport is None or transport.pending() <= 0

    # ---- internals -----------------------------------------------------------------------

    def _attach(self, link: Link, timeout: float | None) -> None:
        self._wait(
            lambda: bool(link.state & Endpoint.REMOTE_ACTIVE),
            link,
            f"attach of {link.name}",
            list,
            timeout,
        )

    def _wait(
        self,
        cond: Callable[[], bool],
        link: Link | None,
        what: str,
        partial: Callable[[], list[Any]],
        timeout: float | None = None,
        closing: bool = False,
    ) -> None:
        """Run the driver until ``cond()``; raise the peer's error, a loss, or a timeout."""
        limit = self.timeout if timeout is None else timeout
        end = time.monotonic() + limit
        while True:
            if cond():
                return
            self._raise_remote_errors(link, closing)
            if self._tracker.disconnected:
                raise Disconnected(f"{self._tracker.disconnected} while waiting for {what}")
            left = end - time.monotonic()
            if left <= 0:
                raise GuestTimeout(what, limit, partial())
            if not self.driver.process(min(left, 0.5)):
                self._tracker.disconnected = self._tracker.disconnected or "driver stopped"

    def _raise_remote_errors(self, link: Link | None, closing: bool) -> None:
        conn = self.connection
        if conn.state & Endpoint.REMOTE_CLOSED and not closing:
            c = conn.remote_condition
            raise AmqpError("connection", c and c.name, c and c.description)
        if link is None:
            return
        if link.session.state & Endpoint.REMOTE_CLOSED:
            c = link.session.remote_condition
            raise AmqpError("session", c and c.name, c and c.description)
        if link.state & Endpoint.REMOTE_CLOSED:
            c = link.remote_condition
            if link.state & Endpoint.LOCAL_ACTIVE:
                link.close()
            self._forget(link)
            raise LinkRefused(f"link {link.name}", c and c.name, c and c.description)

    def _forget(self, link: Link) -> None:
        """Drop a closed link from the caches so the next call attaches afresh."""
        for cache in (self._senders, self._receivers):
            for key, value in list(cache.items()):
                if value is link:
                    del cache[key]
        if self._reply is link:
            self._reply = None


def _settle(dlv: Delivery, outcome: str) -> None:
    """Give a received delivery its outcome and settle it (``none`` leaves it open)."""
    if outcome == "none":
        return
    if outcome == "modified":
        dlv.local.failed = True
    dlv.update(
        {
            "accepted": Delivery.ACCEPTED,
            "rejected": Delivery.REJECTED,
            "released": Delivery.RELEASED,
            "modified": Delivery.MODIFIED,
        }[outcome]
    )
    dlv.settle()
