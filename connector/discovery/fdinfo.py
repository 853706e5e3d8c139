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


def unix_socket_path(pid: int, fd: int, proc_root: str = "/proc") -> str | None:
    """The path a unix socket descriptor of ``pid`` is bound to, or ``None``."""
    target = readlink(f"{proc_root}/{pid}/fd/{fd}")
    if not target or not target.startswith("socket:[") or not target.endswith("]"):
        return None
    inode = target[len("socket:[") : -1]
    table = read_text(f"{proc_root}/{pid}/net/unix") or ""
    # After a header line (Num RefCount Protocol Flags Type St Inode Path), one line each.
    for line in table.split("\n")[1:]:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[6] == inode and fields[7].startswith("/"):
            return fields[7]
    return None
