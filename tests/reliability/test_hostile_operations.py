"""The operations side under hostile or careless use: the control socket, the metrics
endpoint, qpid-virtio-status, SIGHUP and discovery, as an operator (or a VM's owner) meets
them on a real host.

Most tests run the real daemon (``python -m connector``) with no broker behind it: nothing
here needs a guest's upstream to open, so the broker URL points at a closed port. The
daemon's discovery is restricted to port names and executables only these tests use, so it
leaves alone any qemu another suite runs on the same machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connector.control.sample import ServedState, sample_snapshot
from tests.brokers.common import free_port
from tests.integration.discovery_helpers import FAKE_QEMU
from tests.support.connector import REPO, Connector, run_daemon, wait_for

# Every wait ends as soon as its condition holds; this only bounds a broken run.
WAIT_S = 20.0
PORT_PATTERN = "org.qpid.amqp.hostile-*"
PORT = "org.qpid.amqp.hostile-0"
QEMU_NAME = "qemu-system-hostile"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@dataclass(frozen=True)
class NoBroker:
    """Stands in for a ``tests.brokers`` broker: a URL where nothing listens."""

    url: str
    user: str | None = None
    password: str | None = None


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a unix socket path must fit in 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qvh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def no_broker() -> NoBroker:
    return NoBroker(f"amqp://127.0.0.1:{free_port()}")


def discovery_config(work: Path, extra: str = "") -> Path:
    """A config file whose discovery sees only this test's fake VMs and sockets."""
    conf = work / "connector.toml"
    conf.write_text(
        "[discovery]\n"
        f'port_patterns = ["{PORT_PATTERN}"]\n'
        f'qemu_executables = ["{QEMU_NAME}"]\n'
        f'libvirt_status_dir = "{work}/no-libvirt"\n' + extra
    )
    return conf


def watch_flags(work: Path) -> list[str]:
    return ["--discovery", "watch", "--watch", f"{work}/target/*/{PORT_PATTERN}"]


def listen_unix(path: Path) -> socket.socket:
    """A listening socket at ``path``, as qemu's ``server=on`` chardev makes one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def rows_for(daemon: Connector, path: str) -> list[dict[str, Any]]:
    snap = daemon.snapshot() or {"channels": []}
    return [c for c in snap["channels"] if c["path"] == path]


def scrape(port: int, request: bytes | None = None) -> tuple[str, str]:
    """One HTTP exchange with the metrics endpoint: (status line, body)."""
    raw = request or b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body.decode()


def counters(text: str) -> dict[str, float]:
    """Every sample of every counter family in a Prometheus text page."""
    kinds = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            if kinds.get(series.split("{", 1)[0]) == "counter":
                samples[series] = float(value)
    return samples


def status(control: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """qpid-virtio-status run as a command; its output decoded leniently for inspection."""
    return subprocess.run(
        [sys.executable, "-m", "connector.status", "--control-socket", control, *args],
        capture_output=True,
        encoding="utf-8",
        errors="backslashreplace",
        timeout=60,
        env={**ENV, **env},
    )


# -- the control socket ------------------------------------------------------------------


def test_a_deeply_nested_request_gets_an_error_reply_and_the_connection_lives_on(
    short_dir: Path,
) -> None:
    """docs/status.md: a bad request gets ``{"ok": false, ...}`` and the daemon never closes
    on it. A script that sends junk (here 20,000 nested brackets, well under the 64 KiB
    line limit) must get an error reply, and its connection must go on answering."""
    path = short_dir / "control.sock"
    with (
        ServedState(str(path), sample_snapshot()),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
    ):
        sock.settimeout(WAIT_S)
        sock.connect(str(path))
        with sock.makefile("rb") as reader:
            sock.sendall(b"[" * 20000 + b"\n")
            reply = reader.readline()
            assert reply, "the daemon hung up instead of answering"
            assert json.loads(reply)["ok"] is False
            sock.sendall(b'{"command": "channels"}\n')
            assert json.loads(reader.readline())["ok"] is True


# -- the metrics endpoint ----------------------------------------------------------------


def test_no_counter_goes_down_when_a_vm_goes_away(short_dir: Path, no_broker: NoBroker) -> None:
    """Prometheus reads a counter that goes down as a restart of the process (``rate()``
    and ``increase()`` then invent a jump). Every ``*_total`` series must only grow while
    the daemon runs, including when a discovered VM's socket goes away."""
    port = free_port()
    conf = discovery_config(short_dir)
    daemon = Connector(
        short_dir, no_broker, [], "--config", str(conf), *watch_flags(short_dir),
        "--metrics", f"127.0.0.1:{port}",
    ).start()  # fmt: skip
    qemu_sock = short_dir / "target" / "domain-1-vmc" / PORT
    listener = listen_unix(qemu_sock)
    try:
        wait_for(lambda: rows_for(daemon, str(qemu_sock)), WAIT_S, "the socket to be found")
        line, before = scrape(port)
        assert line.endswith("200 OK")
        listener.close()
        qemu_sock.unlink()
        wait_for(
            lambda: [r for r in rows_for(daemon, str(qemu_sock)) if r["state"] == "gone"],
            WAIT_S,
            "the channel to be gone",
        )
        _, after = scrape(port)
        old, new = counters(before), counters(after)
        went_down = {s: (old[s], new.get(s)) for s in old if new.get(s, 0) < old[s]}
        assert not went_down, went_down
    finally:
        listener.close()
        assert daemon.stop() == 0


