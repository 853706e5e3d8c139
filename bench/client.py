"""The one benchmark client, used unchanged over TCP, a pty master and a unix socket.

Why not :class:`connector.guest.GuestClient`: it waits for every outcome of a batch and
re-checks the whole batch on each loop turn, which is right for tests and wrong for a
throughput measurement. These handlers stream instead, like a real at-least-once producer:
the sender keeps up to ``window`` unsettled deliveries in flight and settles each as its
outcome arrives; the receiver keeps ``window`` credit out and accepts each message.

They are deliberately lean (the message is encoded once, the receiver does not decode the
body), so that the client's own cost is as small as a Python proton client gets and the
connector's share of the work shows as clearly as it can. They run on the project's
:class:`~connector.guest.driver.Driver`, which is what a guest application uses, over any fd.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from proton import Delivery, Endpoint, Handler, Message

from connector.guest.driver import Driver

# How long one phase may take before the bench gives up: a stuck run must fail, not hang.
PHASE_TIMEOUT = 120.0
# How long the AMQP close exchange may take at the end of a phase.
CLOSE_TIMEOUT = 10.0
# Longest single wait inside the driver loop, so the deadline is checked regularly.
POLL_SLICE = 0.5


class BenchError(RuntimeError):
    """The peer refused something or the connection ended during a phase."""


class _Handler(Handler):
    """Shared: turn remote errors and a lost connection into a BenchError."""

    def __init__(self) -> None:
        self.finished = False
        self.error: str | None = None
        self.remote_properties: dict[Any, Any] | None = None

    def on_connection_remote_open(self, event: Any) -> None:
        self.remote_properties = event.connection.remote_properties

    def _remote_close(self, what: str, endpoint: Any) -> None:
        cond = endpoint.remote_condition
        if cond is not None:
            self.error = f"{what} closed by peer: {cond.name}: {cond.description}"

    def on_connection_remote_close(self, event: Any) -> None:
        self._remote_close("connection", event.connection)

    def on_session_remote_close(self, event: Any) -> None:
        self._remote_close("session", event.session)

    def on_link_remote_close(self, event: Any) -> None:
        self._remote_close("link", event.link)

    def on_transport_error(self, event: Any) -> None:
        cond = event.transport.condition
        self.error = f"transport error: {cond.name if cond else '?'}"

    def on_disconnected(self, _event: Any) -> None:
        if not self.finished:
            self.error = self.error or "channel closed"


class StreamSender(_Handler):
    """Send ``count`` copies of one encoded message at-least-once, ``window`` in flight."""

    def __init__(self, address: str, encoded: bytes, count: int, window: int) -> None:
        super().__init__()
        self.address = address
        self.encoded = encoded
        self.count = count
        self.window = window
        self.sent = 0
        self.settled = 0
        self.started: float | None = None
        self.ended: float | None = None

    def on_start(self, event: Any) -> None:
        driver = event.container
        driver.create_sender(driver.connect(), self.address)

    def on_link_flow(self, event: Any) -> None:
        self._pump(event.link)

    def _pump(self, link: Any) -> None:
        if self.started is None and link.credit > 0:
            self.started = time.perf_counter()
        while self.sent < self.count and link.credit > 0 and self.sent - self.settled < self.window:
            link.delivery(b"%x" % self.sent)
            link.send(self.encoded)
            link.advance()
            self.sent += 1

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        state = dlv.remote_state
        if not state and not dlv.settled:
            return
        if state != Delivery.ACCEPTED:
            self.error = f"message not accepted: {dlv.remote_state}"
        dlv.settle()
        self.settled += 1
        if self.settled == self.count:
            self.ended = time.perf_counter()
            self.finished = True
        else:
            self._pump(event.link)


class StreamReceiver(_Handler):
    """Receive exactly ``count`` messages with ``window`` credit out; accept each."""

    def __init__(self, address: str, count: int, window: int) -> None:
        super().__init__()
        self.address = address
        self.count = count
        self.window = window
        self.granted = 0
        self.received = 0
        self.bytes = 0
        self.started: float | None = None
        self.ended: float | None = None

    def on_start(self, event: Any) -> None:
        driver = event.container
        driver.create_receiver(driver.connect(), self.address)

    def on_link_remote_open(self, event: Any) -> None:
        self.started = time.perf_counter()
        self._top_up(event.link)

    def _top_up(self, link: Any) -> None:
        """Keep ``window`` credit out, never granting more than ``count`` in total."""
        want = min(self.window - link.credit, self.count - self.granted)
        if want > 0 and link.credit <= self.window // 2:
            link.flow(want)
            self.granted += want

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        if not dlv.readable or dlv.partial:
            return
        link = event.link
        self.bytes += len(link.recv(dlv.pending))
        link.advance()
        dlv.update(Delivery.ACCEPTED)
        dlv.settle()
        self.received += 1
        if self.received == self.count:
            self.ended = time.perf_counter()
            self.finished = True
        else:
            self._top_up(link)


class Requester(_Handler):
    """Send ``count`` requests one at a time and time each until its reply arrives.

    ``reply_address`` None asks the broker for a dynamic reply node (Artemis); a broker with
    no dynamic nodes (RabbitMQ) gets a named reply queue.
    """

    def __init__(self, address: str, reply_address: str | None, body: bytes, count: int) -> None:
        super().__init__()
        self.address = address
        self.reply_address = reply_address
        self.body = body
        self.count = count
        self.samples: list[float] = []
        self._sender: Any = None
        self._receiver: Any = None
        self._reply_to: str | None = None
        self._waiting: tuple[str, float] | None = None  # correlation id, send time

    def on_start(self, event: Any) -> None:
        driver = event.container
        conn = driver.connect()
        self._receiver = driver.create_receiver(
            conn, self.reply_address, dynamic=self.reply_address is None
        )
        self._sender = driver.create_sender(conn, self.address)

    def on_link_remote_open(self, event: Any) -> None:
        if event.link == self._receiver:
            self._reply_to = self.reply_address or self._receiver.remote_source.address
            self._receiver.flow(1)
        self._next()

    def on_link_flow(self, event: Any) -> None:
        self._next()

    def _next(self) -> None:
        snd = self._sender
        if (
            self._waiting is not None
            or self._reply_to is None
            or not snd.state & Endpoint.REMOTE_ACTIVE
            or snd.credit <= 0
            or len(self.samples) >= self.count
        ):
            return
        cid = uuid.uuid4().hex
        msg = Message(body=self.body, reply_to=self._reply_to, correlation_id=cid)
        self._waiting = (cid, time.perf_counter())
        snd.delivery(cid.encode())
        snd.send(msg.encode())
        snd.advance()

    def on_delivery(self, event: Any) -> None:
        msg = take_message(event)
        if msg is None:
            return
        link = event.link
        if self._waiting is not None and msg.correlation_id == self._waiting[0]:
            self.samples.append(time.perf_counter() - self._waiting[1])
            self._waiting = None
        if len(self.samples) >= self.count:
            self.finished = True
            return
        link.flow(1)
        self._next()


def take_message(event: Any) -> Message | None:
    """The request/response side of a delivery event: settle an outcome that arrived on a
    sending link; decode, accept and settle a complete message on a receiving link."""
    dlv = event.delivery
    link = event.link
    if link.is_sender:
        if dlv.remote_state or dlv.settled:
            dlv.settle()
        return None
    if not dlv.readable or dlv.partial:
        return None
    msg = Message()
    msg.decode(link.recv(dlv.pending))
    link.advance()
    dlv.update(Delivery.ACCEPTED)
    dlv.settle()
    return msg


def run_phase(
    handler: _Handler,
    fd: int,
    *,
    sasl_mechanisms: str | None = None,
    timeout: float = PHASE_TIMEOUT,
) -> Driver:
    """Open one AMQP connection over ``fd``, run ``handler`` to completion, close cleanly.

    The fd is left open: a channel carries the next phase's connection too, as a guest's
    port does when its application restarts.
    """
    driver = Driver(
        handler,
        fd,
        container_id=f"bench-{uuid.uuid4().hex[:8]}",
        reconnect=False,
        sasl_mechanisms=sasl_mechanisms,
    )
    _run_until(driver, handler, lambda: handler.finished, timeout, "the phase")
    conn = driver.connection
    assert conn is not None
    conn.close()
    _run_until(
        driver,
        handler,
        lambda: (
            bool(conn.state & Endpoint.REMOTE_CLOSED)
            and (driver.transport is None or driver.transport.pending() <= 0)
        ),
        CLOSE_TIMEOUT,
        "the close",
        closing=True,
    )
    return driver


def _run_until(
    driver: Driver,
    handler: _Handler,
    done: Any,
    timeout: float,
    what: str,
    closing: bool = False,
) -> None:
    end = time.monotonic() + timeout
    driver.start()
    while not done():
        if handler.error and not closing:
            raise BenchError(handler.error)
        left = end - time.monotonic()
        if left <= 0:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        if not driver.process(min(left, POLL_SLICE)):
            raise BenchError(handler.error or f"connection ended while waiting for {what}")


def encode_payload(size: int) -> bytes:
    """One message with a binary body of ``size`` bytes, encoded once for the whole run."""
    return Message(body=b"x" * size, durable=False).encode()
