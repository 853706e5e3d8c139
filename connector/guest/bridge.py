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
  A client that died in the middle of a frame has that frame completed with padding first,
  or the host would read the close frame as the rest of it.

When a session ends, what is still buffered goes out before its fds are closed (the
client's last bytes and the close frame to the port, the host's last frames, such as its
close with an error, to the client), in a short-lived thread if a side is slow, so that
the other sessions are not held up; the port stays busy until that is done.

Bytes are relayed as they are; the bridge reads nothing of AMQP but the size of each frame
(and the protocol headers between them) in the client's direction.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import selectors
import socket
import threading
import time
from collections import deque
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
# The largest TCP port number (16 bits).
MAX_TCP_PORT = 65535
# Pending client connections the kernel keeps while every port is busy.
BACKLOG = 16
# How long an ended session may take to hand over what is still buffered. A host or client
# that reads nothing for this long is stuck; the port must become free for the next client.
END_TIMEOUT = 5.0
# AMQP framing, as far as the bridge follows it: a protocol header is "AMQP" and 4 more
# bytes; a frame starts with its size (4 bytes, big-endian, counting itself) and is at
# least 8 bytes long (size, data offset, type, channel).
PROTOCOL_HEADER_SIZE = 8
FRAME_SIZE_BYTES = 4
MIN_FRAME_SIZE = 8
# Where a frame's performative code is: every AMQP peer writes data offset 2 (an 8-byte
# header), then the descriptor 0x00 0x53 CODE. A transfer is code 0x14.
_DOFF_AT, _USUAL_DOFF, _CODE_AT, _TRANSFER = 4, 2, 10, 0x14
_CODE_KNOWN = _CODE_AT + 1
# Source of the padding that completes a client's unfinished frame, sliced, never copied.
ZEROS = memoryview(bytes(CHUNK))


class _FrameEdge:
    """Where the client's byte stream stands in AMQP's framing.

    Only sizes are read: at each boundary the next 4 bytes are either ``AMQP`` (a protocol
    header; SASL is followed by a second one) or a frame's size. :meth:`missing` says how
    many bytes would complete the unit the client stopped in.
    """

    def __init__(self) -> None:
        self.head = bytearray()  # the current unit's first bytes while fewer than 4 are known
        self.left = 0  # bytes still to come of the current unit once its size is known
        self.start = bytearray()  # the current frame's first bytes, up to its performative

    def feed(self, data: bytes) -> None:
        """Follow ``data``, the next bytes the client sent."""
        pos = 0
        while pos < len(data):
            if self.left:
                step = min(self.left, len(data) - pos)
                if len(self.start) < _CODE_KNOWN:
                    self.start += data[pos : pos + min(step, _CODE_KNOWN - len(self.start))]
                self.left -= step
                pos += step
                continue
            take = data[pos : pos + FRAME_SIZE_BYTES - len(self.head)]
            self.head += take
            pos += len(take)
            if len(self.head) == FRAME_SIZE_BYTES:
                self.left = self._unit_size() - FRAME_SIZE_BYTES
                self.start[:] = self.head
                self.head.clear()

    def may_complete_a_message(self) -> bool:
        """Whether padding the unfinished frame could make it a valid transfer: one whose
        performative is known to be a transfer, or cannot be found at the usual place.
        Zeros in a transfer's payload would hand the host a message the client never
        finished; zeros in a frame's size, data offset or performative code make the
        frame invalid, which ends the connection at the host as a close would."""
        if self.head or not self.left:  # at a boundary, or inside a size
            return False
        start = self.start
        if start.startswith(b"AMQP") or len(start) <= _DOFF_AT:
            return False
        if start[_DOFF_AT] != _USUAL_DOFF:
            return True
        return len(start) >= _CODE_KNOWN and start[_CODE_AT] == _TRANSFER

    def missing(self) -> int:
        """Bytes that complete the current unit (0 at a boundary)."""
        return self._unit_size() - len(self.head) if self.head else self.left

    def _unit_size(self) -> int:
        # Size bytes not yet sent count as zeros, which is what the padding will make them.
        # A size under the minimum is a framing error at the host, which ends the
        # connection anyway; the minimum just keeps the count sane.
        if b"AMQP".startswith(self.head):
            return PROTOCOL_HEADER_SIZE
        size = int.from_bytes(bytes(self.head).ljust(FRAME_SIZE_BYTES, b"\0"), "big")
        return max(size, MIN_FRAME_SIZE)


