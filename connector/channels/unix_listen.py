"""``unix-listen``: we listen on the path and qemu connects (``server=off,reconnect=N``).

One peer at a time: a channel is one virtio-serial port, so a second connection while one
is served is closed at once (and logged by the channel) rather than queued.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from .endpoint import OUT_OF_RESOURCES, Endpoint, EndpointUnavailable


class UnixListenEndpoint(Endpoint):
    """Listen on a unix socket path for qemu to connect to."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._listener: socket.socket | None = None

    def _listen(self) -> socket.socket:
        if self._listener is None:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)  # a stale socket from an earlier run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(self.path)
                sock.listen(1)
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            self._listener = sock
        return self._listener

    def listen_fd(self) -> int:
        return self._listen().fileno()

    def connect(self) -> socket.socket | None:
        """Accept a waiting peer, or None when nobody has connected yet."""
        try:
            conn, _ = self._listen().accept()
        except BlockingIOError:
            return None
        except OSError as err:
            if err.errno in OUT_OF_RESOURCES:
                raise  # the connector's problem, not the peer's: an error, not a wait
            raise EndpointUnavailable(str(err)) from err
        conn.setblocking(False)
        return conn

    def reject_extra(self) -> bool:
        """Accept and close a second peer while one is served; True if there was one."""
        try:
            conn, _ = self._listen().accept()
        except OSError:
            return False
        conn.close()
        return True

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
