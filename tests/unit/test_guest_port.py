"""connector.guest.port: finding a port by name, opening it, draining stale bytes.

Real ptys and socketpairs stand in for the virtio port; fake /dev and /sys trees stand in
for the guest's udev link and sysfs entries.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import socket
import threading
import time
import tty
from pathlib import Path

import pytest

from connector.guest.port import (
    PortNotFound,
    drain,
    find_port,
    host_connected,
    open_port,
    wait_fd,
)


def fake_sysfs(root: Path, ports: dict[str, str]) -> dict[str, str]:
    """A /sys/class/virtio-ports lookalike: {vportNpM: name}."""
    sys_root = root / "sys"
    for entry, name in ports.items():
        (sys_root / entry).mkdir(parents=True)
        (sys_root / entry / "name").write_text(name + "\n")
    return {"dev_root": str(root / "virtio-ports"), "sys_root": str(sys_root),
            "dev_dir": str(root / "dev")}  # fmt: skip


def test_udev_link_is_preferred(tmp_path: Path) -> None:
    roots = fake_sysfs(tmp_path, {"vport0p1": "org.qpid.amqp.0"})
    os.makedirs(roots["dev_root"])
    link = Path(roots["dev_root"]) / "org.qpid.amqp.0"
    link.touch()
    assert find_port("org.qpid.amqp.0", **roots) == str(link)


def test_sysfs_scan_without_udev(tmp_path: Path) -> None:
    roots = fake_sysfs(tmp_path, {"vport0p1": "org.qpid.test.ctl", "vport0p2": "org.qpid.amqp.0"})
    assert find_port("org.qpid.amqp.0", **roots) == os.path.join(roots["dev_dir"], "vport0p2")


def test_missing_port_names_where_it_looked(tmp_path: Path) -> None:
    roots = fake_sysfs(tmp_path, {"vport0p1": "other"})
    with pytest.raises(PortNotFound) as err:
        find_port("org.qpid.amqp.0", **roots)
    assert "org.qpid.amqp.0" in str(err.value)
    assert roots["sys_root"] in str(err.value)


def test_open_by_path_and_drain_what_the_host_wrote_before() -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.write(master, b"tail of a previous connection")
    fd = open_port(path)
    try:
        assert drain(fd) == len(b"tail of a previous connection")
        os.write(master, b"fresh")
        assert os.read(fd, 100) == b"fresh"  # drain took only the stale bytes
    finally:
        for f in (fd, slave, master):
            os.close(f)


def test_drain_treats_end_of_stream_as_quiet() -> None:
    a, b = socket.socketpair()
    b.sendall(b"xyz")
    b.close()
    assert drain(a.fileno()) == 3
    a.close()


def test_drain_gives_up_on_a_host_that_never_stops() -> None:
    a, b = socket.socketpair()
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            if select.select([], [b], [], 0.05)[1]:
                b.send(b"x" * 1024)

    t = threading.Thread(target=flood)
    t.start()
    started = time.monotonic()
    try:
        assert drain(a.fileno(), quiet=0.2, limit=0.5) > 0
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        t.join()
        a.close()
        b.close()


def test_host_connected_follows_the_peer() -> None:
    master, slave = pty.openpty()
    assert host_connected(master)
    os.close(slave)
    assert not host_connected(master)  # a pty master shows POLLHUP with no slave open
    os.close(master)


def test_drain_and_wait_work_on_a_high_fd() -> None:
    """select() refuses fd numbers of 1024 and over; a guest process with many files open
    still drains its port and waits on it."""
    a, b = socket.socketpair()
    high = fcntl.fcntl(a.fileno(), fcntl.F_DUPFD, 1100)
    try:
        os.set_blocking(high, False)
        b.sendall(b"stale")
        assert drain(high, quiet=0.05) == 5
        assert wait_fd(high, select.POLLIN, 0.01) == 0  # nothing more: a timeout, not an error
        b.close()
        assert wait_fd(high, select.POLLIN, 1.0) & (select.POLLIN | select.POLLHUP)
    finally:
        os.close(high)
        a.close()
        b.close()


def test_wait_on_a_closed_fd_fails_as_select_would() -> None:
    r, w = os.pipe()
    fd = fcntl.fcntl(r, fcntl.F_DUPFD, 1200)  # a number nothing else will take meanwhile
    for each in (fd, r, w):
        os.close(each)
    with pytest.raises(OSError, match="Bad file descriptor"):
        wait_fd(fd, select.POLLIN, 0.01)
