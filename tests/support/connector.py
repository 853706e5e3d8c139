"""Run the real daemon against a real broker, with the test playing qemu on each channel.

For every channel kind the test holds qemu's end:
- ``pty``: the test keeps the pty master (as ``-chardev pty`` does) and gives the daemon the
  slave's ``/dev/pts/N``;
- ``unix``: the test listens on the socket (``server=on``); the daemon connects;
- ``unix-listen``: the daemon listens; the test connects (``server=off``).
``Qemu.fd()`` is then the guest's byte stream, which ``connector.guest.GuestClient`` drives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connector.status.client import ControlClient, ControlError

REPO = Path(__file__).resolve().parents[2]
# The daemon starts in well under a second; a loaded CI machine may be many times slower.
START_TIMEOUT = 60.0
POLL = 0.02


def run_daemon(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The daemon run to completion, for start-up errors (it exits before serving)."""
    return subprocess.run(
        [sys.executable, "-m", "connector", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll a condition with a deadline (the daemon is another process: no event to await)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL)


class Qemu:
    """qemu's end of one channel, held by the test."""

    def __init__(self, kind: str, workdir: Path, guest: str) -> None:
        self.kind = kind
        self.guest = guest
        self._master: int | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        if kind == "pty":
            self._master, slave = os.openpty()
            self.path = os.ttyname(slave)
            self._slave = slave
        else:
            self.path = str(workdir / f"{guest}.sock")
            if kind == "unix":
                self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._listener.bind(self.path)
                self._listener.listen(1)

    @property
    def spec(self) -> str:
        """The daemon's --channel argument for this channel."""
        return f"{self.kind}:{self.path},guest={self.guest}"

    def fd(self, timeout: float = START_TIMEOUT) -> int:
        """The guest's end of the byte stream (connecting or accepting as needed)."""
        if self._master is not None:
            return self._master
        if self._conn is None:
            if self._listener is not None:
                self._listener.settimeout(timeout)
                self._conn, _ = self._listener.accept()
            else:
                wait_for(lambda: os.path.exists(self.path), timeout, f"{self.path} to appear")
                self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._conn.connect(self.path)
        return self._conn.fileno()

    def write_raw(self, data: bytes) -> None:
        """Bytes as if a guest (or a stale buffer) wrote them, outside any AMQP client."""
        os.write(self.fd(), data)

    def hang_up(self) -> None:
        """qemu exits: its end of the channel closes."""
        if self._master is not None:
            os.close(self._master)
            os.close(self._slave)
            self._master = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def detach_fd(self) -> None:
        """Forget the current connection without closing (a GuestClient closed the fd)."""
        self._conn = None


class Connector:
    """The daemon as a subprocess, with its log and control socket."""

    def __init__(
        self,
        workdir: Path,
        broker: Any,
        channels: list[Qemu],
        *extra: str,
        broker_urls: str | None = None,
        credentials: bool = True,
        broker_flags: bool = True,
        watched: bool = True,
    ) -> None:
        self.workdir = workdir
        self.control = str(workdir / "control.sock")
        self.log = workdir / "connector.log"
        self.broker = broker
        self.channels = channels
        self.extra = list(extra)
        self.broker_urls = broker_urls or broker.url  # a comma list means failover
        self.credentials = credentials  # pass the broker's user and password file
        # False: no --broker flags; the --config file's [broker] says where (flags would
        # override the file again on each reload, so a test of [broker] reloads needs this).
        self.broker_flags = broker_flags
        # True: the routing core runs under the use-after-free watch
        # (tests/support/watched_daemon.py); a benchmark wants the daemon as shipped.
        self.watched = watched
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        module = "tests.support.watched_daemon" if self.watched else "connector"
        argv = [sys.executable, "-m", module]
        if self.broker_flags:
            argv += ["--broker", self.broker_urls]
        if self.broker_flags and self.credentials and self.broker.user:
            pwfile = self.workdir / "broker.pw"
            pwfile.write_text(self.broker.password or "")
            pwfile.chmod(0o600)
            argv += ["--broker-user", self.broker.user, "--broker-password-file", str(pwfile)]
        for ch in self.channels:
            argv += ["--channel", ch.spec]
        return [*argv, "--control-socket", self.control, "--log-level", "debug", *self.extra]

    def start(self) -> Connector:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.argv(), stderr=log, env={**os.environ, "PYTHONPATH": str(REPO)}
            )
        wait_for(self.snapshot, START_TIMEOUT, "the connector's control socket")
        return self

    def snapshot(self) -> dict[str, Any] | None:
        """The daemon's state, or None while it does not answer."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"connector exited {self.proc.returncode}:\n{self.log_text()}")
        try:
            return ControlClient(self.control, timeout=5).request("snapshot")["snapshot"]
        except (ControlError, OSError):
            return None

    def channel(self, guest: str) -> dict[str, Any]:
        snap = wait_for(self.snapshot, START_TIMEOUT, "a snapshot")
        return next(c for c in snap["channels"] if c["guest"] == guest)

    def wait_state(self, guest: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the guest's channel is in ``state``; return its entry."""

        def reached() -> dict[str, Any] | None:
            snap = self.snapshot()
            for c in (snap or {}).get("channels", []):
                if c["guest"] == guest and c["state"] == state:
                    return c
            return None

        return wait_for(reached, timeout, f"channel {guest} to be {state}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon and wait for it; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc = None

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@dataclass
class Routed:
    """A running daemon with one channel per kind, and the broker behind it."""

    daemon: Connector
    channels: dict[str, Qemu]
    broker: Any

    def client(self, kind: str, container: str | None = None, timeout: float = 60.0) -> Any:
        """A guest AMQP client on the test's end of the ``kind`` channel."""
        from connector.guest.client import GuestClient

        return GuestClient(
            self.channels[kind].fd(), container_id=container or f"app-{kind}", timeout=timeout
        )


@contextlib.contextmanager
def serving(daemon: Connector, *more: Qemu) -> Iterator[Connector]:
    """Start ``daemon`` for the block; on leaving it, SIGTERM the daemon, hang up qemu's end
    of each of its channels and of ``more`` (channels its config file names), and check the
    daemon exited 0: a clean shutdown is part of what every test that runs it checks.

    qemu's ends are hung up even when the daemon's exit fails the test, so that a failure
    leaves no pty or socket behind for the tests after it."""
    daemon.start()
    try:
        yield daemon
    finally:
        status = daemon.stop()
        for ch in (*daemon.channels, *more):
            ch.hang_up()
        assert status == 0, daemon.log_text()


@contextlib.contextmanager
def routed(
    broker: Any, workdir: Path, kinds: tuple[str, ...], prefix: str = "g"
) -> Iterator[Routed]:
    """Run the daemon on ``broker`` with a ``{prefix}-{kind}`` channel of each kind; on exit
    SIGTERM it and check it exits 0."""
    channels = {kind: Qemu(kind, workdir, f"{prefix}-{kind}") for kind in kinds}
    with serving(Connector(workdir, broker, list(channels.values()))) as daemon:
        yield Routed(daemon, channels, broker)
