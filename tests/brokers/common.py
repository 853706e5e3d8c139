"""What every broker fixture shares: free ports, deadlines, the AMQP probe and the process group.

The brokers run as children of the pytest process. Each one gets its own process group (so that
one signal reaches the shell wrapper, the JVM or the Erlang VM and their helpers), is SIGKILLed
by the kernel if pytest dies (PR_SET_PDEATHSIG, set by setpriv), and is registered for an
`atexit` sweep, so that a failed or interrupted session leaves no broker listening behind it.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from proton.utils import BlockingConnection

LOOPBACK = "127.0.0.1"

# How long a broker may take from exec to its first successful AMQP open. Measured on the
# project's 2-core machines: Artemis 2.3 s idle and up to 13 s under load, RabbitMQ 5-8 s; a
# broker that is not up after several times that is broken, not slow.
START_TIMEOUT = 90.0
# How long a graceful stop may take before the whole process group gets SIGKILL.
STOP_TIMEOUT = 20.0
# How long SIGKILLed processes may take to exit and be reaped.
KILL_TIMEOUT = 10.0
# Interval between readiness probes; no event tells us that a broker has finished starting.
POLL_INTERVAL = 0.1
# One AMQP open attempt; short, because the caller retries until START_TIMEOUT.
PROBE_TIMEOUT = 5.0
# Default for each blocking call of a direct test client; generous for a loaded CI box.
CLIENT_TIMEOUT = 30.0
# How much of a broker's console log goes into an error message.
LOG_TAIL_BYTES = 4000

T = TypeVar("T")


class BrokerError(RuntimeError):
    """A broker did not start, stop or answer as the suite needs; the message has its log tail."""


def free_port() -> int:
    """Return a loopback TCP port that nobody listens on right now.

    The kernel picks it; there is a small window before the broker binds it, which is acceptable
    for a test suite and far better than fixed ports that collide with a host's real broker.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], T | None], timeout: float, what: str, interval: float = POLL_INTERVAL
) -> T:
    """Poll `condition` until it returns something truthy, or raise TimeoutError naming `what`.

    Used only where there is no event to wait on (a broker finishing its start-up, a connection
    appearing in a management listing).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    """True when a TCP connect to host:port succeeds."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


def amqp_open(url: str, user: str | None = None, password: str | None = None) -> bool:
    """True when a complete AMQP 1.0 open/close handshake with the broker succeeds."""
    try:
        conn = BlockingConnection(url, timeout=PROBE_TIMEOUT, user=user, password=password)
    except Exception:  # proton raises several unrelated types for "not yet"
        return False
    with contextlib.suppress(Exception):
        conn.close()
    return True


def _hex_endpoint(field: str) -> tuple[str, int]:
    """'0100007F:1F90' from /proc/net/tcp -> ('127.0.0.1', 8080)."""
    addr, port = field.split(":")
    return socket.inet_ntoa(bytes.fromhex(addr)[::-1]), int(port, 16)


