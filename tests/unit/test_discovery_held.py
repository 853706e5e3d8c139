"""Whose a socket is, as the kernel says: real sockets, held by real processes (the test
itself, or a child given the descriptor as libvirt gives qemu its listener), behind a
fake /proc for discovery's side."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

import connector.discovery.held
import connector.discovery.sockdiag
from connector.channels.endpoint import WrongPeer
from connector.channels.unix import UnixEndpoint
from connector.discovery.held import Kept, QemuSockets, holds_connection
from connector.discovery.sockdiag import BoundSocket, sockets_by_inode
from tests.integration.discovery_helpers import children
from tests.unit.test_discovery_resolve import FakeProc
from tests.unit.test_discovery_startdir import MALFORMED, PID, _FakeNetlink, inode, proc, sockets

__all__ = ["children", "proc", "sockets"]  # fixtures, used by name

# Holds the listening socket it is given (its descriptor in argv), as qemu holds the one
# libvirt passes
# (without listening again, as a qemu other than 7.2 may not): accepts one connection
# when told (a line on stdin), says so, and holds it.
HOLDER = (
    "import socket, sys\n"
    "listener = socket.socket(fileno=int(sys.argv[1]))\n"
    "sys.stdin.readline()\n"
    "conn, _ = listener.accept()\n"
    "print('accepted', flush=True)\n"
    "sys.stdin.readline()\n"
)


def listening(sockets: list[socket.socket], path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sockets.append(sock)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def connected(sockets: list[socket.socket], path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sockets.append(sock)
    sock.connect(str(path))
    return sock


# -- at discovery: is the file at a path bound by a socket qemu listens on -------------------


def test_a_socket_qemu_listens_on_is_its_claim(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    proc.real_socket(PID, 7, listening(sockets, tmp_path / "mine.sock"))
    assert QemuSockets(PID, str(proc.root)).listener_at(str(tmp_path / "mine.sock")) is None


def test_another_processs_socket_is_not_its_claim(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    """The claim of qemu's own socket of that name elsewhere, of a socket it holds bound
    there but not listening, of a link to its socket, or of a file that is not a socket,
    all fail; and what is missing says so (qemu may still be starting)."""
    proc.real_socket(PID, 7, listening(sockets, tmp_path / "mine.sock"))
    theirs = tmp_path / "theirs.sock"
    listening(sockets, theirs)
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sockets.append(idle)
    idle.bind(str(tmp_path / "idle.sock"))
    proc.real_socket(PID, 8, idle)
    os.symlink(tmp_path / "mine.sock", tmp_path / "link.sock")
    (tmp_path / "file").touch()
    held = QemuSockets(PID, str(proc.root))
    refused = "is not a socket this qemu listens on: someone else's, not claimed"
    assert held.listener_at(str(theirs)) == f"{theirs} {refused}"
    assert held.listener_at(str(tmp_path / "idle.sock")) == f"{tmp_path}/idle.sock {refused}"
    assert held.listener_at(str(tmp_path / "link.sock")) == f"{tmp_path}/link.sock is not a socket"
    assert held.listener_at(str(tmp_path / "file")) == f"{tmp_path}/file is not a socket"
    missing = tmp_path / "missing.sock"
    assert held.listener_at(str(missing)) == f"{missing}: No such file or directory"


def test_a_claim_once_proven_asks_the_kernel_nothing_while_it_holds(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A qemu is looked at every 0.2 s while its window lasts, and each question costs
    0.26 ms per socket it holds with 20,000 on the host: a proof is kept while qemu holds
    the socket and its file is at the path, and made again once either changes."""
    asked: list[Collection[int]] = []

    def counted(inodes: Collection[int]) -> dict[int, BoundSocket]:
        asked.append(inodes)
        return sockets_by_inode(inodes)

    monkeypatch.setattr(connector.discovery.held, "sockets_by_inode", counted)
    path = tmp_path / "mine.sock"
    proc.real_socket(PID, 7, listening(sockets, path))
    looks = [QemuSockets(PID, str(proc.root)).listener_at(str(path)) for _ in range(3)]
    assert (looks, len(asked)) == ([None, None, None], 1)
    os.unlink(path)
    listening(sockets, path)  # another socket, of another process, at the path
    assert QemuSockets(PID, str(proc.root)).listener_at(str(path)) is not None
    assert len(asked) == 2


