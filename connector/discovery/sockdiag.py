"""Where unix sockets are bound, as the kernel knows it: the sock_diag netlink interface.

``/proc/PID/net/unix`` prints each socket's path as it was bound, so a socket qemu bound
as ``amqp.sock`` shows as ``amqp.sock``: which directory that was is not there, and a
file ``D/amqp.sock`` may be any socket of that name. sock_diag also gives the device and
inode of the file a socket is bound to (``UNIX_DIAG_VFS``), which tells whether a file *is*
that socket's; whether it listens; for a listening socket, the sockets whose connections
wait on it to be accepted (``UNIX_DIAG_ICONS``); and for a connected one, its peer
(``UNIX_DIAG_PEER``). Any user may ask (``ss -x`` does); the answer covers the sockets of
the asker's network namespace.

It is asked one question per socket (``sockets_by_inode``): the kernel looks each up in a
list of them all, 0.26 ms each with 20,000 sockets on the host, where a dump of every socket
would cost about 1 µs of parsing each (17 ms): a qemu holds a few.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from collections.abc import Collection
from dataclasses import dataclass

from connector.discovery.reading import decode

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
UDIAG_SHOW_NAME = 0x1
UDIAG_SHOW_VFS = 0x2
UDIAG_SHOW_PEER = 0x4
UDIAG_SHOW_ICONS = 0x8
UNIX_DIAG_NAME = 0
UNIX_DIAG_VFS = 1
UNIX_DIAG_PEER = 2
UNIX_DIAG_ICONS = 3
# A socket's state, as in TCP's: a unix socket that called listen() is in this one.
TCP_LISTEN = 10
_ALL_STATES = 0xFFFFFFFF
_NO_COOKIE = 0xFFFFFFFF
# The kernel's own dev_t (not the one stat returns): major above 20 bits of minor.
_MINOR_BITS = 20
# unix_diag_vfs.udiag_vfs_ino is 32 bits wide: an inode number is compared in its low bits.
_VFS_INO_MASK = 0xFFFFFFFF
# The kernel answers at once; this bounds only a kernel that never does.
_REPLY_TIMEOUT = 1.0
# One read takes several replies; the kernel fills what the buffer holds.
_RECV_BYTES = 64 * 1024

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQUEST = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie x2
_REPLY = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie x2
_ATTR = struct.Struct("=HH")  # len, type
_VFS = struct.Struct("=II")  # inode, kernel dev_t
_INODE = struct.Struct("=I")  # a socket's inode, in PEER (one) and ICONS (one each)
_ERROR = struct.Struct("=i")  # nlmsgerr's error, a negative errno (then the request)
# What follows the header in each kind of message that is read (at least).
_BODY_BYTES = {NLMSG_ERROR: _ERROR.size, SOCK_DIAG_BY_FAMILY: _REPLY.size}


@dataclass(frozen=True)
class BoundSocket:
    """A unix socket's bound name and the file it is bound to."""

    name: str  # as bound: relative when bound by a relative path; "" for abstract ones
    major: int | None = None  # the bound file's device, when it has a file
    minor: int | None = None
    ino: int | None = None  # the low 32 bits of the file's inode number
    listening: bool = False
    # A listening socket's connections not accepted yet, each by the inode of the socket
    # that connected (``sockets_by_inode`` only).
    waiting: frozenset[int] = frozenset()
    peer: int | None = None  # a connected socket's peer, when accepted (``sockets_by_inode``)

    def is_file(self, st: os.stat_result) -> bool:
        """Whether ``st`` (of a socket file) is this socket's file."""
        return (
            self.ino is not None
            and (os.major(st.st_dev), os.minor(st.st_dev)) == (self.major, self.minor)
            and st.st_ino & _VFS_INO_MASK == self.ino
        )

    def is_at(self, path: str) -> bool:
        """Whether the file at ``path`` is this socket's (the file itself, not a link to
        it: a link proves only where the link is)."""
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and self.is_file(st)


def sockets_by_inode(inodes: Collection[int]) -> dict[int, BoundSocket]:
    """What the kernel says of each of ``inodes`` that is a unix socket of this network
    namespace (name, file, listening, connections waiting, peer), asked one by one; an
    inode it does not find (another family's socket, one closed since) is left out.
    OSError when it cannot be asked."""
    show = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS
    found: dict[int, BoundSocket] = {}
    with _sock_diag() as sock:
        for inode in inodes:
            sock.sendall(_request(inode, show))
            with contextlib.suppress(FileNotFoundError):  # the kernel's ENOENT: not one
                _read_replies(sock.recv(_RECV_BYTES), {inode}, found)
        return found


def _sock_diag() -> socket.socket:
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    )
    sock.settimeout(_REPLY_TIMEOUT)
    return sock


def _request(inode: int, show: int) -> bytes:
    """A request for the unix socket ``inode``."""
    request = _REQUEST.pack(socket.AF_UNIX, 0, 0, _ALL_STATES, inode, show, _NO_COOKIE, _NO_COOKIE)
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    return header + request


def _read_replies(data: bytes, wanted: set[int], found: dict[int, BoundSocket]) -> None:
    """Add the wanted sockets among one read's replies.

    A message shorter than its kind's fixed part, or longer than the read, is an OSError
    (the caller's "sock_diag fails"), never a ``struct.error`` out of the look at a VM.
    """
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        body = data[offset + _NLMSGHDR.size : offset + length]
        if length < _NLMSGHDR.size + _BODY_BYTES.get(kind, 0) or offset + length > len(data):
            raise OSError(f"sock_diag message of {length} bytes, type {kind}, is cut short")
        if kind == NLMSG_ERROR:
            code = -_ERROR.unpack_from(body)[0]
            raise OSError(code, os.strerror(code))
        if kind == SOCK_DIAG_BY_FAMILY:
            _, _, state, _, inode, _, _ = _REPLY.unpack_from(body)
            if inode in wanted:
                found[inode] = _bound_socket(body[_REPLY.size :], state == TCP_LISTEN)
        offset += _align(length)


def _bound_socket(attrs: bytes, listening: bool) -> BoundSocket:
    """A reply's attributes: the name (a path up to its NUL; abstract names start with one),
    the bound file's inode and device, the peer, and the connections waiting."""
    name, vfs, peer, waiting = "", None, None, frozenset[int]()
    offset = 0
    while offset + _ATTR.size <= len(attrs):
        length, kind = _ATTR.unpack_from(attrs, offset)
        payload = attrs[offset + _ATTR.size : offset + length]
        if kind == UNIX_DIAG_NAME:
            name = decode(payload.split(b"\0", 1)[0])
        elif kind == UNIX_DIAG_VFS and len(payload) >= _VFS.size:
            vfs = _VFS.unpack_from(payload)
        elif kind == UNIX_DIAG_PEER and len(payload) >= _INODE.size:
            peer = _INODE.unpack_from(payload)[0] or None  # 0: not accepted yet
        elif kind == UNIX_DIAG_ICONS:
            count = len(payload) // _INODE.size
            waiting = frozenset(struct.unpack_from(f"={count}I", payload))
        offset += _align(max(length, _ATTR.size))
    major = minor = ino = None
    if vfs is not None:
        ino, dev = vfs
        major, minor = dev >> _MINOR_BITS, dev & ((1 << _MINOR_BITS) - 1)
    return BoundSocket(name, major, minor, ino, listening, waiting, peer)


def _align(length: int) -> int:
    """Netlink messages and attributes start on 4-byte boundaries."""
    return (length + 3) & ~3
