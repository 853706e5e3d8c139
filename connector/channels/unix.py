"""``unix``: qemu listens on the socket (``server=on``, libvirt ``mode='bind'``); we connect.

When the socket is missing or refuses, the channel waits and retries with backoff; qemu's
EOF means the VM went away, and for a socket qemu may come back (a restarted VM), so EOF
is 'retry', not 'gone', unless discovery says the VM was destroyed.
"""

from __future__ import annotations

import errno
import socket

from .endpoint import Endpoint, EndpointUnavailable, describe_os_error

_RETRYABLE = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ENOTDIR}


class UnixEndpoint(Endpoint):
    """Connect to qemu's listening unix socket."""

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as err:
            sock.close()
            if err.errno in _RETRYABLE:
                raise EndpointUnavailable(describe_os_error(err)) from err
            raise
        sock.setblocking(False)
        return sock
