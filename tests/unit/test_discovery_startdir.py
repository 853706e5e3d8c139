"""The directory qemu started in, found again after -daemonize or -chroot left it: real
sockets, bound the way qemu binds a relative path, behind a fake /proc."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

import connector.discovery.sockdiag
import connector.discovery.startdir
from connector.discovery.sockdiag import (
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    BoundSocket,
    sockets_by_inode,
)
from connector.discovery.startdir import StartDir
from tests.unit.test_discovery_resolve import QEMU, FakeProc, bind_in

PID = 40
DAEMONIZE = frozenset({"-daemonize"})


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    (tmp_path / "proc").mkdir()
    fake = FakeProc(tmp_path / "proc")
    fake.process(PID, QEMU, ["qemu"])
    return fake


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def bind(sockets: list[socket.socket], directory: Path, name: str) -> socket.socket:
    """A listening socket bound by ``name`` relative to ``directory``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sockets.append(sock)
    bind_in(sock, directory, name)
    sock.listen()
    return sock


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_sock_diag_gives_the_name_as_bound_and_the_file(
    tmp_path: Path, sockets: list[socket.socket]
) -> None:
    relative = bind(sockets, tmp_path, "amqp.sock")
    absolute = bind(sockets, tmp_path, str(tmp_path / "abs.sock"))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(b"\0qvc-test-abstract")
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sockets.extend([abstract, unbound])
    found = sockets_by_inode({inode(s) for s in sockets})
    assert found[inode(relative)].name == "amqp.sock"
    assert found[inode(absolute)].name == str(tmp_path / "abs.sock")
    assert found[inode(relative)].is_file(os.lstat(tmp_path / "amqp.sock"))
    assert not found[inode(relative)].is_file(os.lstat(tmp_path / "abs.sock"))
    assert found[inode(abstract)].name == ""  # a name, not a file
    assert found[inode(abstract)].ino is None
    assert found[inode(unbound)] == BoundSocket("")
    assert inode(relative) not in sockets_by_inode({inode(unbound)})


def test_a_qemu_that_does_not_move_is_where_its_working_directory_is(proc: FakeProc) -> None:
    proc.cwd(PID, "/home/alice/vm", pwd="/stale")
    start = StartDir(PID, frozenset(), str(proc.root))
    assert start.join("amqp.sock") == ("/home/alice/vm/amqp.sock", "")
    assert start.join("/run/a.sock") == ("/run/a.sock", "")
    assert start.join_later("listen.sock") == ("/home/alice/vm/listen.sock", "")


def test_a_daemonized_qemu_not_yet_moved_needs_no_proof(proc: FakeProc) -> None:
    """-daemonize leaves for / and nowhere else: any other directory is the start."""
    proc.cwd(PID, "/home/alice/vm")
    start = StartDir(PID, DAEMONIZE, str(proc.root))
    assert start.join("a.sock") == ("/home/alice/vm/a.sock", "")
    # What it opens again, it opens from / once it has gone there, which it will.
    assert start.join_later("listen.sock") == ("/listen.sock", "")


