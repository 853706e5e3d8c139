"""Where unix sockets are bound, as the kernel knows it: the sock_diag netlink interface.

``/proc/PID/net/unix`` prints each socket's path as it was bound, so a socket qemu bound
as ``amqp.sock`` shows as ``amqp.sock``: which directory that was is not there, and a
file ``D/amqp.sock`` may be any socket of that name. sock_diag also gives the device and
inode of the file a socket is bound to (``UNIX_DIAG_VFS``), which tells whether a file *is*
that socket's. Any user may ask (``ss -x`` does); the answer covers the sockets of the
asker's network namespace.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass

from connector.discovery.reading import decode

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
UDIAG_SHOW_NAME = 0x1
UDIAG_SHOW_VFS = 0x2
UNIX_DIAG_NAME = 0
UNIX_DIAG_VFS = 1
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

    def is_file(self, st: os.stat_result) -> bool:
        """Whether ``st`` (of a socket file) is this socket's file."""
        return (
            self.ino is not None
            and (os.major(st.st_dev), os.minor(st.st_dev)) == (self.major, self.minor)
            and st.st_ino & _VFS_INO_MASK == self.ino
        )


def bound_sockets(inodes: Collection[int]) -> dict[int, BoundSocket]:
    """The bound name and file of each of ``inodes`` (socket inodes, as in
    ``/proc/PID/fd``) that the kernel lists; OSError when it cannot be asked."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(_REPLY_TIMEOUT)
        show = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS
        request = _REQUEST.pack(socket.AF_UNIX, 0, 0, _ALL_STATES, 0, show, _NO_COOKIE, _NO_COOKIE)
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        )
        sock.sendall(header + request)
        found: dict[int, BoundSocket] = {}
        while not _read_replies(sock.recv(_RECV_BYTES), set(inodes), found):
            pass
        return found


def _read_replies(data: bytes, wanted: set[int], found: dict[int, BoundSocket]) -> bool:
    """Add the wanted sockets among one read's replies; whether the dump is done.

    A message shorter than its kind's fixed part, or longer than the read, is an OSError
    (the caller's "sock_diag fails"), never a ``struct.error`` out of the look at a VM.
    """
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        body = data[offset + _NLMSGHDR.size : offset + length]
        if length < _NLMSGHDR.size + _BODY_BYTES.get(kind, 0) or offset + length > len(data):
            raise OSError(f"sock_diag message of {length} bytes, type {kind}, is cut short")
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            code = -_ERROR.unpack_from(body)[0]
            raise OSError(code, os.strerror(code))
        if kind == SOCK_DIAG_BY_FAMILY:
            inode = _REPLY.unpack_from(body)[4]
            if inode in wanted:
                found[inode] = _bound_socket(body[_REPLY.size :])
        offset += _align(length)
    return not data


def _bound_socket(attrs: bytes) -> BoundSocket:
    """A reply's attributes: the name (a path up to its NUL; abstract names start with one)
    and the bound file's inode and device."""
    name, vfs = "", None
    offset = 0
    while offset + _ATTR.size <= len(attrs):
        length, kind = _ATTR.unpack_from(attrs, offset)
        payload = attrs[offset + _ATTR.size : offset + length]
        if kind == UNIX_DIAG_NAME:
            name = decode(payload.split(b"\0", 1)[0])
        elif kind == UNIX_DIAG_VFS and len(payload) >= _VFS.size:
            vfs = _VFS.unpack_from(payload)
        offset += _align(max(length, _ATTR.size))
    if vfs is None:
        return BoundSocket(name)
    ino, dev = vfs
    return BoundSocket(name, dev >> _MINOR_BITS, dev & ((1 << _MINOR_BITS) - 1), ino)


def _align(length: int) -> int:
    """Netlink messages and attributes start on 4-byte boundaries."""
    return (length + 3) & ~3
