"""``unix``: qemu listens on the socket (``server=on``, libvirt ``mode='bind'``); we connect.

When the socket is missing or refuses, the channel waits and retries with backoff; qemu's
EOF means the VM went away, and for a socket qemu may come back (a restarted VM), so EOF
is 'retry', not 'gone', unless discovery says the VM was destroyed.

For a discovered channel the socket must be its qemu's, at each connect: whatever listens
at the path then is served under that qemu's guest's name, and the file may have changed
since discovery proved it (qemu unlinks whatever is at its path and binds its own, so
another VM's qemu given the same path takes it). The listener's ``SO_PEERCRED`` pid, that
of the process that last called ``listen`` on it, being qemu's settles it at once: so it
is for a socket qemu binds, and with qemu 7.2 for one libvirt passes too (qemu listens on
it again). Otherwise (a listener another process made and passed, or one a qemu bound
before ``-daemonize`` forked: the pid is its parent's, gone) the kernel is asked whether
qemu holds the socket this connection waits on, or the one that accepted it
(``connector.discovery.held``).
"""

from __future__ import annotations

import errno
import socket

from connector.discovery.held import holds_connection
from connector.discovery.settings import DEFAULT_PROC_ROOT

from .endpoint import (
    Endpoint,
    EndpointUnavailable,
    WrongPeer,
    describe_os_error,
    peer_pid,
)

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
        try:
            self._check_listener(sock)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _check_listener(self, sock: socket.socket) -> None:
        """WrongPeer unless the socket ``sock`` reached is the discovered qemu's."""
        qemu = self.qemu_pid
        if qemu is None:
            return  # configured: the operator's path, whoever listens there
        made_by = peer_pid(sock)
        if made_by == qemu:
            return
        try:
            if holds_connection(qemu, sock, DEFAULT_PROC_ROOT):
                return
            why = "qemu holds neither it nor this connection"
        except OSError as exc:
            why = f"the kernel's sock_diag, which would show whether qemu holds it, fails: {exc}"
        raise WrongPeer(
            f"the socket there is not qemu pid {qemu}'s: its listener was made by pid "
            f"{made_by}, and {why}"
        )