# -- SIGHUP and discovery naming the same path ---------------------------------------------


def test_a_path_unpinned_from_the_config_is_served_again_from_discovery(
    short_dir: Path, no_broker: NoBroker
) -> None:
    """A configured path wins over a discovered one (docs/discovery.md). When the operator
    takes the ``[[channel]]`` entry out again and sends SIGHUP, the VM is still running and
    discovery still sees its socket: the channel must go on being served (under the name
    discovery gives it), not stay ``gone`` until the VM restarts."""
    qemu_sock = short_dir / "target" / "domain-1-vmp" / PORT
    listener = listen_unix(qemu_sock)
    pin = f"[[channel]]\nkind = 'unix'\npath = '{qemu_sock}'\nguest = 'pinned'\n"
    conf = discovery_config(short_dir, pin)
    daemon = Connector(short_dir, no_broker, [], "--config", str(conf), *watch_flags(short_dir))
    daemon.start()
    try:
        wait_for(
            lambda: f"discovery: guest vmp port {PORT}" in daemon.log_text(),
            WAIT_S,
            "discovery to see the socket too",
        )
        assert [r["guest"] for r in rows_for(daemon, str(qemu_sock))] == ["pinned"]
        conf.write_text(conf.read_text().replace(pin, ""))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded: 0 configured" in daemon.log_text(), WAIT_S, "the reload")
        states = {(r["guest"], r["state"]) for r in rows_for(daemon, str(qemu_sock))}
        assert ("vmp", "waiting") in states or ("vmp", "connected") in states, states
    finally:
        listener.close()
        assert daemon.stop() == 0


# -- a VM whose name is not UTF-8 --------------------------------------------------------


@dataclass
class OddVm:
    daemon: Connector
    metrics_port: int
    name: str  # as the daemon decodes it


@pytest.fixture
def odd_named_vm(short_dir: Path, no_broker: NoBroker) -> Iterator[OddVm]:
    """A (fake) qemu started as ``-name guest=caf\\xe9`` (latin-1, as a user's script may
    write it), found by the daemon's start-up scan, with metrics on."""
    qemu = short_dir / QEMU_NAME
    shutil.copy2(os.path.realpath(sys.executable), qemu)
    chardev = short_dir / "target" / "domain-1-cafe" / PORT
    chardev.parent.mkdir(parents=True)
    argv: list[str | bytes] = [
        str(qemu), str(FAKE_QEMU), "-name", b"guest=caf\xe9", "-accel", "tcg",
        "-chardev", f"socket,id=c0,path={chardev},server=on,wait=off",
        "-device", f"virtserialport,chardev=c0,name={PORT}",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONHOME=sys.base_prefix, PYTHONDONTWRITEBYTECODE="1")
    fake = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    daemon: Connector | None = None
    try:
        wait_for(chardev.exists, WAIT_S, "the fake qemu's chardev")
        port = free_port()
        conf = discovery_config(short_dir)
        daemon = Connector(
            short_dir, no_broker, [], "--config", str(conf), "--discovery", "watch",
            "--watch", f"{short_dir}/nothing/{PORT_PATTERN}", "--metrics", f"127.0.0.1:{port}",
        ).start()  # fmt: skip
        snap_daemon = daemon
        wait_for(lambda: rows_for(snap_daemon, str(chardev)), WAIT_S, "the VM to be found")
        yield OddVm(daemon, port, rows_for(daemon, str(chardev))[0]["guest"])
    finally:
        if daemon is not None:
            assert daemon.stop() == 0
        fake.kill()
        fake.wait()
        assert fake.stdin is not None
        fake.stdin.close()