@dataclass
class _Session:
    """One client paired with one port."""

    port: str
    client: socket.socket
    fd: int
    to_port: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    client_sent: bool = False
    frames: _FrameEdge = field(default_factory=_FrameEdge)


class _LastWords:
    """What an ended session still owes each side, written out before its fds are closed."""

    def __init__(self, s: _Session, to_port: list[bytes | memoryview]) -> None:
        self.port = s.port
        self.client = s.client
        self.fd = s.fd
        self.out: dict[int, deque[memoryview]] = {
            self.fd: deque(memoryview(b) for b in to_port if b),
            s.client.fileno(): deque([memoryview(bytes(s.to_client))] if s.to_client else []),
        }

    def flush(self, deadline: float) -> bool:
        """Write until everything is out (True) or ``deadline`` passes (False); a side
        that fails or hangs up is given up, with the reason logged."""
        while True:
            for fd, chunks in list(self.out.items()):
                try:
                    _write_chunks(fd, chunks)
                except BlockingIOError:
                    pass
                except OSError as e:
                    self._give_up(fd, str(e))
                if not chunks:
                    self.out.pop(fd, None)
            left = deadline - time.monotonic()
            if not self.out or left <= 0:
                return not self.out
            poller = select.poll()
            for fd in self.out:
                poller.register(fd, select.POLLOUT)
            for fd, revents in poller.poll(left * 1000):
                if revents & (select.POLLHUP | select.POLLERR) and not revents & select.POLLOUT:
                    self._give_up(fd, "hung up")  # no write can succeed: do not spin on it

    def finish(self) -> None:
        """Close both sides (whatever could not be written is lost)."""
        for fd, chunks in self.out.items():
            unsent = sum(len(c) for c in chunks)
            log.info("%d bytes for %s not written in time", unsent, self._side(fd))
        self.client.close()
        os.close(self.fd)

    def _give_up(self, fd: int, why: str) -> None:
        log.info("could not hand over the last bytes to %s: %s", self._side(fd), why)
        self.out.pop(fd, None)

    def _side(self, fd: int) -> str:
        return f"the {'port' if fd == self.fd else 'client'} of {self.port}"


def _write_chunks(fd: int, chunks: deque[memoryview]) -> None:
    """Write ``chunks`` in order until done or the fd would block (BlockingIOError)."""
    while chunks:
        n = os.write(fd, chunks[0])
        if n < len(chunks[0]):
            chunks[0] = chunks[0][n:]
        else:
            chunks.popleft()


class _Ended(Exception):
    """A session's client or port failed or closed: that session ends, for this reason."""


def _read(read: Callable[[], bytes | None], side: str, closed: str) -> bytes | None:
    """One non-blocking read from one side of a session, the same for either side: the
    bytes read, or None when there are none yet ("would block"). An error ("``side``
    failed (...)") or the end of the stream (``closed``) raises :class:`_Ended`."""
    try:
        data = read()
    except BlockingIOError:
        return None
    except OSError as e:
        raise _Ended(f"{side} failed ({e})") from e
    if data == b"":
        raise _Ended(closed)
    return data


def _write(write: Callable[[bytearray], int], buf: bytearray, side: str) -> None:
    """Write what ``write`` takes of ``buf`` now and drop that from ``buf``. "Would block"
    writes nothing; any other error raises :class:`_Ended` ("``side`` failed (...)")."""
    try:
        n = write(buf)
    except BlockingIOError:
        return
    except OSError as e:
        raise _Ended(f"{side} failed ({e})") from e
    del buf[:n]


