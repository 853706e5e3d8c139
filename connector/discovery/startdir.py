"""The directories a qemu's relative paths name: where it started, and where it ends up.

qemu opens its chardevs and reads its config files in the directory it was started in, and
only then may leave it: ``-daemonize`` moves it to ``/``, ``-chroot`` to the new root.
Until then, and for a qemu that does neither, ``/proc/PID/cwd`` is that directory. After,
it has to be found again. A candidate (qemu's working directory, or ``$PWD`` from its
environment, which a shell sets to where it ran qemu; a program that changes directory
before running qemu may leave it stale) counts only when it holds, under the very name qemu
bound it by, a socket qemu still holds: the kernel's sock_diag tells which file a socket is
bound to. ``/proc/net/unix`` would only tell that some socket of qemu's was bound by that
relative name, and any socket of that name in a wrong directory would pass for it. A
directory that cannot be proven is not guessed: the caller reports why.

What qemu opens again later it opens from where it is then: a ``server=off`` socket
chardev reconnects by the name it was given, so after ``-daemonize`` it connects to
``/NAME`` (seen with qemu 7.2), not to where it first tried.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

from connector.discovery.fdinfo import socket_inodes
from connector.discovery.held import Kept
from connector.discovery.reading import decode, read_bytes, readlink
from connector.discovery.sockdiag import BoundSocket, sockets_by_inode

# The kernel lets argv and the environment together take a quarter of the stack limit,
# 2 MiB under the usual 8 MiB; a larger environment is cut here, and a PWD past the cut is
# not seen.
MAX_ENVIRON_BYTES = 2 * 1024 * 1024
# Where -daemonize leaves qemu; it moves nowhere else.
_DAEMONIZED_CWD = "/"
# A proof asks the kernel about each socket qemu holds (0.26 ms each with 20,000 sockets
# on the host), and a qemu is looked at every retry interval while its window lasts. Where
# it started does not change, so a proof is kept, for this many qemus (the oldest
# forgotten first).
MAX_PROOFS_KEPT = 1024


@dataclass(frozen=True)
class _Proof:
    """A start directory proven, and the socket of qemu's that proved it."""

    directory: str
    inode: int  # the socket's, as qemu's descriptor names it
    sock: BoundSocket


# By (proc_root, pid). A proof counts again only while qemu holds that socket and its file
# is still in the directory: a pid handed to another process holds no such socket.
_proofs: Kept[tuple[str, int], _Proof] = Kept(MAX_PROOFS_KEPT)


Joined = tuple[str | None, str]  # a path, or None and why it is not known


class StartDir:
    """qemu's start directory, found the first time a relative path needs it."""

    def __init__(self, pid: int, moves: frozenset[str], proc_root: str) -> None:
        self._pid = pid
        self._moves = moves  # qemu's options that leave the start directory
        self._proc_root = proc_root

    def join(self, path: str) -> Joined:
        """``path`` as qemu opened it when it started: in the start directory if relative."""
        if path.startswith("/"):
            return path, ""
        directory, why = self._found
        return (None, why) if directory is None else (os.path.join(directory, path), "")

    def join_later(self, path: str) -> Joined:
        """``path`` as qemu opens it from now on (a ``server=off`` chardev reconnecting):
        in the directory qemu ends up in if relative."""
        if path.startswith("/") or not self._moves:
            return self.join(path)
        if self._moves == {"-daemonize"}:
            return os.path.join(_DAEMONIZED_CWD, path), ""
        moves = ", ".join(sorted(self._moves))
        return None, f"qemu opens it again from inside its chroot ({moves}), which is not followed"

    @cached_property
    def _found(self) -> Joined:
        cwd = readlink(f"{self._proc_root}/{self._pid}/cwd")
        if self._still_there(cwd):
            return cwd, "" if cwd is not None else "its working directory cannot be read"
        return self._proven(cwd)

    def _still_there(self, cwd: str | None) -> bool:
        """Whether qemu's working directory is where it started: no option moves it, or
        only -daemonize does and has not yet (it goes to ``/`` and nowhere else)."""
        if not self._moves:
            return True
        return self._moves == {"-daemonize"} and cwd not in (None, _DAEMONIZED_CWD)

    def _proven(self, cwd: str | None) -> Joined:
        """The first candidate that holds a socket qemu bound by a relative name (or the
        directory a kept proof names, while it holds)."""
        why = f"qemu has left the directory it started in ({', '.join(sorted(self._moves))})"
        inodes = socket_inodes(self._pid, self._proc_root)
        key = (self._proc_root, self._pid)
        kept = _proofs.get(key)
        if kept is not None and kept.inode in inodes and _holds(kept.directory, kept.sock):
            return kept.directory, ""
        try:
            relative = _relative_sockets(inodes)
        except OSError as exc:
            return None, f"{why}; the kernel's sock_diag, which would show where, fails: {exc}"
        if not relative:
            return None, f"{why} and holds no socket it bound by a relative name to show where"
        candidates = [d for d in dict.fromkeys((cwd, self._pwd())) if d and d.startswith("/")]
        for directory in candidates:
            for inode, sock in relative.items():
                if _holds(directory, sock):
                    _proofs.put(key, _Proof(directory, inode, sock))
                    return directory, ""
        return None, (
            f"{why}; no candidate ({', '.join(candidates) or 'none'}) holds the socket it bound "
            f"as {next(iter(relative.values())).name}"
        )

    def _pwd(self) -> str | None:
        """``$PWD`` from qemu's environment (the first, as getenv reads it)."""
        raw = read_bytes(f"{self._proc_root}/{self._pid}/environ", MAX_ENVIRON_BYTES) or b""
        for entry in raw.split(b"\0"):
            if entry.startswith(b"PWD="):
                return decode(entry[len(b"PWD=") :])
        return None


def _relative_sockets(inodes: set[int]) -> dict[int, BoundSocket]:
    """Those of ``inodes`` (qemu's sockets) that were bound by a relative name, by inode
    (OSError: sock_diag fails)."""
    bound = sockets_by_inode(inodes)
    return {i: s for i, s in bound.items() if s.name and not s.name.startswith("/")}


def _holds(directory: str, sock: BoundSocket) -> bool:
    """Whether ``directory`` holds ``sock``'s file under its bound name."""
    return sock.is_at(os.path.join(directory, sock.name))
