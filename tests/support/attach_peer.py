"""A minimal AMQP peer over any file descriptor for what proton's Python API cannot do: it
attaches links with the attach fields proton drops (link offered/desired capabilities, a
source's default outcome) and reports what the other side's attach said in them, and it
sends flows that ask for an echo.

It is the routing core's own ``Engine`` driven with ``select``: the fields go out through
the engine's frame writer and come back through its frame reader. The point of the tests
that use it is what the far side does with them: Artemis only offers ``DELAYED_DELIVERY`` on
a link whose attach desired it; the connector answers an echo with the link's state.
Proton's frame tracer records every frame the peer receives (``received``).
"""

from __future__ import annotations

import os
import re
import select
import socket
import time
from typing import Any

from cproton_ffi import ffi, lib
from proton import Transport, uint

from connector.routing.engine import Engine
from connector.routing.frames import FLOW, LinkExtras, encode

_WINDOW = uint(2**31 - 1)


def link_flows(lines: list[str]) -> list[dict[str, Any]]:
    """The link flows among frames traced by proton (``<- @flow(19) [... handle=0x0 ...]``),
    each as its fields, numbers as ints."""
    found = (re.findall(r"([a-z-]+)=(\w+)", line) for line in lines if "@flow" in line)
    flows = [{k: int(v, 0) if v[0].isdigit() else v for k, v in fields} for fields in found]
    return [flow for flow in flows if "handle" in flow]


def echo_flow(
    incoming: int,
    outgoing: int,
    count: int,
    credit: int,
    *,
    echo: bool = True,
    channel: int = 0,
    handle: int = 0,
) -> bytes:
    """A flow frame for the link at ``channel`` and ``handle`` with these session and link
    fields (``incoming``: next-incoming-id, ``outgoing``: next-outgoing-id, ``count``: the
    delivery-count), asking for an echo unless not ``echo``. Proton cannot send one."""
    fields = [
        uint(incoming), _WINDOW, uint(outgoing), _WINDOW,
        uint(handle), uint(count), uint(credit), None, False, echo,
    ]  # fmt: skip
    return encode(FLOW, channel, fields)


class AttachPeer:
    """A client connection on ``fd`` (a socket or a pty master) that attaches links."""

    def __init__(
        self,
        fd: int | socket.socket,
        container: str = "attach-peer",
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self._fd = fd.fileno() if isinstance(fd, socket.socket) else fd
        self.engine = Engine(server=False, user=user, password=password)
        conn = self.engine.connection
        lib.pn_connection_set_container(conn, container.encode())
        lib.pn_connection_open(conn)
        self._session = lib.pn_session(conn)
        lib.pn_session_open(self._session)
        self.received: list[str] = []  # the frames that came in, as proton's tracer shows them
        traced = Transport.wrap(self.engine.transport)
        traced.tracer = lambda _t, line: self.received.append(line) if "<-" in line else None
        traced.trace(Transport.TRACE_FRM)

    def attach(
        self,
        name: str,
        address: str,
        *,
        sending: bool,
        extras: LinkExtras,
        timeout: float = 30.0,
    ) -> tuple[Any, LinkExtras | None]:
        """Attach a link with ``extras`` in its attach; wait for the answer and return the
        link and what the answer said in those fields."""
        make = lib.pn_sender if sending else lib.pn_receiver
        link = make(self._session, name.encode())
        term = lib.pn_link_target(link) if sending else lib.pn_link_source(link)
        lib.pn_terminus_set_address(term, address.encode())
        self.engine.complete_attach((name, not sending), extras)
        lib.pn_link_open(link)
        self.pump_until(lambda: lib.pn_link_state(link) & lib.PN_REMOTE_ACTIVE, timeout)
        return link, self.engine.peer_attach_extras((name, sending))

    def ask_echo(
        self, link: Any, *, incoming: int, outgoing: int, delivery_count: int, credit: int
    ) -> None:
        """Send a flow for ``link`` that asks for an echo, with the session and link fields
        given (proton cannot send one: the caller counts the transfers each way)."""
        key = (ffi.string(lib.pn_link_name(link)).decode(), bool(lib.pn_link_is_receiver(link)))
        channel, handle = self.engine.writer.links.by_key[key]
        while out := self.engine.peek_output():  # what proton has written goes first
            self.engine.pop_output(os.write(self._fd, out))
        frame = echo_flow(
            incoming, outgoing, delivery_count, credit, channel=channel, handle=handle
        )
        assert os.write(self._fd, frame) == len(frame)

    def pump_until(self, done: Any, timeout: float) -> None:
        """Move bytes both ways until ``done()`` or the deadline."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"the peer did not answer in {timeout}s")
            while out := self.engine.peek_output():
                self.engine.pop_output(os.write(self._fd, out))
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if ready:
                data = os.read(self._fd, 65536)
                if not data:
                    raise AssertionError("the peer closed the connection")
                self.engine.push(data)
            collector = self.engine.collector
            while lib.pn_collector_peek(collector) != ffi.NULL:
                lib.pn_collector_pop(collector)

    def close(self, timeout: float = 30.0) -> None:
        """Close the connection and wait for the peer's close; the fd stays open."""
        conn = self.engine.connection
        lib.pn_connection_close(conn)
        self.pump_until(lambda: lib.pn_connection_state(conn) & lib.PN_REMOTE_CLOSED, timeout)
        while out := self.engine.peek_output():  # our close, if the peer's came first
            self.engine.pop_output(os.write(self._fd, out))
        self.engine.free()
