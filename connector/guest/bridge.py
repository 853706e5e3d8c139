"""Relay unmodified TCP AMQP clients to virtio-serial ports, one client per port at a time.

``python3 -m connector.guest bridge --listen 127.0.0.1:5672 --port org.qpid.amqp.0``

One listening address serves a pool of ports (``--port`` may repeat): each accepted client
takes a free port for as long as it stays connected, so N ports serve N clients at once.
While every port is busy the bridge stops accepting and further clients wait in the listen
backlog.

A port is opened for each client and closed after it. Two rules keep each client's byte
stream clean even though virtio-serial never tells the host that the guest closed:

* Before relaying, stale bytes are drained (qemu delivers to a new opener what the host
  wrote while the port was closed, for example the previous connection's last frames).
* When a client goes away the bridge writes one AMQP ``close`` frame to the port, so the
  host ends that connection even if the client vanished without closing. If the client had
  already closed cleanly, the host is waiting for a new protocol header and discards it.

Bytes are relayed as they are; the bridge never parses AMQP beyond that one frame.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from . import port as _port
from .driver import port_opener

log = logging.getLogger(__name__)

# An empty AMQP close performative on channel 0: frame size 12, doff 2, type AMQP, then the
# described list 0x00 0x53 0x18 (close) with list0 0x45.
CLOSE_FRAME = bytes.fromhex("0000000c0200000000531845")
# Relay chunk size: large enough that a 20 MB message moves in few system calls.
CHUNK = 256 * 1024
# Bytes buffered towards one side before the bridge stops reading the other side
# (backpressure rather than unbounded memory when the host or the client is slow).
HIGH_WATER = 1024 * 1024
# Pending client connections the kernel keeps while every port is busy.
BACKLOG = 16


@dataclass
class _Session:
    """One client paired with one port."""

    port: str
    client: socket.socket
    fd: int
    to_port: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    client_sent: bool = False


class Bridge:
    """The relay; ``opener(port_name) -> fd`` is injectable so tests can use ptys."""

    def __init__(
        self,
        listen: tuple[str, int],
        ports: list[str],
        opener: Callable[[str], int] | None = None,
    ) -> None:
        if not ports:
            raise ValueError("at least one port is needed")
        self.ports = list(ports)
        self._open = opener or (lambda name: port_opener(name)())
        self.sel = selectors.DefaultSelector()
        self.listener = socket.create_server(listen, backlog=BACKLOG, reuse_port=False)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()[:2]
        self.sessions: dict[str, _Session] = {}
        self._accepting = False
        self._update_accepting()
        self._stopped = False

    def serve_forever(self) -> None:
        """Relay until :meth:`stop` is called (from a handler or another thread)."""
        while not self._stopped:
            self.poll(0.5)
        self.close()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return."""
        self._stopped = True

    def close(self) -> None:
        """End every session and stop listening."""
        for s in list(self.sessions.values()):
            self._end(s, "bridge closing")
        if self._accepting:
            self.sel.unregister(self.listener)
            self._accepting = False
        self.listener.close()
        self.sel.close()

    def poll(self, timeout: float | None) -> None:
        """One round of the relay loop."""
        for key, mask in self.sel.select(timeout):
            if key.fileobj is self.listener:
                self._accept()
                continue
            session: _Session = key.data
            if session.port not in self.sessions:
                continue  # ended earlier in this round
            if key.fileobj is session.client:
                self._client_io(session, mask)
            else:
                self._port_io(session, mask)
            if session.port in self.sessions:
                self._update(session)

    # ---- internals -----------------------------------------------------------------------

    def _update_accepting(self) -> None:
        free = len(self.sessions) < len(self.ports)
        if free and not self._accepting:
            self.sel.register(self.listener, selectors.EVENT_READ)
        elif not free and self._accepting:
            self.sel.unregister(self.listener)
        self._accepting = free

    def _accept(self) -> None:
        try:
            client, peer = self.listener.accept()
        except BlockingIOError:
            return
        name = next(p for p in self.ports if p not in self.sessions)
        try:
            fd = self._open(name)
        except OSError as e:
            log.warning("client %s refused: cannot open %s: %s", peer, name, e)
            client.close()
            return
        client.setblocking(False)
        session = _Session(name, client, fd)
        self.sessions[name] = session
        self.sel.register(client, selectors.EVENT_READ, session)
        self.sel.register(fd, selectors.EVENT_READ, session)
        self._update_accepting()
        log.info("client %s on %s", peer, name)

    def _client_io(self, s: _Session, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = s.client.recv(CHUNK)
            except ConnectionError:
                data = b""
            except BlockingIOError:
                data = None
            if data == b"":
                self._end(s, "client closed")
                return
            if data:
                s.client_sent = True
                s.to_port += data
        if mask & selectors.EVENT_WRITE and s.to_client:
            try:
                n = s.client.send(s.to_client)
            except BlockingIOError:
                n = 0
            except ConnectionError:
                self._end(s, "client closed")
                return
            del s.to_client[:n]

    def _port_io(self, s: _Session, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = _port.read_some(s.fd, CHUNK)
            except OSError as e:
                log.info("port %s read failed: %s", s.port, e)
                data = b""
            if data == b"":
                self._end(s, "host side went away")
                return
            if data:
                s.to_client += data
        if mask & selectors.EVENT_WRITE and s.to_port:
            try:
                n = os.write(s.fd, s.to_port)
            except BlockingIOError:
                n = 0
            del s.to_port[:n]

    def _update(self, s: _Session) -> None:
        """Register interest so that each side is read only while the other keeps up."""
        cmask = selectors.EVENT_READ if len(s.to_port) < HIGH_WATER else 0
        pmask = selectors.EVENT_READ if len(s.to_client) < HIGH_WATER else 0
        if s.to_client:
            cmask |= selectors.EVENT_WRITE
        if s.to_port:
            pmask |= selectors.EVENT_WRITE
        _modify(self.sel, s.client, cmask, s)
        _modify(self.sel, s.fd, pmask, s)

    def _end(self, s: _Session, why: str) -> None:
        log.info("%s on %s", why, s.port)
        self.sessions.pop(s.port, None)
        for obj in (s.client, s.fd):
            with contextlib.suppress(KeyError):
                self.sel.unregister(obj)
        if s.client_sent:
            try:
                os.write(s.fd, bytes(s.to_port) + CLOSE_FRAME)
            except OSError as e:
                log.info("could not end the connection on %s: %s", s.port, e)
        s.client.close()
        os.close(s.fd)
        self._update_accepting()


def _modify(
    sel: selectors.BaseSelector, obj: socket.socket | int, mask: int, data: _Session
) -> None:
    """Register, modify or unregister ``obj`` so that its interest is exactly ``mask``."""
    try:
        key = sel.get_key(obj)
    except KeyError:
        key = None
    if mask == 0:
        if key is not None:
            sel.unregister(obj)
    elif key is None:
        sel.register(obj, mask, data)
    elif key.events != mask:
        sel.modify(obj, mask, data)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:5672`` for IPv6) to a socket address."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
