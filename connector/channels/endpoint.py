"""What every channel kind offers the loop: a way to get a connected, non-blocking fd.

An endpoint does not read or write; the channel does. It only knows how to reach the
other end of the virtio-serial port, and what a failure to do so means.
"""

from __future__ import annotations

import abc
import errno
import os
import socket
import struct

# Errors that say the connector itself ran out of descriptors or memory. They are never
# "the other end is not there yet": the channel reports them as an error (a warning, state
# ``error``) and retries, where a missing peer is only waited for.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class EndpointGone(Exception):
    """The endpoint can never come back (the VM is gone); the channel ends."""


class EndpointUnavailable(Exception):
    """The endpoint is not reachable now (socket missing, refused); try again later."""


class WrongPeer(Exception):
    """The far end is not the qemu the channel was discovered for, as the kernel says:
    refused. The message says whose it is instead, with both pids."""


# struct ucred, as SO_PEERCRED returns it: pid, uid, gid.
_UCRED = struct.Struct("=iII")


def peer_pid(sock: socket.socket) -> int:
    """The pid the kernel recorded for a unix socket's peer (``SO_PEERCRED``): the process
    that connected, for an accepted socket; the one that called ``listen``, for a socket
    that connected. 0 when that process is in a PID namespace the daemon cannot see."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[0])


class Endpoint(abc.ABC):
    """One kind of host-side chardev endpoint."""

    # Socket endpoints use send/recv; a pty uses read/write.
    is_socket = True

    def __init__(self, path: str, qemu_pid: int | None = None) -> None:
        self.path = path
        # The qemu the channel was discovered for, whose user's rights and sockets count
        # (``unix``, ``unix-listen``); None for a channel the operator configured.
        self.qemu_pid = qemu_pid

    @abc.abstractmethod
    def connect(self) -> socket.socket | int | None:
        """Return a connected non-blocking socket or fd, None if a peer is awaited
        (:meth:`listen_fd` becomes readable), or raise EndpointUnavailable / EndpointGone."""

    def listen_fd(self) -> int | None:
        """An fd to watch for an incoming peer (unix-listen only)."""
        return None

    def peer_lost_means_gone(self) -> bool:
        """Whether EOF from the peer means the VM is gone rather than 'reconnect'."""
        return False

    def close(self) -> None:
        """Release anything held for the endpoint itself (a listening socket)."""
        return None


def describe_os_error(err: OSError) -> str:
    """A short operator-facing reason for an OSError on a channel path."""
    return f"{os.strerror(err.errno) if err.errno else err}"
