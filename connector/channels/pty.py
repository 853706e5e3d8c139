"""``pty``: qemu holds the pty master (``-chardev pty``); we open the ``/dev/pts/N`` slave.

The slave is put in raw mode (no echo, no line discipline, 8-bit clean) and non-blocking.
qemu's exit shows as EOF, EIO or HUP on the slave, which means the VM is gone: the pts
number may be reused by an unrelated program, so the channel does not reopen it.
"""

from __future__ import annotations

import errno
import os
import termios
import tty

from .endpoint import Endpoint, EndpointGone, EndpointUnavailable, describe_os_error


class PtyEndpoint(Endpoint):
    """Open a pty slave in raw, non-blocking mode."""

    is_socket = False

    def connect(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENXIO, errno.EIO):
                raise EndpointGone(describe_os_error(err)) from err
            raise
        try:
            if not os.isatty(fd):
                raise EndpointUnavailable("not a terminal")
            tty.setraw(fd, termios.TCSANOW)
        except Exception:
            os.close(fd)
            raise
        return fd

    def peer_lost_means_gone(self) -> bool:
        return True