def test_a_looks_ports_share_one_question_to_the_kernel(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[Collection[int]] = []
    monkeypatch.setattr(
        connector.discovery.held,
        "sockets_by_inode",
        lambda inodes: asked.append(inodes) or sockets_by_inode(inodes),
    )
    for fd, name in enumerate(("a.sock", "b.sock", "c.sock"), start=7):
        proc.real_socket(PID, fd, listening(sockets, tmp_path / name))
    held = QemuSockets(PID, str(proc.root))
    assert [held.listener_at(str(tmp_path / n)) for n in ("a.sock", "b.sock", "c.sock")] == [
        None
    ] * 3
    assert len(asked) == 1


def test_when_sock_diag_fails_no_claim_is_believed(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel without unix_diag, or one whose answer cannot be read: nothing shows
    whose the socket is, so it is nobody's claim."""
    path = tmp_path / "fresh.sock"
    proc.real_socket(PID, 7, listening(sockets, path))
    reply = MALFORMED["an error without its code"]
    monkeypatch.setattr(
        connector.discovery.sockdiag.socket, "socket", lambda *args: _FakeNetlink(reply)
    )
    why = QemuSockets(PID, str(proc.root)).listener_at(str(path))
    assert why == (
        f"the kernel's sock_diag, which would show whose socket {path} is, fails: "
        "sock_diag message of 18 bytes, type 2, is cut short"
    )


def test_kept_forgets_the_oldest_first() -> None:
    kept: Kept[str, int] = Kept(2)
    kept.put("a", 1)
    kept.put("b", 2)
    kept.put("a", 3)  # put again: now the newest
    kept.put("c", 4)
    assert (kept.get("a"), kept.get("b"), kept.get("c")) == (3, None, 4)


# -- at connect: does the connection wait on, or was it accepted by, a socket qemu holds ------


def holding(
    children: list[subprocess.Popen[Any]], listener: socket.socket
) -> subprocess.Popen[str]:
    """A process that holds ``listener``, which this test made."""
    fd = listener.fileno()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(fd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=(fd,),
    )
    children.append(holder)
    return holder


def test_a_connection_waiting_on_or_accepted_by_qemus_socket_is_qemus(
    tmp_path: Path, sockets: list[socket.socket], children: list[subprocess.Popen[Any]]
) -> None:
    """libvirt made the listener (so ``SO_PEERCRED`` names libvirt, here this test) and
    passed it to qemu: the connection is qemu's while it waits, and once qemu accepts."""
    path = tmp_path / "passed.sock"
    holder = holding(children, listening(sockets, path))
    conn = connected(sockets, path)
    assert sockets_by_inode({inode(conn)})[inode(conn)].peer is None  # not accepted yet
    assert holds_connection(holder.pid, conn, "/proc")
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("accept\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == "accepted\n"
    assert holds_connection(holder.pid, conn, "/proc")
    assert not holds_connection(os.getppid(), conn, "/proc")  # a process holding neither


def test_a_unix_channel_serves_qemus_passed_listener_and_refuses_another(
    tmp_path: Path, sockets: list[socket.socket], children: list[subprocess.Popen[Any]]
) -> None:
    path = tmp_path / "passed.sock"
    holder = holding(children, listening(sockets, path))
    served = UnixEndpoint(str(path), holder.pid).connect()
    served.close()
    with pytest.raises(WrongPeer) as refused:
        UnixEndpoint(str(path), os.getppid()).connect()
    assert str(refused.value) == (
        f"the socket there is not qemu pid {os.getppid()}'s: its listener was made by pid "
        f"{os.getpid()}, and qemu holds neither it nor this connection"
    )
    assert UnixEndpoint(str(path), os.getpid()).connect()  # SO_PEERCRED settles it
