"""A tiny in-memory AMQP 1.0 peer, to stand where a broker or the connector would.

Run it with ``Driver(MemoryBroker(), fd, server=True)``. Tests on both sides of a channel
use it: unit tests put it on the far end of a socketpair or pty, and the VM tests run it on
the host end of a virtio-serial port to prove the harness before any connector is there.

It keeps one FIFO queue per address (created on demand), hands out dynamic addresses,
accepts anonymous-relay senders (routing by each message's ``to``), answers drain, requeues
released or modified messages, refuses attaches to addresses listed in ``refuse`` with
``amqp:not-found``, and can answer requests on addresses given in ``responders``.
"""

from __future__ import annotations

import itertools
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from proton import Condition, Delivery, Endpoint, Handler, Message

from .client import STATE_NAMES
from .driver import Driver
from .port import read_some, wait_fd

# Credit the peer grants each incoming link, topped up as messages arrive: enough to keep
# a sender streaming without letting a runaway sender queue unbounded memory.
LINK_CREDIT = 200
# How often the serving thread checks whether it was asked to stop (seconds).
POLL = 0.1
# A protocol header is 8 bytes ("AMQP" + protocol id + version).
HEADER_SIZE = 8
# While looking for a header, keep only this tail of what was read (a header split across
# reads is still found; junk does not accumulate).
MAX_SKIP = 64 * 1024


class MemoryBroker(Handler):
    """Server-side handler: queues by address; see the module docstring for what it does."""

    def __init__(
        self,
        refuse: set[str] | None = None,
        responders: dict[str, Callable[[Message], Any]] | None = None,
    ) -> None:
        self.queues: dict[str, deque[Message]] = {}
        self.consumers: dict[str, list[Any]] = {}
        self.refuse = refuse or set()
        self.responders = responders or {}
        self.remote_properties: dict[Any, Any] | None = None
        self.remote_container: str | None = None
        self.outcomes: list[str] = []  # remote states of what this peer delivered
        self._dynamic = itertools.count(1)
        self._tags = itertools.count(1)

    def queue(self, address: str) -> deque[Message]:
        """The queue for ``address``, created on first use."""
        return self.queues.setdefault(address, deque())

    # ---- endpoints -----------------------------------------------------------------------

    def on_connection_remote_open(self, event: Any) -> None:
        conn = event.connection
        self.remote_properties = conn.remote_properties
        self.remote_container = conn.remote_container
        if conn.state & Endpoint.LOCAL_UNINIT:
            conn.open()

    def on_session_remote_open(self, event: Any) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_link_remote_open(self, event: Any) -> None:
        link = event.link
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        if link.is_sender:
            terminus = link.remote_source
            address = terminus.address
            if terminus.dynamic:
                address = f"dynamic-{next(self._dynamic)}"
            link.source.address = address
            link.target.copy(link.remote_target)
        else:
            address = link.remote_target.address
            link.target.address = address
            link.source.copy(link.remote_source)
        if address in self.refuse:
            link.source.address = None if link.is_sender else link.source.address
            link.open()
            link.condition = Condition("amqp:not-found", f"no such node: {address}")
            link.close()
            return
        link.open()
        if link.is_sender:
            self.consumers.setdefault(address, []).append(link)
        else:
            link.flow(LINK_CREDIT)

    def on_link_remote_close(self, event: Any) -> None:
        link = event.link
        for links in self.consumers.values():
            if link in links:
                links.remove(link)
        if link.state & Endpoint.LOCAL_ACTIVE:
            link.close()

    def on_session_remote_close(self, event: Any) -> None:
        if event.session.state & Endpoint.LOCAL_ACTIVE:
            event.session.close()

    def on_connection_remote_close(self, event: Any) -> None:
        if event.connection.state & Endpoint.LOCAL_ACTIVE:
            event.connection.close()

    # ---- messages ------------------------------------------------------------------------

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        link = dlv.link
        if link.is_receiver:
            if dlv.readable and not dlv.partial:
                msg = Message()
                msg.decode(link.recv(dlv.pending))
                link.advance()
                self._route(link.target.address or msg.address, msg)
                dlv.update(Delivery.ACCEPTED)
                dlv.settle()
                if link.credit < LINK_CREDIT // 2:
                    link.flow(LINK_CREDIT - link.credit)
        elif dlv.updated:
            state = dlv.remote_state
            self.outcomes.append(STATE_NAMES.get(state, str(state)))
            if state in (Delivery.RELEASED, Delivery.MODIFIED):
                self.queue(link.source.address).appendleft(dlv.message_copy)
                self._pump(link.source.address)
            dlv.settle()

    def on_link_flow(self, event: Any) -> None:
        link = event.link
        if link.is_sender:
            self._pump(link.source.address)

    def _route(self, address: str | None, msg: Message) -> None:
        if address is None:
            return  # anonymous message without a "to": dropped, as a relay without a route
        responder = self.responders.get(address)
        if responder is not None:
            reply = Message(body=responder(msg), correlation_id=msg.correlation_id)
            if msg.reply_to:
                self._route(msg.reply_to, reply)
            return
        self.queue(address).append(msg)
        self._pump(address)

    def _pump(self, address: str) -> None:
        """Deliver queued messages to this address's consumers while they have credit."""
        q = self.queues.get(address)
        for link in self.consumers.get(address, []):
            while q and link.credit > 0:
                msg = q.popleft()
                dlv = link.delivery(str(next(self._tags)))
                dlv.message_copy = msg
                link.send(msg.encode())
                link.advance()
            if not q:
                link.drained()  # a no-op unless the receiver asked to drain


class PeerThread:
    """Serve AMQP connections on ``fd`` one after another in a thread, until closed or the
    fd ends. A channel outlives the connections on it, so each gets a fresh server
    transport; the fd is not closed here (it belongs to the caller)."""

    def __init__(self, fd: int, broker: Handler | None = None, name: str = "peer") -> None:
        self.fd = fd
        self.broker = broker if broker is not None else MemoryBroker()
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            start = self._await_header()
            if start is None:
                return  # stopped, or the other side is gone for good
            driver = Driver(self.broker, self.fd, server=True)
            driver.connect()
            driver.feed(start)
            while not self._stop.is_set() and driver.process(POLL):
                pass
            self.connections += 1
            if driver.eof:
                return

    def _await_header(self) -> bytes | None:
        """Skip bytes until an AMQP header starts, as the connector does: a guest that never
        noticed its host side was replaced goes on sending its old connection's frames."""
        seen = b""
        while not self._stop.is_set():
            if not wait_fd(self.fd, select.POLLIN, POLL):
                continue
            data = read_some(self.fd)
            if data == b"":
                return None
            seen = (seen + (data or b""))[-MAX_SKIP:]
            at = seen.find(b"AMQP")
            if at >= 0 and len(seen) - at >= HEADER_SIZE:
                return seen[at:]
        return None

    def close(self) -> None:
        """Stop serving and wait for the thread."""
        self._stop.set()
        self._thread.join(10)
