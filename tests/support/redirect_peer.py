"""A scripted broker that redirects: it answers a client's open with an open and then closes
the connection with ``amqp:connection:redirect`` and the info it was given.

What no real broker sends on demand: a redirect whose info is missing or wrong, one to
itself (a loop), and one after the connection has been open a while (``mid_connection``:
the close comes when the client begins its first session, after its open was answered).
Artemis redirects only at the open and always with a usable target
(``tests.brokers.artemis.RedirectingArtemis``).

It is the routing core's own ``Engine`` as a server, one thread serving one connection at a
time on a loopback port, SASL ANONYMOUS only (proton's own server has no PLAIN): connect to
it without credentials.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Any

from cproton_ffi import ffi, lib
from proton import Data, symbol

from connector.redirect import ESTABLISHMENT_FAILED, REDIRECT
from connector.routing.engine import IO_CHUNK, Engine, set_condition

LOOPBACK = "127.0.0.1"
# How long one connection may take before the peer gives up on it; a test that needs more
# is broken, not slow.
CONNECTION_TIMEOUT = 30.0


class RedirectPeer:
    """Redirects every connection to ``info`` (an info map: keys are sent as symbols)."""

    def __init__(self, info: dict[str, Any], *, mid_connection: bool = False) -> None:
        self.info = info
        self.mid_connection = mid_connection
        self.opens = 0  # clients' opens received
        self.hostnames: list[str | None] = []  # the hostname of each of those opens
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"amqp://{LOOPBACK}:{self.port}"

    def close(self) -> None:
        self._stop.set()
        # Closing alone would not wake the accept waiting in the thread; a shutdown does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(CONNECTION_TIMEOUT)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            with sock:
                self._redirect(sock)

    def _redirect(self, sock: socket.socket) -> None:
        engine = Engine(server=True)
        engine.configure_sasl("ANONYMOUS")
        conn = engine.connection
        try:
            while not lib.pn_connection_state(conn) & lib.PN_REMOTE_CLOSED:
                while out := engine.peek_output():
                    engine.pop_output(sock.send(out))
                ready, _, _ = select.select([sock], [], [], CONNECTION_TIMEOUT)
                data = sock.recv(IO_CHUNK) if ready else b""
                if not data:
                    return  # the client hung up (as the connector does after a redirect)
                engine.push(data)
                self._answer(engine)
        except OSError:
            return
        finally:
            engine.free()

    def _answer(self, engine: Engine) -> None:
        conn = engine.connection
        while (ev := lib.pn_collector_peek(engine.collector)) != ffi.NULL:
            kind = lib.pn_event_type(ev)
            if kind == lib.PN_CONNECTION_REMOTE_OPEN:
                self.opens += 1
                name = lib.pn_connection_remote_hostname(conn)
                self.hostnames.append(ffi.string(name).decode() if name != ffi.NULL else None)
                if not self.mid_connection:
                    _put(lib.pn_connection_properties(conn), {ESTABLISHMENT_FAILED: True})
                lib.pn_connection_open(conn)
                if not self.mid_connection:
                    self._close(conn)
            elif kind == lib.PN_SESSION_REMOTE_OPEN and self.mid_connection:
                self._close(conn)
            lib.pn_collector_pop(engine.collector)

    def _close(self, conn: Any) -> None:
        if lib.pn_connection_state(conn) & lib.PN_LOCAL_CLOSED:
            return
        cond = lib.pn_connection_condition(conn)
        set_condition(cond, REDIRECT, "go elsewhere")
        _put(lib.pn_condition_info(cond), self.info)
        lib.pn_connection_close(conn)


def _put(data_ptr: Any, value: dict[str, Any]) -> None:
    data = Data(data_ptr)
    data.clear()
    data.put_object({symbol(k): v for k, v in value.items()})
