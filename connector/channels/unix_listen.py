"""``unix-listen``: we listen on the path and qemu connects (``server=off,reconnect=N``).

One peer at a time: a channel is one virtio-serial port, so a second connection while one
is served is closed at once (and logged by the channel) rather than queued. For a
discovered channel the peer must be the qemu it was discovered for: the kernel records
the pid of the process that connected (``SO_PEERCRED``), which after ``-daemonize`` is the
running qemu, the pid discovery reports (qemu connects anew at each attempt). Any other
peer, another VM's qemu given the same path, is closed (``WrongPeer``, which the channel
logs and counts) and the channel listens on for its own.

The path comes from qemu's command line (or the operator's configuration), and the daemon
binds and unlinks with its own rights, root's or ``CAP_DAC_OVERRIDE``. Named by a qemu
user, it could be ``/run/dbus/system_bus_socket``, the connector's own control socket, or
a name where a service will look for its socket. So:

- **A socket someone serves is never removed.** A stale socket (an earlier run's) is
  replaced only when a connect to it is refused; one that accepts, or whose queue is full,
  or that is of another type (datagram, seqpacket), is served by someone: the channel is in
  error, which names the path, and tries again later. Closing the channel removes the
  socket only if it is still the connector's and nobody serves it.
- **For a discovered channel** (its spec names the qemu pid), the socket is made, and a
  stale one removed, only where that qemu's user could have done it itself: search on every
  directory of the path, write on the last, and in a sticky directory the stale file or
  the directory its own (``connector.discovery.access``). The directory is opened
  (``O_PATH``) and checked on that descriptor; the socket is then bound, probed and
  unlinked through ``/proc/self/fd/N/NAME`` and ``unlinkat`` on it, so a link swapped in for
  a directory of the path after the check cannot move any of it elsewhere. The
  configured path is the operator's, used as written.

Dropping to qemu's uid and groups in a short-lived child that binds and sends the socket
back (``SCM_RIGHTS``) would have the kernel check everything, ACLs and LSMs included, but
needs a process started per bind (a fork of the daemon, which runs threads, is not safe),
a wait for it kept off the loop, and CAP_SETUID/CAP_SETGID, which the unit does not grant.
The descriptor route needs none of that and leaves no window.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass

from connector.discovery.access import NotPermitted, credentials
from connector.discovery.settings import DEFAULT_PROC_ROOT

from .endpoint import (
    OUT_OF_RESOURCES,
    Endpoint,
    EndpointUnavailable,
    WrongPeer,
    peer_pid,
)

# An AF_UNIX address is at most 108 bytes (sun_path), NUL included for whoever reads it
# back as a string. ``/proc/self/fd/N/`` takes 16 to 22 of them, so a discovered socket's
# name may be up to about 85 bytes.
MAX_ADDRESS_BYTES = 107
# A discovered channel's socket is rw for all (0666): its qemu runs as another user.
CONNECTABLE_UMASK = 0o111


@dataclass(frozen=True)
class _Place:
    """Where the socket is: ``name`` in the directory held open as ``directory`` (None:
    ``name`` is the whole path, as configured), bound and probed by ``address``."""

    directory: int | None
    name: str
    address: str

    def lstat(self) -> os.stat_result | None:
        """What has the name now (a link itself, not followed), or None."""
        try:
            return os.lstat(self.name, dir_fd=self.directory)
        except FileNotFoundError:
            return None

    def close(self) -> None:
        if self.directory is not None:
            os.close(self.directory)


def served(address: str) -> str | None:
    """Why the socket at ``address`` must be left alone, or None when nobody serves it
    (a connect is refused) or it is gone: then it may be replaced.

    The probe is a connect: it succeeds (or finds the queue full) where someone listens,
    and fails with EPROTOTYPE where a datagram or seqpacket socket is bound. A stream socket
    bound and not listening yet reads as stale: a service between its bind and its listen
    would lose its name.
    """
    flags = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    with socket.socket(socket.AF_UNIX, flags) as probe:
        try:
            probe.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except BlockingIOError:
            return "a socket is there and someone serves it (its queue is full)"
        except OSError as err:
            if err.errno == errno.EPROTOTYPE:
                return "a socket is there and someone serves it (a datagram or seqpacket one)"
            return f"a socket is there, and whether someone serves it cannot be told ({err})"
        return "a socket is there and someone serves it (a connect to it succeeds)"


class UnixListenEndpoint(Endpoint):
    """Listen on a unix socket path for qemu to connect to."""

    def __init__(self, path: str, qemu_pid: int | None = None) -> None:
        super().__init__(path, qemu_pid)
        self._listener: socket.socket | None = None
        self._place: _Place | None = None
        self._bound: os.stat_result | None = None  # the socket file the listener made

    def _listen(self) -> socket.socket:
        if self._listener is None:
            place = self._find_place()
            try:
                self._listener = self._bind(place)
            except BaseException:
                place.close()
                raise
            self._place = place
        return self._listener

    def _find_place(self) -> _Place:
        """The configured path as it is; for a discovered channel, its directory held
        open, once qemu's user is known to be allowed to make the name there."""
        if self.qemu_pid is None:
            return _Place(None, self.path, self.path)
        parent, name = os.path.split(self.path)
        if not parent.startswith("/") or name in ("", ".", ".."):
            raise OSError(errno.EINVAL, "not an absolute path to a file name")
        directory = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        place = _Place(directory, name, f"/proc/self/fd/{directory}/{name}")
        try:
            if len(os.fsencode(place.address)) > MAX_ADDRESS_BYTES:
                raise OSError(
                    errno.ENAMETOOLONG,
                    f"a name of {len(os.fsencode(name))} bytes is too long to bind through "
                    "its directory",
                )
            user = credentials(self.qemu_pid, DEFAULT_PROC_ROOT)
            if user is None:
                raise OSError(errno.ESRCH, f"qemu pid {self.qemu_pid} is gone")
            try:
                user.check_may_replace(directory, place.lstat())
            except NotPermitted as why:
                raise OSError(
                    errno.EACCES, f"qemu's user (uid {user.uid}) {why}: not bound for it"
                ) from None
        except BaseException:
            place.close()
            raise
        return place

    def _bind(self, place: _Place) -> socket.socket:
        """Replace a stale socket at ``place`` (never one someone serves), then listen."""
        there = place.lstat()
        if there is not None and stat.S_ISSOCK(there.st_mode):
            why = served(place.address)
            if why is not None:
                raise OSError(errno.EADDRINUSE, f"{why}: not replaced")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(place.name, dir_fd=place.directory)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if place.directory is None:
                sock.bind(place.address)  # the operator's path, under the daemon's umask
            else:
                _bind_connectable(sock, place.address)
            sock.listen(1)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._bound = place.lstat()
        return sock

    def listen_fd(self) -> int:
        return self._listen().fileno()

    def connect(self) -> socket.socket | None:
        """Accept a waiting peer, or None when nobody has connected yet. A socket that
        cannot be bound is an OSError (the channel's ``error``), not a wait; a peer that
        is not the discovered qemu is closed, and WrongPeer says whose it was."""
        listener = self._listen()
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return None
        except OSError as err:
            if err.errno in OUT_OF_RESOURCES:
                raise  # the connector's problem, not the peer's: an error, not a wait
            raise EndpointUnavailable(str(err)) from err
        if self.qemu_pid is not None:
            pid = peer_pid(conn)
            if pid != self.qemu_pid:
                conn.close()
                raise WrongPeer(
                    f"refused pid {pid}: not qemu pid {self.qemu_pid}, whose channel this is"
                )
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
        """Stop listening, and remove the socket file if it is still the one the listener
        made and, with the listener closed, nobody serves it: whoever replaced it (qemu's
        user may, in its directory) keeps theirs."""
        if self._listener is None or self._place is None:
            return
        self._listener.close()
        self._listener = None
        place, self._place = self._place, None
        if _same_file(place.lstat(), self._bound) and served(place.address) is None:
            with contextlib.suppress(OSError):
                os.unlink(place.name, dir_fd=place.directory)
        place.close()


def _bind_connectable(sock: socket.socket, address: str) -> None:
    """Bind a discovered channel's socket so that its qemu, another user's process, may
    connect: connecting to a unix socket needs write permission on its file, which the
    daemon's umask (022) takes from everyone else. Only the discovered qemu is served
    whoever connects (``SO_PEERCRED``, in ``connect``), and the directory is one qemu's
    user may write anyway. The mode is set by the bind itself, under a umask changed for
    that call (the loop's thread is the only one that makes files): a chmod after it would
    follow whatever qemu's user had put at the name meanwhile."""
    old = os.umask(CONNECTABLE_UMASK)
    try:
        sock.bind(address)
    finally:
        os.umask(old)


def _same_file(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