def tcp_client_addresses(pid: int, remote_port: int) -> set[str]:
    """The local "IP:PORT" of each IPv4 TCP socket process `pid` holds towards `remote_port`.

    This is how a test ties a broker's view of a connection (its remote address) to a process:
    the suite's own client (`os.getpid()`), or the connector's upstream connections.
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and _hex_endpoint(remote)[1] == remote_port:
            host, port = _hex_endpoint(local)
            found.add(f"{host}:{port}")
    return found


def _dying_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` run so that the kernel SIGKILLs it when pytest's process dies (PR_SET_PDEATHSIG).

    util-linux's setpriv sets the flag just before exec; a preexec_fn could do it too, but
    running Python in a child forked while the suite's tap threads hold locks can deadlock.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return list(argv)  # the atexit sweep and the fixtures' finalizers still apply
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


class ProcessGroup:
    """One child process in its own session; signals go to its whole group."""

    _live: ClassVar[set[ProcessGroup]] = set()

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path | None = None
    ) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                _dying_with_parent(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pgid = self.popen.pid  # a session leader's pgid is its pid
        ProcessGroup._live.add(self)

    def running(self) -> bool:
        """True while the group's leader has not exited."""
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send `sig` to every process of the group, if any is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """Ask the group to end with `sig`, then SIGKILL it when the leader does not exit."""
        if self.running():
            self.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group and return once no process of it is left.

        Waiting for the leader is not enough: the JVM or Erlang VM may be its child and still
        hold the broker's port for a moment, and a restart must be able to bind it again.
        """
        self.send_signal(signal.SIGKILL)
        self.popen.wait()
        wait_for(lambda: not self._group_alive(), KILL_TIMEOUT, f"process group {self.pgid}")
        ProcessGroup._live.discard(self)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self) -> str:
        """The end of the console log, for error messages."""
        try:
            data = self.log.read_bytes()
        except OSError as exc:
            return f"(no log: {exc})"
        return data[-LOG_TAIL_BYTES:].decode(errors="replace")

    @classmethod
    def kill_all(cls) -> None:
        """atexit sweep: nothing started by the suite survives the interpreter."""
        for group in list(cls._live):
            group.kill()


atexit.register(ProcessGroup.kill_all)


class Broker(abc.ABC):
    """A broker process the suite owns: start, stop, kill and restart on the same port and data.

    Subclasses prepare their data directory once and say how to run and query the broker.
    """

    name = "broker"

    def __init__(self, workdir: Path, user: str | None, password: str | None) -> None:
        self.workdir = workdir
        self.host = LOOPBACK
        self.port = free_port()
        self.user = user
        self.password = password
        self.startup_seconds: float | None = None
        self._process: ProcessGroup | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        """The broker's AMQP URL, without credentials."""
        return f"amqp://{self.host}:{self.port}"

    @abc.abstractmethod
    def _argv(self) -> list[str]:
        """The command that runs the broker in the foreground."""

    @abc.abstractmethod
    def _env(self) -> dict[str, str]:
        """The environment for the broker and its tools."""

    @abc.abstractmethod
    def list_connections(self) -> list[dict[str, Any]]:
        """One dict per client connection the broker sees; keys `container_id` and `properties`
        always present (`properties` is None where the broker does not expose them)."""

    def _before_start(self) -> None:  # noqa: B027 - an optional hook, not an abstract step
        """Hook run before each start (for example to launch a helper daemon)."""

    def _ready(self) -> bool:
        """True once the broker accepts a full AMQP open."""
        return port_open(self.host, self.port) and amqp_open(self.url, self.user, self.password)

    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.running()

    def start(self) -> None:
        """Start the broker and return once an AMQP open succeeds; records `startup_seconds`."""
        if self.running():
            return
        self._before_start()
        began = time.monotonic()
        self._starts += 1
        log = self.workdir / f"{self.name}-console-{self._starts}.log"
        self._process = ProcessGroup(self._argv(), self._env(), log, cwd=self.workdir)

        def up() -> bool:
            if not self.running():
                raise BrokerError(
                    f"{self.name} exited during start-up:\n{self._process_log_tail()}"
                )
            return self._ready()

        try:
            wait_for(up, START_TIMEOUT, f"{self.name} on {self.url}")
        except TimeoutError as exc:
            tail = self._process_log_tail()
            self.kill()
            raise BrokerError(f"{exc}\n{tail}") from exc
        except BrokerError:
            self.kill()  # the leader died; helpers of its group may not have
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Graceful stop (the broker's own shutdown), SIGKILL if it hangs."""
        if self._process is not None:
            self.resume()  # a paused broker could not shut down
            if self._process.running():
                self._shutdown()
            self._process.stop()
            self._process = None

    def _shutdown(self) -> None:  # noqa: B027 - an optional hook, not an abstract step
        """Ask the running broker to shut down by its own means, before it gets SIGTERM."""

    def kill(self) -> None:
        """Crash the broker: SIGKILL its process group, no shutdown at all."""
        if self._process is not None:
            self._process.kill()
            self._process = None

    def pause(self) -> None:
        """SIGSTOP the broker: its sockets stay open but nothing answers (heartbeat tests)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    @property
    def process_group(self) -> int | None:
        """The broker's process group id while it runs (its leader is the JVM or Erlang VM)."""
        return self._process.pgid if self._process is not None else None

    def close(self) -> None:
        """End of the session: stop the broker and anything started for it."""
        self.stop()

    def restart(self) -> None:
        """Graceful stop and start again on the same port and data."""
        self.stop()
        self.start()

    def connect(self, **kwargs: Any) -> BlockingConnection:
        """A direct proton BlockingConnection to the broker with the fixture's credentials."""
        kwargs.setdefault("timeout", CLIENT_TIMEOUT)
        return BlockingConnection(self.url, user=self.user, password=self.password, **kwargs)

    @contextlib.contextmanager
    def connection(self, **kwargs: Any) -> Iterator[BlockingConnection]:
        """`connect()` that is closed on leaving the block (proton's has no context manager)."""
        conn = self.connect(**kwargs)
        try:
            yield conn
        finally:
            conn.close()

    def _process_log_tail(self) -> str:
        return self._process.log_tail() if self._process is not None else ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} running={self.running()}>"


def run_tool(
    argv: Sequence[str], env: Mapping[str, str], timeout: float, what: str
) -> subprocess.CompletedProcess[str]:
    """Run a broker's command-line tool; raise BrokerError with its output when it fails."""
    try:
        done = subprocess.run(
            list(argv), env=dict(env), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(f"{what}: no answer in {timeout} s") from exc
    if done.returncode != 0:
        raise BrokerError(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done