def test_after_daemonize_pwd_counts_when_it_holds_qemus_socket(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    (tmp_path / "vm").mkdir()
    proc.cwd(PID, "/", pwd=tmp_path / "vm")
    proc.real_socket(PID, 7, bind(sockets, tmp_path / "vm", "amqp.sock"))
    start = StartDir(PID, DAEMONIZE, str(proc.root))
    assert start.join("vm.cfg") == (f"{tmp_path}/vm/vm.cfg", "")
    assert start.join_later("listen.sock") == ("/listen.sock", "")


def test_after_daemonize_a_stale_pwd_is_not_taken_for_the_start(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    """qemu started in vm/ but $PWD says other/ (a launcher changed directory without
    setting it), where another socket of the same name is bound: the name as bound, which
    is all /proc/net/unix shows, proves nothing; the file's identity does."""
    (tmp_path / "vm").mkdir()
    (tmp_path / "other").mkdir()
    proc.cwd(PID, "/", pwd=tmp_path / "other")
    proc.real_socket(PID, 7, bind(sockets, tmp_path / "vm", "amqp.sock"))
    bind(sockets, tmp_path / "other", "amqp.sock")  # someone else's, same name
    start = StartDir(PID, DAEMONIZE, str(proc.root))
    assert start.join("amqp.sock") == (
        None,
        "qemu has left the directory it started in (-daemonize); no candidate "
        f"(/, {tmp_path}/other) holds the socket it bound as amqp.sock",
    )


def test_a_link_to_qemus_socket_proves_only_where_the_link_is(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    (tmp_path / "vm").mkdir()
    (tmp_path / "other").mkdir()
    proc.cwd(PID, "/", pwd=tmp_path / "other")
    proc.real_socket(PID, 7, bind(sockets, tmp_path / "vm", "amqp.sock"))
    os.symlink(tmp_path / "vm" / "amqp.sock", tmp_path / "other" / "amqp.sock")
    assert StartDir(PID, DAEMONIZE, str(proc.root)).join("amqp.sock")[0] is None


def test_after_daemonize_without_a_relative_socket_nothing_shows_the_start(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    proc.cwd(PID, "/", pwd=tmp_path)
    proc.real_socket(PID, 7, bind(sockets, tmp_path, str(tmp_path / "abs.sock")))
    proc.other_fd(PID, 8, "/dev/null")
    start = StartDir(PID, DAEMONIZE, str(proc.root))
    path, why = start.join("vm.cfg")
    assert path is None
    assert why.endswith(
        "(-daemonize) and holds no socket it bound by a relative name to show where"
    )


@pytest.mark.parametrize("moves", [{"-chroot"}, {"-chroot", "-daemonize"}])
def test_after_chroot_the_working_directory_needs_proof_too(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket], moves: set[str]
) -> None:
    """-chroot DIR ends in DIR's root, which /proc shows as DIR: not the start, though
    not / either."""
    (tmp_path / "vm").mkdir()
    (tmp_path / "jail").mkdir()
    proc.cwd(PID, tmp_path / "jail", pwd=tmp_path / "vm")
    proc.real_socket(PID, 7, bind(sockets, tmp_path / "vm", "amqp.sock"))
    bind(sockets, tmp_path / "jail", "amqp.sock")
    start = StartDir(PID, frozenset(moves), str(proc.root))
    assert start.join("amqp.sock") == (f"{tmp_path}/vm/amqp.sock", "")
    path, why = start.join_later("listen.sock")
    assert path is None
    assert why.startswith("qemu opens it again from inside its chroot (-chroot")


def test_when_sock_diag_fails_the_start_is_not_guessed(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(inodes: object) -> dict[int, object]:
        raise OSError(2, "No such file or directory")  # no unix_diag in this kernel

    monkeypatch.setattr(connector.discovery.startdir, "sockets_by_inode", refused)
    proc.cwd(PID, "/", pwd=tmp_path)
    proc.real_socket(PID, 7, bind(sockets, tmp_path, "amqp.sock"))
    start = StartDir(PID, DAEMONIZE, str(proc.root))
    path, why = start.join("amqp.sock")
    assert path is None
    assert "; the kernel's sock_diag, which would show where, fails: [Errno 2]" in why


def test_a_process_gone_has_no_start(proc: FakeProc) -> None:
    start = StartDir(99, frozenset(), str(proc.root))
    assert start.join("a.sock") == (None, "its working directory cannot be read")
    assert StartDir(99, DAEMONIZE, str(proc.root)).join("a.sock")[0] is None


def _netlink(length: int, kind: int, body: bytes) -> bytes:
    """One netlink message as the kernel would frame it: ``length`` as its header says."""
    return struct.pack("=IHHII", length, kind, 0, 1, 0) + body


# Replies no kernel sends, but a parser of someone else's bytes must not trust: each says it
# holds more than it does.
MALFORMED = {
    "a socket's reply cut short": _netlink(16 + 72, SOCK_DIAG_BY_FAMILY, b"\1" * 4),
    "an error without its code": _netlink(18, NLMSG_ERROR, b"\0\0"),
}


class _FakeNetlink:
    """A netlink socket whose kernel answers ``reply``, then nothing more."""

    def __init__(self, reply: bytes) -> None:
        self._replies = [reply]

    def __enter__(self) -> _FakeNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def settimeout(self, timeout: float) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        pass

    def recv(self, size: int) -> bytes:
        return self._replies.pop(0) if self._replies else b""


@pytest.mark.parametrize("reply", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_sock_diag_reply_is_sock_diag_failing(
    proc: FakeProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reply: bytes
) -> None:
    """Not an exception out of the look at the whole VM, which would lose its other
    ports too: the start is not proven, and the relative path says why."""
    monkeypatch.setattr(
        connector.discovery.sockdiag.socket, "socket", lambda *args: _FakeNetlink(reply)
    )
    proc.cwd(PID, "/", pwd=tmp_path)
    proc.other_fd(PID, 7, "socket:[7]")
    path, why = StartDir(PID, DAEMONIZE, str(proc.root)).join("amqp.sock")
    assert path is None
    assert "; the kernel's sock_diag, which would show where, fails: " in why


def test_a_start_once_proven_is_not_proven_again_at_each_look(
    proc: FakeProc, tmp_path: Path, sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proof asks the kernel about each socket qemu holds (0.26 ms each with 20,000 on
    the host), and a qemu is looked at every 0.2 s for 5 s while its
    libvirt file may come or a port is unresolved. Where qemu started does not change:
    the proof is kept while qemu holds the socket that made it and the socket is there."""
    asked: list[object] = []

    def counted(inodes: Collection[int]) -> dict[int, BoundSocket]:
        asked.append(inodes)
        return sockets_by_inode(inodes)

    monkeypatch.setattr(connector.discovery.startdir, "sockets_by_inode", counted)
    (tmp_path / "vm").mkdir()
    proc.cwd(PID, "/", pwd=tmp_path / "vm")
    sock = bind(sockets, tmp_path / "vm", "amqp.sock")
    proc.real_socket(PID, 7, sock)
    looks = [StartDir(PID, DAEMONIZE, str(proc.root)).join("vm.cfg") for _ in range(3)]
    assert looks == [(f"{tmp_path}/vm/vm.cfg", "")] * 3
    assert len(asked) == 1
    # Its file gone from the directory (or the socket from qemu): proven again, and not.
    os.unlink(tmp_path / "vm" / "amqp.sock")
    assert StartDir(PID, DAEMONIZE, str(proc.root)).join("vm.cfg")[0] is None
    assert len(asked) == 2