def _padding(size: int) -> list[memoryview]:
    """``size`` zero bytes as slices of :data:`ZEROS`, however large ``size`` is."""
    whole, rest = divmod(size, CHUNK)
    return [ZEROS] * whole + [ZEROS[:rest]]


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
        # Ports whose ended session is still writing its last bytes in a thread: busy
        # until the thread removes them and wakes the loop through ``_wake_w``.
        self._closing: dict[str, threading.Thread] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ)
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
        """End every session (waiting for their last bytes) and stop listening."""
        for s in list(self.sessions.values()):
            self._end(s, "bridge closing")
        for thread in list(self._closing.values()):
            thread.join()  # each is bounded by END_TIMEOUT
        if self._accepting:
            self.sel.unregister(self.listener)
            self._accepting = False
        self.listener.close()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def poll(self, timeout: float | None) -> None:
        """One round of the relay loop."""
        for key, mask in self.sel.select(timeout):
            if key.fileobj is self.listener:
                self._accept()
                continue
            if key.fileobj is self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(CHUNK)
                self._update_accepting()  # a port has become free
                continue
            session: _Session = key.data
            if session.port not in self.sessions:
                continue  # ended earlier in this round
            try:
                if key.fileobj is session.client:
                    self._client_io(session, mask)
                else:
                    self._port_io(session, mask)
            except _Ended as ended:
                self._end(session, str(ended))
                continue
            self._update(session)

    # ---- internals -----------------------------------------------------------------------

    def _free_ports(self) -> list[str]:
        return [p for p in self.ports if p not in self.sessions and p not in self._closing]

    def _update_accepting(self) -> None:
        free = bool(self._free_ports())
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
        for name in self._free_ports():  # a port that cannot be opened leaves the others
            try:
                fd = self._open(name)
                break
            except OSError as e:
                log.warning("cannot open %s for client %s: %s", name, peer, e)
        else:
            log.warning("client %s refused: no free port could be opened", peer)
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
        # Any error but "would block" (reset, ETIMEDOUT...) ends this session only.
        if mask & selectors.EVENT_READ:
            data = _read(functools.partial(s.client.recv, CHUNK), "client", "client closed")
            if data:
                s.client_sent = True
                s.to_port += data
                s.frames.feed(data)
        if mask & selectors.EVENT_WRITE and s.to_client:
            _write(s.client.send, s.to_client, "client")

    def _port_io(self, s: _Session, mask: int) -> None:
        # Any error but "would block" (EPIPE, ENODEV once unplugged...) ends this session
        # only. Writing comes first, so a port that fails it is not read any further.
        if mask & selectors.EVENT_WRITE and s.to_port:
            _write(functools.partial(os.write, s.fd), s.to_port, "port write")
        if mask & selectors.EVENT_READ:
            data = _read(
                functools.partial(_port.read_some, s.fd, CHUNK), "port read", "host side went away"
            )
            if data:
                s.to_client += data

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
        """Stop relaying ``s``; hand over what is buffered for each side, then close both."""
        log.info("%s on %s", why, s.port)
        self.sessions.pop(s.port, None)
        for obj in (s.client, s.fd):
            with contextlib.suppress(KeyError):
                self.sel.unregister(obj)
        to_port: list[bytes | memoryview] = [bytes(s.to_port)]
        if s.client_sent and s.frames.may_complete_a_message():
            # Completing it could deliver a message the client never finished; without it
            # a close frame would be swallowed as the rest of the frame. So nothing more:
            # the host ends that connection when the next client's header arrives after a
            # pause, or at its idle timeout.
            log.info("the client died inside a transfer frame on %s; no close is sent", s.port)
        elif s.client_sent:
            to_port += [*_padding(s.frames.missing()), CLOSE_FRAME]
        last = _LastWords(s, to_port)
        if last.flush(time.monotonic()):  # the usual case: all of it written at once
            last.finish()
        else:
            thread = threading.Thread(
                target=self._finish, args=(last,), name=f"bridge-end-{s.port}", daemon=True
            )
            self._closing[s.port] = thread
            thread.start()
        self._update_accepting()

    def _finish(self, last: _LastWords) -> None:
        """In a thread: finish writing an ended session's last bytes, then free its port."""
        try:
            last.flush(time.monotonic() + END_TIMEOUT)
        finally:
            last.finish()
            self._closing.pop(last.port, None)
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")


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
    if int(port) > MAX_TCP_PORT:
        raise ValueError(f"--listen: port {port} is over {MAX_TCP_PORT}")
    return host.strip("[]") or "127.0.0.1", int(port)