def test_a_vm_named_in_latin1_does_not_break_the_metrics_endpoint(odd_named_vm: OddVm) -> None:
    """Any user who may run qemu names the VM; the connector trusts qemu's name. One VM
    whose name is not UTF-8 must not take the metrics of every other guest down with it."""
    line, body = scrape(odd_named_vm.metrics_port)
    assert line.endswith("200 OK"), line
    assert "qpid_virtio_channels{guest=" in body


def test_a_vm_named_in_latin1_is_listed_by_qpid_virtio_status(odd_named_vm: OddVm) -> None:
    """``qpid-virtio-status`` lists every channel with exit 0 (all healthy here), even one
    whose VM has a name that is not valid UTF-8; it never answers with a traceback. The
    operator's terminal is UTF-8 (``en_US.UTF-8``; the test machine has only C locales,
    where Python would pass the raw byte through, so the encoding is set explicitly)."""
    table = status(odd_named_vm.daemon.control, PYTHONIOENCODING="utf-8")
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    assert "caf" in table.stdout


# -- configuration mistakes found at start-up --------------------------------------------


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ("[control]\nsocket = 5\n", "control.socket"),
        ("[control]\nsocket = '{dir}/c.sock'\ngroup = 0\n", "control.group"),
        ("[control]\nsocket = '{dir}/c.sock'\n[metrics]\nlisten = 9187\n", "metrics.listen"),
    ],
)
def test_a_wrongly_typed_control_or_metrics_key_is_one_clear_line(
    short_dir: Path, toml: str, names: str
) -> None:
    """docs/configuration.md: any mistake, a wrong type included, prints one line naming the
    key and exits 2. A forgotten pair of quotes is the commonest TOML mistake there is."""
    conf = short_dir / "c.toml"
    conf.write_text(toml.format(dir=short_dir))  # never the default socket under /run
    result = run_daemon("--config", str(conf), "--channel", "pty:/dev/null", "--broker",
                        f"amqp://127.0.0.1:{free_port()}")  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and names in lines[0], result.stderr


def test_a_control_socket_path_too_long_for_unix_sockets_is_named_as_such(
    short_dir: Path,
) -> None:
    """A unix socket path must fit in 108 bytes. An operator who puts the control socket
    deep in a tree must read why it cannot listen (and why the tool cannot connect), not
    "cannot listen on control socket: None"."""
    deep = short_dir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "control.sock")
    result = run_daemon("--control-socket", path, "--channel", "pty:/dev/null", "--broker",
                        f"amqp://127.0.0.1:{free_port()}")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "None" not in result.stderr and "too long" in result.stderr, result.stderr
    tool = status(path)
    assert tool.returncode == 2, tool.stderr
    assert "None" not in tool.stderr and "too long" in tool.stderr, tool.stderr


# -- what a guest says, shown to the operator --------------------------------------------


