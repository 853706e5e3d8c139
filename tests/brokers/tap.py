"""A TCP forwarder in front of a broker that records each client's AMQP open frame.

Neither Artemis 2.40 nor RabbitMQ 3.10 shows a client's open-frame properties (docs/brokers.md),
so a test that must prove "each guest reaches the broker as its own connection carrying its
identity" points the connector at `tap.url` instead of `broker.url`. The tap forwards bytes
unchanged both ways and decodes the client's open frame on the way: container-id, hostname and
properties, together with the address of the socket the tap opened to the broker. That address
is what the broker reports as the connection's remote address, so `OpenFrameTap.match()` joins a
broker's `list_connections()` rows to the open frames that produced them.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from proton import Data, Described

from tests.brokers.common import LOOPBACK, Broker

# Read size of the forwarding loops; big reads keep a 20 MiB message cheap.
CHUNK_BYTES = 256 * 1024
# A client's frames before its open are the SASL exchange and the protocol headers, all small;
# more than this without an open frame means the stream is not AMQP, so stop looking.
MAX_PREAMBLE_BYTES = 64 * 1024
# The open performative's descriptor code (AMQP 1.0 part 2.7.1).
OPEN_DESCRIPTOR = 0x10
# The fields of `open`, in order (AMQP 1.0 part 2.7.1).
OPEN_FIELDS = (
    "container_id",
    "hostname",
    "max_frame_size",
    "channel_max",
    "idle_time_out",
    "outgoing_locales",
    "incoming_locales",
    "offered_capabilities",
    "desired_capabilities",
    "properties",
)
_HEADER = b"AMQP"
_FRAME_HEADER = struct.Struct(">IBBH")  # size, data offset (in 4-byte words), type, channel


@dataclass
class TappedConnection:
    """One client connection through the tap, and its open frame once seen."""

    client_address: str
    upstream_address: str
    open: dict[str, Any] | None = None
    _pending: bytearray = field(default_factory=bytearray, repr=False)
    _done: bool = field(default=False, repr=False)

    @property
    def container_id(self) -> str | None:
        return self.open["container_id"] if self.open else None

    @property
    def properties(self) -> dict[str, Any] | None:
        return self.open["properties"] if self.open else None

    def feed(self, data: bytes) -> None:
        """Client-to-broker bytes: parse until the open frame is found (or clearly absent)."""
        if self._done:
            return
        self._pending += data
        while not self._done and self._step():
            pass
        if len(self._pending) > MAX_PREAMBLE_BYTES:
            self._done = True
            self._pending.clear()

    def _step(self) -> bool:
        """Consume one protocol header or frame from the buffer; False when more is needed."""
        buf = self._pending
        if buf[:4] == _HEADER[: len(buf[:4])] and len(buf) < 8:
            return False
        if buf[:4] == _HEADER:
            del buf[:8]
            return True
        if len(buf) < _FRAME_HEADER.size:
            return False
        size, doff, _type, _channel = _FRAME_HEADER.unpack_from(buf)
        if len(buf) < size:
            return False
        body = bytes(buf[doff * 4 : size])
        del buf[:size]
        if body:
            self._inspect(body)
        return True

    def _inspect(self, body: bytes) -> None:
        data = Data()
        data.decode(body)
        performative = data.get_object()
        if isinstance(performative, Described) and performative.descriptor == OPEN_DESCRIPTOR:
            values = list(performative.value)  # trailing fields left out mean null
            values += [None] * (len(OPEN_FIELDS) - len(values))
            self.open = {
                name: _plain(value) for name, value in zip(OPEN_FIELDS, values, strict=True)
            }
            self._done = True
            self._pending.clear()


def _plain(value: Any) -> Any:
    """Symbols and other str subclasses to str, maps and arrays to dict and list, recursively."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "elements"):  # proton Array
        return [_plain(v) for v in value.elements]
    return value


class OpenFrameTap:
    """Listens on a free loopback port and forwards every connection to `broker`."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._listener = socket.create_server((LOOPBACK, 0))
        self.host = LOOPBACK
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[TappedConnection] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="tap-accept", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"amqp://{self.host}:{self.port}"

    def opens(self) -> list[dict[str, Any]]:
        """The open frames seen so far, one per connection that sent one."""
        with self._lock:
            return [c.open for c in self.connections if c.open is not None]

    def match(self, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], TappedConnection]]:
        """Pair broker `list_connections()` rows with the tapped connection each came from."""
        with self._lock:
            by_address = {c.upstream_address: c for c in self.connections}
        return [
            (row, by_address[row["remote_address"]])
            for row in rows
            if row.get("remote_address") in by_address
        ]

    def close(self) -> None:
        """Stop accepting and drop every forwarded connection (both ends see EOF/reset)."""
        self._closed = True
        # Wake the accept first and wait for it: closed under a blocked accept, the
        # listener's fd number could be reused by a socket of the test's (a unix one, say)
        # before the accept ran again, which it would then take for its own.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=10)
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> OpenFrameTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, client_addr = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection((self.broker.host, self.broker.port))
            except OSError:
                client.close()  # broker down: the client sees its connection refused-ish
                continue
            local = upstream.getsockname()
            tapped = TappedConnection(
                f"{client_addr[0]}:{client_addr[1]}", f"{local[0]}:{local[1]}"
            )
            with self._lock:
                self.connections.append(tapped)
                self._sockets += [client, upstream]
            for src, dst, sink in ((client, upstream, tapped.feed), (upstream, client, None)):
                threading.Thread(
                    target=_pump, args=(src, dst, sink), name="tap-pump", daemon=True
                ).start()


def _pump(src: socket.socket, dst: socket.socket, sink: Any) -> None:
    """Copy src to dst until EOF or error, showing each chunk to `sink`; pass EOF on."""
    try:
        while chunk := src.recv(CHUNK_BYTES):
            if sink is not None:
                sink(chunk)
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.close()
