"""The daemon as an operator meets it: one-line config errors, SIGHUP, SIGTERM, failover."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from connector.guest.client import AmqpError, Disconnected, GuestClient, LinkRefused
from tests.brokers.common import free_port
from tests.support.connector import Connector, Qemu, run_daemon, serving, wait_for


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--config", "/nonexistent/connector.toml"], "/nonexistent/connector.toml"),
        (["--broker", "http://x", "--channel", "pty:/dev/null"], "--broker"),
        (["--channel", "serial:/dev/ttyS0"], "--channel.kind"),
        (["--channel", "pty:/no/such/pty"], "/no/such/pty"),
        (["--channel", "unix:/no/such/dir/sock"], "/no/such/dir/sock"),
        (["--channel", "unix:/tmp/x.sock,colour=red"], "--channel"),
        (["--channel", "pty:/dev/null", "--metrics", "bogus"], "--metrics"),
    ],
)
def test_a_user_mistake_is_one_clear_line(argv: list[str], names: str, tmp_path: Path) -> None:
    result = run_daemon(*argv, "--control-socket", str(tmp_path / "control.sock"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # never a traceback
    assert names in lines[0]
    assert not list(tmp_path.iterdir())  # nothing was bound before the mistake was found


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ("[broker]\nurls = ['amqp://h']\ncolour = 1\n", "broker.colour"),
        ("[broker]\nidle_timeout_s = 'long'\n", "broker.idle_timeout_s"),
        ("[limits]\nmax_frame_size = 10\n", "limits.max_frame_size"),
        ("[policy.default]\nrelay = 'yes'\n", "policy.default.relay"),
        ("[[channel]]\nkind = 'pty'\n", "channel[0].path"),
        ("not toml at all [", "not valid TOML"),
        ("[control]\nmode = 'rw'\n", "control.mode"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path: Path, toml: str, names: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(toml)
    result = run_daemon("--config", str(conf))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert names in result.stderr


def test_a_password_readable_by_others_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[broker]\nurls = ['amqp://127.0.0.1']\npassword = 'secret'\n")
    conf.chmod(0o644)
    result = run_daemon("--config", str(conf))
    assert result.returncode == 2
    assert "readable by others" in result.stderr
    assert "secret" not in result.stderr


@pytest.mark.broker
def test_sighup_reloads_channels_without_dropping_unchanged_ones(
    artemis: Any, tmp_path: Path
) -> None:
    keep = Qemu("pty", tmp_path, "keep")
    add = Qemu("unix-listen", tmp_path, "added")
    conf = tmp_path / "connector.toml"
    conf.write_text(f"[[channel]]\nkind = 'pty'\npath = '{keep.path}'\nguest = 'keep'\n")
    with serving(Connector(tmp_path, artemis, [], "--config", str(conf)), keep, add) as daemon:
        with GuestClient(keep.fd(), container_id="keeper", timeout=30) as guest:
            guest.send("hup.keep", ["before"])
            conf.write_text(
                conf.read_text()
                + f"[[channel]]\nkind = 'unix-listen'\npath = '{add.path}'\nguest = 'added'\n"
            )
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.wait_state("added", "waiting")
            # The unchanged channel's guest connection was not dropped.
            assert guest.send("hup.keep", ["after"])[0].state == "accepted"
            assert daemon.channel("keep")["state"] == "connected"
        with GuestClient(add.fd(), container_id="newcomer", timeout=30) as newcomer:
            assert [m.body for m in newcomer.receive("hup.keep", 2)] == ["before", "after"]


def test_sighup_names_the_changed_sections_it_does_not_apply(tmp_path: Path) -> None:
    """A reload applies the channel list only; a change to another section is not dropped
    silently but named in one warning that says it waits for a restart. No broker is
    needed: the channel only waits for its qemu."""
    no_broker = SimpleNamespace(url=f"amqp://127.0.0.1:{free_port()}", user=None, password=None)
    vm = tmp_path / "vm.sock"
    channel = f"[[channel]]\nkind = 'unix-listen'\npath = '{vm}'\nguest = 'vm'\n"
    conf = tmp_path / "connector.toml"
    conf.write_text("[limits]\nmax_sessions = 32\n" + channel)
    with serving(Connector(tmp_path, no_broker, [], "--config", str(conf))) as daemon:
        assert daemon.proc is not None
        daemon.wait_state("vm", "waiting")
        conf.write_text("[limits]\nmax_sessions = 8\n[policy.default]\nrelay = false\n" + channel)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded: 1 configured" in daemon.log_text(), 30, "the reload")
        warnings = [line for line in daemon.log_text().splitlines() if "WARNING" in line]
        assert len(warnings) == 1, warnings
        assert "[limits], [policy] changed" in warnings[0]
        assert "next restart" in warnings[0]
        assert daemon.channel("vm")["state"] == "waiting"  # the unchanged channel untouched


def _broker_section(urls: list[str], user: str, password: str, pwfile: Path) -> str:
    """A ``[broker]`` table whose password is in ``pwfile`` (written here, mode 0600)."""
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    return f"[broker]\nurls = {urls!r}\nuser = '{user}'\npassword_file = '{pwfile}'\n"


def _channel_entry(qemu: Qemu) -> str:
    return f"[[channel]]\nkind = '{qemu.kind}'\npath = '{qemu.path}'\nguest = '{qemu.guest}'\n"


def _configured(tmp_path: Path, broker: Any, ch: Qemu, toml: str) -> Connector:
    """The daemon serving ``ch`` on ``broker`` (by its flags), with ``toml`` as the rest of
    its configuration (its ``--config`` file)."""
    conf = tmp_path / "connector.toml"
    conf.write_text(toml)
    return Connector(tmp_path, broker, [ch], "--config", str(conf))


def _reload(daemon: Connector) -> str:
    """SIGHUP the daemon and wait for the reload's last log line (``reloaded: ...`` or
    ``reload failed``); returns the log written since the signal."""
    assert daemon.proc is not None
    start = len(daemon.log_text())

    def done() -> bool:
        since = daemon.log_text()[start:]
        return "reloaded:" in since or "reload failed" in since

    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(done, 30, "the reload")
    return daemon.log_text()[start:]


@pytest.mark.broker
def test_sighup_moves_new_guest_connections_to_a_new_broker_keeping_connected_ones(
    artemis: Any, rabbitmq: Any, tmp_path: Path
) -> None:
    """``broker.urls`` moved from Artemis to RabbitMQ: the guest connected before the
    reload stays on Artemis, undisturbed; the next guest connection goes to RabbitMQ."""
    early, late = Qemu("pty", tmp_path, "early"), Qemu("unix-listen", tmp_path, "late")
    channels = _channel_entry(early) + _channel_entry(late)
    conf = tmp_path / "connector.toml"
    pwfile = tmp_path / "broker.pw"
    conf.write_text(
        _broker_section([artemis.url], artemis.user, artemis.password, pwfile) + channels
    )
    daemon = Connector(tmp_path, artemis, [], "--config", str(conf), broker_flags=False)
    queue = f"/queue/moved-{os.getpid()}"
    with serving(daemon, early, late):
        with GuestClient(early.fd(), container_id="early", timeout=30) as stays:
            assert stays.send("reload.stays", ["before"])[0].state == "accepted"
            conf.write_text(
                _broker_section([rabbitmq.url], rabbitmq.user, rabbitmq.password, pwfile) + channels
            )
            logged = _reload(daemon)
            assert stays.send("reload.stays", ["after"])[0].state == "accepted"
            assert daemon.channel("early")["upstream"] == artemis.url
            with GuestClient(late.fd(), container_id="late", timeout=30) as moved:
                assert daemon.channel("late")["upstream"] == rabbitmq.url
                assert moved.send(queue, ["on rabbitmq"])[0].state == "accepted"
                assert [m.body for m in moved.receive(queue, 1)] == ["on rabbitmq"]
            assert f"[broker] applied to new connections: urls {rabbitmq.url}" in logged
            assert "next restart" not in logged
            got = stays.receive("reload.stays", 2)
            assert [m.body for m in got] == ["before", "after"]  # both went to Artemis
        assert daemon.snapshot()["connector"]["upstream_urls"] == [rabbitmq.url]


@pytest.mark.broker
def test_sighup_takes_a_rotated_password_from_the_password_file(
    rabbitmq: Any, tmp_path: Path
) -> None:
    """The broker's password is changed and the new one written to ``password_file``;
    after SIGHUP the next guest connection logs in with it (RabbitMQ refuses the old
    one), and the guest connected with the old one stays connected."""
    user = f"qvc-rotate-{os.getpid()}"
    rabbitmq.ctl("add_user", user, "old-secret-4711")
    rabbitmq.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    early, late = Qemu("pty", tmp_path, "early"), Qemu("unix-listen", tmp_path, "late")
    channels = _channel_entry(early) + _channel_entry(late)
    conf = tmp_path / "connector.toml"
    pwfile = tmp_path / "broker.pw"
    conf.write_text(_broker_section([rabbitmq.url], user, "old-secret-4711", pwfile) + channels)
    daemon = Connector(tmp_path, rabbitmq, [], "--config", str(conf), broker_flags=False)
    queue = f"/queue/rotated-{os.getpid()}"
    with serving(daemon, early, late):
        with GuestClient(early.fd(), container_id="early", timeout=30) as stays:
            assert stays.send(queue, ["old password"])[0].state == "accepted"
            rabbitmq.ctl("change_password", user, "new-secret-4712")
            pwfile.write_text("new-secret-4712\n")
            logged = _reload(daemon)
            with GuestClient(late.fd(), container_id="late", timeout=30) as rotated:
                assert rotated.send(queue, ["new password"])[0].state == "accepted"
            got = stays.receive(queue, 2)  # the early guest's connection is still up
            assert [m.body for m in got] == ["old password", "new password"]
            assert "[broker] applied to new connections" in logged
            assert "(changed: password)" in logged
        log = daemon.log_text()
        assert "old-secret-4711" not in log
        assert "new-secret-4712" not in log


@pytest.mark.broker
def test_sighup_with_an_unusable_broker_section_keeps_the_old_configuration(
    artemis: Any, tmp_path: Path
) -> None:
    """A new ``[broker]`` whose TLS certificate is not PEM (found only when the pool is
    built) fails the whole reload with one line naming the key and file: the added
    channel is not served, and new guest connections still go to the old broker."""
    vm, extra = Qemu("unix-listen", tmp_path, "vm"), Qemu("unix-listen", tmp_path, "extra")
    conf = tmp_path / "connector.toml"
    pwfile = tmp_path / "broker.pw"
    old = _broker_section([artemis.url], artemis.user, artemis.password, pwfile)
    conf.write_text(old + _channel_entry(vm))
    daemon = Connector(tmp_path, artemis, [], "--config", str(conf), broker_flags=False)
    cert = tmp_path / "client.pem"
    cert.write_text("not a certificate\n")
    dead = f"amqps://127.0.0.1:{free_port()}"
    with serving(daemon, vm, extra):
        conf.write_text(
            old.replace(repr([artemis.url]), repr([dead]))
            + f"[broker.tls]\ncert_file = '{cert}'\n"
            + _channel_entry(vm)
            + _channel_entry(extra)
        )
        logged = _reload(daemon)
        assert [c["guest"] for c in daemon.snapshot()["channels"]] == ["vm"]
        with GuestClient(vm.fd(), container_id="vm", timeout=30) as guest:
            assert daemon.channel("vm")["upstream"] == artemis.url
            assert guest.send("reload.kept", ["x"])[0].state == "accepted"
        errors = [line for line in logged.splitlines() if "ERROR" in line]
        assert len(errors) == 1, logged
        assert "reload failed, keeping the old configuration" in errors[0]
        assert f"broker.tls.cert_file: {cert}" in errors[0]
        assert "applied" not in logged


@pytest.mark.broker
def test_sigterm_closes_guests_with_forced_and_exits_0(artemis: Any, tmp_path: Path) -> None:
    ch = Qemu("unix", tmp_path, "vm")
    daemon = Connector(tmp_path, artemis, [ch]).start()
    guest = GuestClient(ch.fd(), container_id="term", timeout=30)
    guest.send("term.q", ["x"])
    assert daemon.stop(signal.SIGTERM) == 0
    with pytest.raises((AmqpError, Disconnected)) as closed:
        guest.receive("term.q", 5)
    assert "amqp:connection:forced" in str(closed.value)
    assert "shutting down" in str(closed.value)
    # Only the broker's answer is waited for, not the guest's: its fd is closed at once.
    assert "did not answer our close" not in daemon.log_text()
    ch.hang_up()


@pytest.mark.broker
def test_failover_to_the_next_broker_url(artemis: Any, tmp_path: Path) -> None:
    dead = f"amqp://127.0.0.1:{free_port()}"
    ch = Qemu("pty", tmp_path, "fo")
    with serving(Connector(tmp_path, artemis, [ch], broker_urls=f"{dead},{artemis.url}")) as daemon:
        with pytest.raises((AmqpError, Disconnected)) as refused:
            GuestClient(ch.fd(), container_id="fo-1", timeout=30)
        assert "amqp:connection:forced" in str(refused.value)
        assert "Connection refused" in str(refused.value)
        daemon.wait_state("fo", "waiting")
        with GuestClient(ch.fd(), container_id="fo-2", timeout=30) as guest:
            assert guest.send("fo.q", ["via the second URL"])[0].state == "accepted"
        entry = wait_for(lambda: daemon.channel("fo"), 10, "the channel")
        assert "Connection refused" in entry["last_error"]


@pytest.mark.broker
def test_policy_keeps_guests_in_their_namespace_and_out_of_management(
    artemis: Any, tmp_path: Path
) -> None:
    ch = Qemu("pty", tmp_path, "tenant1")
    policy = "[policy.default]\naddresses = ['guests.{guest}.#']\nprefix = 'vm.'\ndynamic = false\n"
    with serving(_configured(tmp_path, artemis, ch, policy)) as daemon:
        with GuestClient(ch.fd(), container_id="tenant-app", timeout=30) as guest:
            for address in ("activemq.management", "guests.tenant2.inbox"):
                with pytest.raises(LinkRefused) as refused:
                    guest.send(address, ["x"])
                assert refused.value.name == "amqp:unauthorized-access"
                assert address in refused.value.description
            assert guest.send("guests.tenant1.inbox", ["mine"])[0].state == "accepted"
        # On the broker the message sits under the guest's prefix.
        with artemis.connection() as direct:
            receiver = direct.create_receiver("vm.guests.tenant1.inbox")
            assert receiver.receive(timeout=30).body == "mine"
        assert "refused attach" in daemon.log_text()
        assert "tenant1" in daemon.log_text()


@pytest.mark.broker
def test_a_guest_that_falls_silent_is_noticed_by_its_idle_timeout(
    artemis: Any, tmp_path: Path
) -> None:
    """The host sees nothing when a guest dies with its port open: only silence tells."""
    ch = Qemu("unix", tmp_path, "silent")
    limits = "[limits]\nidle_timeout_s = 1.0\n"
    with serving(_configured(tmp_path, artemis, ch, limits)) as daemon:
        guest = GuestClient(ch.fd(), container_id="dies", timeout=30, idle_timeout=None)
        guest.send("idle.q", ["last words"])
        daemon.wait_state("silent", "connected")
        # The guest stops here: no more frames, no heartbeats, the fd stays open.
        entry = daemon.wait_state("silent", "waiting", timeout=30)
        assert "idle-timeout" in entry["last_error"]
        assert entry["detail"]["errors"][-1]["condition"] == "amqp:resource-limit-exceeded"


@pytest.mark.broker
def test_no_password_shows_in_status_or_logs(artemis: Any, tmp_path: Path) -> None:
    secret = "s3cret-pw-4711"
    url = f"amqp://{artemis.user}:{secret}@127.0.0.1:{artemis.port}"
    ch = Qemu("unix-listen", tmp_path, "private")
    with serving(Connector(tmp_path, artemis, [ch], broker_urls=url, credentials=False)) as daemon:
        with GuestClient(ch.fd(), container_id="pw-check", timeout=30) as guest:
            assert guest.send("pw.q", ["x"])[0].state == "accepted"  # the password worked
            shown = [
                json.dumps(daemon.snapshot()),
                subprocess.run(
                    [sys.executable, "-m", "connector.status", "--control-socket",
                     daemon.control, "--wide"],
                    capture_output=True, text=True, timeout=60,
                ).stdout,
                subprocess.run(
                    [sys.executable, "-m", "connector.status", "--control-socket",
                     daemon.control, "guest", "private"],
                    capture_output=True, text=True, timeout=60,
                ).stdout,
            ]  # fmt: skip
        shown.append(daemon.log_text())
        assert "127.0.0.1" in shown[0]
        for text in shown:
            assert secret not in text


@pytest.mark.broker
def test_a_unix_channel_reconnects_when_qemu_comes_back(artemis: Any, tmp_path: Path) -> None:
    ch = Qemu("unix", tmp_path, "comeback")
    with serving(Connector(tmp_path, artemis, [ch])) as daemon:
        with GuestClient(ch.fd(), container_id="first-life", timeout=30) as guest:
            assert guest.send("comeback.q", ["one"])[0].state == "accepted"
        ch.hang_up()  # qemu exits: its socket goes away
        os.unlink(ch.path)
        daemon.wait_state("comeback", "waiting")
        again = Qemu("unix", tmp_path, "comeback")  # qemu restarts on the same path
        with GuestClient(again.fd(), container_id="second-life", timeout=30) as guest:
            assert [m.body for m in guest.receive("comeback.q", 1)] == ["one"]
        again.hang_up()


@pytest.mark.broker
def test_unix_listen_serves_one_peer_at_a_time(artemis: Any, tmp_path: Path) -> None:
    ch = Qemu("unix-listen", tmp_path, "single")
    with serving(Connector(tmp_path, artemis, [ch])) as daemon:
        with GuestClient(ch.fd(), container_id="the-one", timeout=30) as guest:
            intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            intruder.connect(ch.path)
            intruder.settimeout(30)
            assert intruder.recv(1) == b""  # accepted and closed at once
            intruder.close()
            assert guest.send("single.q", ["still served"])[0].state == "accepted"
        assert "refused a second peer" in daemon.log_text()


@pytest.mark.broker
def test_heartbeats_keep_a_quiet_guest_connected(artemis: Any, tmp_path: Path) -> None:
    """The guest asks for a 2 s idle timeout and sends nothing for 5 s: the connector's
    heartbeats keep the connection alive."""
    ch = Qemu("pty", tmp_path, "quiet")
    with (
        serving(Connector(tmp_path, artemis, [ch])) as daemon,
        GuestClient(ch.fd(), container_id="quiet", timeout=30, idle_timeout=2.0) as guest,
    ):
        guest.send("quiet.q", ["before"])
        end = time.monotonic() + 5
        while time.monotonic() < end:
            guest.driver.process(0.5)  # reads heartbeats; writes only its own
        assert guest.send("quiet.q", ["after"])[0].state == "accepted"
        assert daemon.channel("quiet")["state"] == "connected"


def test_a_low_open_file_limit_is_lifted_for_many_channels(tmp_path: Path) -> None:
    """systemd starts a service at a soft limit of 1024 open files while a host can have
    more guests than that allows (each costs two). Started here at a soft limit of 64, the
    daemon must serve 80 unix-listen channels (a listening socket each): it lifts the soft
    limit to the hard one."""
    count = 80
    broker = SimpleNamespace(url=f"amqp://127.0.0.1:{free_port()}", user=None)
    specs = [
        a for i in range(count) for a in ("--channel", f"unix-listen:{tmp_path}/g{i},guest=g{i}")
    ]
    daemon = Connector(tmp_path, broker, [], *specs)
    with open(daemon.log, "a") as log:
        daemon.proc = subprocess.Popen(["prlimit", "--nofile=64:", *daemon.argv()], stderr=log)
    try:

        def all_waiting() -> bool:
            snap = daemon.snapshot() or {"channels": []}
            states = [c["state"] for c in snap["channels"]]
            assert "error" not in states, daemon.log_text()
            return states.count("waiting") == count

        wait_for(all_waiting, 60, f"{count} channels waiting")
        limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
        soft, hard = next(
            ln for ln in limits.splitlines() if ln.startswith("Max open files")
        ).split()[3:5]
        assert soft == hard, limits
        assert "open-file limit raised from 64" in daemon.log_text()
    finally:
        assert daemon.stop() == 0