@pytest.mark.broker
def test_a_guest_cannot_write_control_characters_to_the_operators_terminal(
    artemis: Any, short_dir: Path
) -> None:
    """Guests are untrusted (README). What a guest chooses (its container-id, here) reaches
    ``qpid-virtio-status guest NAME``; it must come out inert: no escape sequence that
    retitles or clears the operator's terminal, no newline that forges a line of output."""
    from tests.support.connector import routed

    evil = "app\x1b]0;pwned\x07\x1b[2J\n  state       connected for 9d00h"
    with routed(artemis, short_dir, ("unix",), prefix="esc") as r:
        client = r.client("unix", container=evil)
        try:
            assert client.send("hostile.escape", ["x"])[0].state == "accepted"
            shown = status(r.daemon.control, "guest", "esc-unix")
            assert shown.returncode == 0, shown.stderr
            assert "app" in shown.stdout  # the container-id is shown...
            assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout  # ...inert
            # The forged line shows only inside the fields that carry it (the container-id,
            # and the link names the client derives from it), never as a line of its own.
            forged = "state       connected for 9d00h"
            assert not [ln for ln in shown.stdout.split("\n") if ln.strip().startswith(forged)]
        finally:
            client.close()
            r.channels["unix"].detach_fd()


def test_a_stopping_daemon_leaves_a_newer_daemons_control_socket_alone(
    short_dir: Path, no_broker: NoBroker
) -> None:
    """The control socket's file was removed under a running daemon (a tmp cleaner, an
    operator's ``rm``) and a second daemon then took the path. When the first one stops,
    ``qpid-virtio-status`` must still reach the second: a daemon removes only the socket it
    made."""
    first_dir, second_dir = short_dir / "a", short_dir / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    first = Connector(first_dir, no_broker, [], "--channel", f"unix:{first_dir}/one.sock")
    first.start()
    second = Connector(second_dir, no_broker, [], "--channel", f"unix:{second_dir}/two.sock")
    second.control = first.control  # the same control socket path
    try:
        os.unlink(first.control)
        second.start()
        assert first.stop() == 0
        listed = status(second.control)
        assert listed.returncode == 0, listed.stderr  # "two" waits for its qemu: healthy
        assert "two" in listed.stdout
    finally:
        if first.proc is not None:
            first.stop()
        assert second.stop() == 0


# -- a flood of idle metrics clients -----------------------------------------------------


class LimitedConnector(Connector):
    """The daemon under a small descriptor limit, standing in for systemd's 1024 at scale."""

    NOFILE = 128

    def argv(self) -> list[str]:
        return ["prlimit", f"--nofile={self.NOFILE}:{self.NOFILE}", "--", *super().argv()]


def test_idle_metrics_connections_do_not_starve_the_control_socket(
    short_dir: Path, no_broker: NoBroker
) -> None:
    """The metrics port is TCP, so any local user (or a misconfigured scraper) can open
    connections to it and send nothing. However many do, ``qpid-virtio-status`` must still
    get its answer: the daemon must not spend every descriptor it has on them (the same
    descriptors its guests' channels and upstream sockets need)."""
    from connector.status.client import ControlClient, ControlError

    port = free_port()
    daemon = LimitedConnector(
        short_dir, no_broker, [], "--channel", f"unix:{short_dir}/vm.sock",
        "--metrics", f"127.0.0.1:{port}",
    ).start()  # fmt: skip
    idle: list[socket.socket] = []
    try:
        for _ in range(LimitedConnector.NOFILE + 16):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT_S))
        try:
            reply = ControlClient(daemon.control, timeout=3).request("channels")
        except ControlError as exc:
            pytest.fail(f"the control socket did not answer: {exc}")
        assert reply["channels"][0]["guest"] == "vm"
    finally:
        for sock in idle:
            sock.close()
        assert daemon.stop() == 0


# -- qpid-virtio-status's own command line -----------------------------------------------


@pytest.mark.parametrize("interval", ["nan", "inf"])
def test_a_watch_interval_that_is_not_a_number_is_a_usage_error(
    short_dir: Path, interval: str
) -> None:
    """Exit 64 means a usage error, and monitoring scripts rely on the statuses; an interval
    that is not a number is one, not a crash after the first refresh."""
    result = status(str(short_dir / "none.sock"), "--watch", interval, "--count", "2")
    assert result.returncode == 64, result.stderr
    assert "Traceback" not in result.stderr


# -- passing: what already holds --------------------------------------------------------------


