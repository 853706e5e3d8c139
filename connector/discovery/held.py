"""Which sockets a qemu holds, as the kernel says: whether a socket path it names is its own.

A qemu's command line, and the config files it names (read when discovery looks, not when
qemu read them), say which socket paths are its ports, and a path is reported once, to the
first qemu that claims it. Whoever runs qemu writes those, so a qemu user could name
another VM's socket and have that VM's traffic served under its own guest's name. The
kernel knows better, through sock_diag and ``/proc/PID/fd``:

- :meth:`QemuSockets.listener_at`, when discovery reads a claim of a ``server=on`` path:
  the file at the path must be bound by a listening socket that qemu holds (one of its
  descriptors), whoever made it: qemu itself, or libvirt, which binds and passes it.
- :func:`holds_connection`, when the connector has connected to such a path: the
  connection must wait on, or have been accepted by, a socket qemu holds. Checked at
  each connect, since the file may have been replaced since discovery looked (qemu
  unlinks whatever is at its path and binds its own, so another VM's qemu given the same
  path takes it). The listener's ``SO_PEERCRED`` pid is not enough: it is the process
  that last called ``listen``, which may be libvirt's for a socket it passes (qemu 7.2
  listens on it again, other versions need not), or, with a qemu that binds before
  ``-daemonize`` forks, a parent that has exited (qemu 7.2 forks first).

Only sockets of the connector's network namespace are seen, so qemu must be in it.
"""

from __future__ import annotations

import os
import socket
import stat
from functools import cached_property
from typing import Generic, TypeVar

from connector.discovery.fdinfo import socket_inodes
from connector.discovery.sockdiag import BoundSocket, sockets_by_inode

K = TypeVar("K")
V = TypeVar("V")

# A proof that a qemu's socket is bound to a file is kept while qemu holds the socket and
# the file is still there, so that the qemu's later looks (every retry interval while its
# window lasts) ask the kernel nothing. Each costs a sock_diag question per socket qemu
# holds, 0.26 ms each with 20,000 sockets on the host. Kept for this many (qemu, path)
# pairs: a few ports for each of the host's qemus.
MAX_CLAIMS_KEPT = 4096


class Kept(Generic[K, V]):
    """At most ``most`` values by key, the oldest forgotten first: proofs that cost the
    kernel's work to make, which the caller checks still hold before it trusts one."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._values: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._values.get(key)

    def put(self, key: K, value: V) -> None:
        self._values.pop(key, None)
        self._values[key] = value
        while len(self._values) > self._most:
            del self._values[next(iter(self._values))]


# By (proc_root, pid, path): the listening socket's inode, as qemu's descriptor names it.
_listeners: Kept[tuple[str, int, str], tuple[int, BoundSocket]] = Kept(MAX_CLAIMS_KEPT)


class QemuSockets:
    """The sockets one qemu holds, for one look at it: its descriptors are read, and the
    kernel asked about them, once at most, however many ports it claims."""

    def __init__(self, pid: int, proc_root: str) -> None:
        self._pid = pid
        self._proc_root = proc_root
        self._details: dict[int, BoundSocket] | OSError | None = None

    @cached_property
    def inodes(self) -> set[int]:
        return socket_inodes(self._pid, self._proc_root)

    def listener_at(self, path: str) -> str | None:
        """Why the socket at ``path`` is not one that qemu listens on, or None when the
        kernel says it is (a listening socket qemu holds is bound to that very file)."""
        key = (self._proc_root, self._pid, path)
        kept = _listeners.get(key)
        if kept is not None and kept[0] in self.inodes and kept[1].is_at(path):
            return None
        try:
            st = os.lstat(path)
        except OSError as exc:
            return f"{path}: {exc.strerror}"
        if not stat.S_ISSOCK(st.st_mode):
            return f"{path} is not a socket"
        details = self._ask()
        if isinstance(details, OSError):
            return (
                f"the kernel's sock_diag, which would show whose socket {path} is, fails: {details}"
            )
        for inode, sock in details.items():
            if sock.listening and sock.is_file(st):
                _listeners.put(key, (inode, sock))
                return None
        return f"{path} is not a socket this qemu listens on: someone else's, not claimed"

    def _ask(self) -> dict[int, BoundSocket] | OSError:
        if self._details is None:
            try:
                self._details = sockets_by_inode(self.inodes)
            except OSError as exc:
                self._details = exc
        return self._details


def holds_connection(pid: int, conn: socket.socket, proc_root: str) -> bool:
    """Whether the connection ``conn`` made waits on, or was accepted by, a socket that
    process ``pid`` holds; OSError when sock_diag cannot be asked.

    Asked in that order, with qemu's descriptors read again for the second question: qemu
    may accept the connection in between, and then holds the accepted socket.
    """
    mine = os.fstat(conn.fileno()).st_ino
    if any(mine in s.waiting for s in sockets_by_inode(socket_inodes(pid, proc_root)).values()):
        return True
    accepted = sockets_by_inode({mine}).get(mine)
    peer = None if accepted is None else accepted.peer
    return peer is not None and peer in socket_inodes(pid, proc_root)
