"""What a process's open descriptors point at: pty masters and unix sockets.

qemu's command line says ``-chardev pty,id=c1`` but not which ``/dev/pts/N`` it got, and
libvirt passes listening sockets as ``fd=N`` without a path. Both answers are in /proc:
a ``/dev/ptmx`` descriptor's ``fdinfo`` has ``tty-index: N``, and a socket descriptor's
inode is listed with its bound path in the process's ``net/unix``. ``proc_root`` is
injectable so tests can build a fake /proc.
"""

from __future__ import annotations

import os

from connector.discovery.reading import read_text, readlink

PTMX_TARGETS = frozenset({"/dev/ptmx", "/dev/pts/ptmx"})


def _fd_numbers(pid: int, proc_root: str) -> list[int]:
    try:
        names = os.listdir(f"{proc_root}/{pid}/fd")
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def pty_indices(pid: int, proc_root: str = "/proc") -> list[int]:
    """The pty index of each ``/dev/ptmx`` descriptor ``pid`` holds, in descriptor order.

    The kernel hands out the lowest free descriptor, so descriptor order is creation
    order unless the process closed a lower descriptor in between.
    """
    indices: list[int] = []
    for fd in _fd_numbers(pid, proc_root):
        if readlink(f"{proc_root}/{pid}/fd/{fd}") not in PTMX_TARGETS:
            continue
        index = _tty_index(f"{proc_root}/{pid}/fdinfo/{fd}")
        if index is not None:
            indices.append(index)
    return indices


def _tty_index(fdinfo_path: str) -> int | None:
    for line in (read_text(fdinfo_path) or "").splitlines():
        key, _, value = line.partition(":")
        if key == "tty-index":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def socket_inodes(pid: int, proc_root: str = "/proc") -> set[int]:
    """The inodes of the sockets ``pid`` holds (``/proc/PID/fd/N`` -> ``socket:[INODE]``)."""
    inodes = (
        _socket_inode(readlink(f"{proc_root}/{pid}/fd/{fd}")) for fd in _fd_numbers(pid, proc_root)
    )
    return {inode for inode in inodes if inode is not None}


def _socket_inode(target: str | None) -> int | None:
    """The inode of a descriptor's link target when it is a socket's (``socket:[INODE]``)."""
    if not target or not target.startswith("socket:[") or not target.endswith("]"):
        return None
    inode = target[len("socket:[") : -1]
    return int(inode) if inode.isascii() and inode.isdigit() else None


def unix_socket_path(pid: int, fd: int, proc_root: str = "/proc") -> str | None:
    """The path a unix socket descriptor of ``pid`` is bound to, or ``None``.

    ``net/unix`` lists every socket of the network namespace, each path as bound, and a
    path may hold newlines: anyone can bind one that prints as a second row claiming
    this socket's inode for a path of their choosing. Only an inode claimed by exactly
    one row is believed; with two, one is forged and neither can be told from the other.
    """
    inode = _socket_inode(readlink(f"{proc_root}/{pid}/fd/{fd}"))
    if inode is None:
        return None
    table = read_text(f"{proc_root}/{pid}/net/unix") or ""
    # After a header line (Num RefCount Protocol Flags Type St Inode Path), one line each.
    rows = [line.split(None, 7) for line in table.split("\n")[1:]]
    claims = [fields for fields in rows if len(fields) >= 7 and fields[6] == str(inode)]
    if len(claims) != 1 or len(claims[0]) != 8 or not claims[0][7].startswith("/"):
        return None
    return claims[0][7]