def test_a_client_stuck_mid_request_does_not_hold_up_many_others(short_dir: Path) -> None:
    """A ``socat`` left open with half a request typed, and a client that connects and says
    nothing, must not delay anyone: 32 status clients at once all get their answer."""
    from concurrent.futures import ThreadPoolExecutor

    from connector.status.client import ControlClient

    path = short_dir / "control.sock"
    with ServedState(str(path), sample_snapshot()):
        stuck = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        try:
            for sock in stuck:
                sock.connect(str(path))
            stuck[0].sendall(b'{"command": "chan')
            with ThreadPoolExecutor(max_workers=32) as pool:
                replies = list(
                    pool.map(
                        lambda _: ControlClient(str(path), timeout=5).request("channels"),
                        range(32),
                    )
                )
            assert all(r["ok"] and r["channels"] for r in replies)
            stuck[0].sendall(b'nels"}\n')  # and the slow one is answered in the end
            with stuck[0].makefile("rb") as reader:
                assert json.loads(reader.readline())["ok"] is True
        finally:
            for sock in stuck:
                sock.close()


def test_sighups_with_a_broken_file_keep_serving_then_a_kind_change_applies(
    short_dir: Path, no_broker: NoBroker
) -> None:
    """SIGHUP with a file that has a mistake keeps the old configuration (however many
    come in a row); a fixed file that changes a channel's kind on the same path replaces
    the channel: one live row, of the new kind, listening where the old one connected."""
    path = short_dir / "vm.sock"
    conf = short_dir / "connector.toml"
    conf.write_text(f"[[channel]]\nkind = 'unix'\npath = '{path}'\nguest = 'vm'\n")
    daemon = Connector(short_dir, no_broker, [], "--config", str(conf)).start()
    assert daemon.proc is not None
    try:
        daemon.wait_state("vm", "waiting")
        conf.write_text("[[channel]\nkind = ")  # half-written by an editor
        for _ in range(10):
            daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.log_text().count("reload failed") >= 1, WAIT_S, "the failed reload")
        assert [(r["kind"], r["state"]) for r in rows_for(daemon, str(path))] == [
            ("unix", "waiting")
        ]
        conf.write_text(f"[[channel]]\nkind = 'unix-listen'\npath = '{path}'\nguest = 'vm'\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: [r["kind"] for r in rows_for(daemon, str(path))] == ["unix-listen"],
            WAIT_S,
            "the channel to become unix-listen",
        )
        wait_for(path.is_socket, WAIT_S, "the daemon to listen on the channel's path")
        assert daemon.channel("vm")["state"] == "waiting"
    finally:
        assert daemon.stop() == 0
    assert not path.exists()  # the daemon's own listening socket goes with it


@pytest.mark.broker
def test_a_channel_removed_by_sighup_tells_its_connected_guest(
    artemis: Any, short_dir: Path
) -> None:
    """An operator takes a channel out of the file and sends SIGHUP while its guest is
    connected: the guest is told (``amqp:connection:forced``) rather than left hanging, and
    the channel is listed as ``gone``."""
    from connector.guest.client import AmqpError, Disconnected, GuestClient
    from tests.support.connector import Qemu

    qemu = Qemu("unix", short_dir, "rm")
    entry = f"[[channel]]\nkind = 'unix'\npath = '{qemu.path}'\nguest = 'rm'\n"
    conf = short_dir / "connector.toml"
    conf.write_text(entry)
    daemon = Connector(short_dir, artemis, [], "--config", str(conf)).start()
    assert daemon.proc is not None
    try:
        guest = GuestClient(qemu.fd(), container_id="removed", timeout=WAIT_S)
        assert guest.send("hostile.removed", ["x"])[0].state == "accepted"
        conf.write_text("")
        daemon.proc.send_signal(signal.SIGHUP)
        with pytest.raises((AmqpError, Disconnected)) as told:
            guest.receive("hostile.removed", 5)
        assert "amqp:connection:forced" in str(told.value)
        assert daemon.channel("rm")["state"] == "gone"
        guest.driver.close_fd()
        qemu.detach_fd()
    finally:
        assert daemon.stop() == 0
        qemu.hang_up()
