"""qpid-virtio-status against the real ControlServer on a real socket: content, JSON, exits."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import connector.control.protocol
from connector.control.sample import ServedState, sample_snapshot
from connector.status import cli

REPO = Path(__file__).resolve().parents[2]
ROW_KEYS = list(connector.control.protocol.ROW_KEYS)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedState]:
    with ServedState(str(tmp_path / "control.sock"), sample_snapshot()) as state:
        yield state


def run(served: ServedState, *argv: str, capsys: Any) -> tuple[int, str, str]:
    status = cli.main(["--control-socket", served.control.path, *argv])
    out, err = capsys.readouterr()
    return status, out, err


def status_subprocess(
    *argv: str, env: dict[str, str] | None = None, python: str = sys.executable, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """The tool as a separate process, the way an operator or a script runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("NO_COLOR", None)
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(
        [python, "-m", "connector.status", *argv],
        stderr=subprocess.PIPE, text=True, env=full_env, timeout=60, **kwargs,
    )  # fmt: skip


def table_rows(text: str) -> list[list[str]]:
    """Cells of a table split on runs of two or more spaces, header first."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines()]


def test_channels_table_content_sorted_by_guest(served: ServedState, capsys: Any) -> None:
    status, out, err = run(served, capsys=capsys)
    rows = table_rows(out)
    assert rows[0] == [
        "GUEST", "PORT", "KIND", "STATE", "SINCE", "LINKS", "MSGS IN", "MSGS OUT",
        "BYTES IN", "BYTES OUT", "LAST ERROR",
    ]  # fmt: skip
    assert [r[0] for r in rows[1:]] == ["batch", "db", "old", "web1"]
    web1 = rows[4]
    assert web1[:4] == ["web1", "org.qpid.amqp.0", "unix", "connected"]
    assert re.fullmatch(r"12m3\ds", web1[4])
    assert web1[5:10] == ["2", "1500", "1498", "1.5M", "292.6K"]
    db = rows[2]
    assert db[3] == "error" and db[-1].startswith("amqp:connection:forced: upstream")
    assert db[-1].endswith("…") and len(db[-1]) == 40
    assert rows[3][3:5] == ["gone", "1d01h"]
    assert "\x1b" not in out
    assert status == cli.EXIT_UNHEALTHY and err == ""


def test_wide_adds_path_upstream_sessions_discarded(served: ServedState, capsys: Any) -> None:
    _, out, _ = run(served, "-w", capsys=capsys)
    rows = table_rows(out)
    assert rows[0][5:8] == ["PATH", "UPSTREAM", "SESSIONS"] and "DISCARDED" in rows[0]
    web1 = rows[4]
    assert web1[5:8] == ["/run/qpid-virtio/web1.sock", "amqp://127.0.0.1:5672", "1"]
    assert rows[2][-1] == "amqp:connection:forced: upstream amqp://127.0.0.1:5672: " \
        "connection refused"  # fmt: skip


def test_healthy_when_no_channel_is_in_error(served: ServedState, capsys: Any) -> None:
    served.state["channels"] = [c for c in served.state["channels"] if c["state"] != "error"]
    status, out, _ = run(served, capsys=capsys)
    assert status == cli.EXIT_OK and "db" not in out


def test_channels_json_has_exactly_the_documented_keys(served: ServedState, capsys: Any) -> None:
    _, out, _ = run(served, "--json", capsys=capsys)
    doc = json.loads(out)
    assert list(doc) == ["channels"]
    assert [list(row) for row in doc["channels"]] == [ROW_KEYS] * 4
    web1 = doc["channels"][3]
    assert web1["upstream"] == "amqp://127.0.0.1:5672" and web1["bytes_out"] == 299600
    assert isinstance(web1["since"], float)


def test_guest_detail(served: ServedState, capsys: Any) -> None:
    status, out, _ = run(served, "guest", "web1", capsys=capsys)
    assert status == cli.EXIT_OK
    assert "uuid        5b2f0a8e-3c1d-4f7a-9e61-0c2b8d4e7f10" in out
    assert "qemu pid    3101" in out and "found by    config" in out
    assert "channel /run/qpid-virtio/web1.sock (unix, port org.qpid.amqp.0)" in out
    assert "amqp://127.0.0.1:5672 (open), container-id web1-app, local 127.0.0.1:40112" in out
    links = {r[3]: r for r in table_rows(out.split("\n\n")[-1])[1:]}
    assert links["web1-sender-orders"] == [
        "0", "in →broker", "orders", "web1-sender-orders", "100", "2", "1500", "1.5M",
    ]  # fmt: skip
    assert links["web1-receiver-replies"][1:3] == ["out →guest", "replies.web1"]


def test_guest_in_error_shows_timestamped_errors_and_exits_1(
    served: ServedState, capsys: Any
) -> None:
    status, out, _ = run(served, "guest", "db", capsys=capsys)
    assert status == cli.EXIT_UNHEALTHY
    assert "state       error for 4" in out
    line = next(ln for ln in out.splitlines() if "amqp:connection:forced  upstream" in ln)
    assert re.match(r"\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+4\ds\s+amqp:connection:forced", line)


# What a guest (or a VM's owner) might write into every string it chooses: an escape
# sequence that retitles and clears the terminal, a C1 CSI, a bidi override, and a newline
# that forges a line of output.
EVIL = "\x1b]0;pwned\x07\x1b[2J\x9b1m\u202e\n  state       connected for 9d00h"


def evil_snapshot() -> dict[str, Any]:
    """The sample with EVIL appended to every string the daemon passes through."""
    snap = sample_snapshot()
    for entry in snap["channels"]:
        for key in ("guest", "port", "path", "last_error"):
            entry[key] = (entry[key] or "") + EVIL  # type: ignore[literal-required]
        detail = entry["detail"]
        detail["identity"]["name"] = entry["guest"]
        detail["identity"]["uuid"] = "uuid" + EVIL
        detail["upstream"]["container_id"] = "app" + EVIL
        for link in detail["links"]:
            link["name"] += EVIL
            link["address"] = (link["address"] or "") + EVIL
        for err in detail["errors"]:
            err["condition"] += EVIL
            err["description"] = (err["description"] or "") + EVIL
        detail["errors_by_condition"] = {
            c + EVIL: n for c, n in detail["errors_by_condition"].items()
        }
    return snap  # type: ignore[return-value]


SHOWN_EVIL = EVIL.encode("unicode_escape").decode()  # as a table shows it


@pytest.mark.parametrize(
    "argv",
    [[], ["--wide"], ["links"], ["guest", "web1" + EVIL], ["guest", "db" + SHOWN_EVIL]],
)
def test_what_a_guest_chose_reaches_the_terminal_inert(
    tmp_path: Path, capsys: Any, argv: list[str]
) -> None:
    """In every view no control character reaches stdout and no line is forged; a guest is
    found by its name as it is or as shown. JSON gives every string back as it is."""
    with ServedState(str(tmp_path / "control.sock"), evil_snapshot()) as served:
        _, out, err = run(served, *argv, capsys=capsys)
        assert err == "" and SHOWN_EVIL in out
        assert all(line.isprintable() for line in out.splitlines())
        assert "state       connected for 9d00h" not in [ln.strip() for ln in out.splitlines()]
        _, out, _ = run(served, *argv, "--json", capsys=capsys)
        assert json.dumps(EVIL)[1:-1] in out  # JSON's own escapes, of the string as it is


def test_guest_json_and_unknown_guest(served: ServedState, capsys: Any) -> None:
    _, out, _ = run(served, "guest", "web1", "--json", capsys=capsys)
    guest = json.loads(out)["guest"]
    assert guest["pid"] == 3101
    channel = guest["channels"][0]
    assert set(ROW_KEYS) < set(channel) and channel["detail"]["upstream"]["state"] == "open"
    status, out, err = run(served, "guest", "ghost", capsys=capsys)
    assert status == cli.EXIT_UNHEALTHY and out == ""
    assert err.strip() == "qpid-virtio-status: no guest named 'ghost'"


def test_links_every_routed_link(served: ServedState, capsys: Any) -> None:
    second = json.loads(json.dumps(served.state["channels"][0]))
    second.update(guest="app2", path="/run/qpid-virtio/app2.sock")
    served.state["channels"].append(second)
    _, out, _ = run(served, "links", capsys=capsys)
    rows = table_rows(out)
    assert rows[0][:4] == ["GUEST", "PORT", "SESSION", "DIR"]
    assert [(r[0], r[4]) for r in rows[1:]] == [
        ("app2", "replies.web1"), ("app2", "orders"), ("web1", "replies.web1"), ("web1", "orders"),
    ]  # fmt: skip
    _, out, _ = run(served, "links", "--json", capsys=capsys)
    links = json.loads(out)["links"]
    assert set(links[0]) == {
        "guest", "port", "path", "session", "name", "direction", "address", "credit",
        "unsettled", "deliveries", "bytes",
    }  # fmt: skip


def test_watch_shows_rates_between_refreshes(tmp_path: Path, capsys: Any) -> None:
    class Growing(ServedState):
        def snapshot(self) -> dict[str, Any]:
            snap = super().snapshot()
            web1 = next(c for c in self.state["channels"] if c["guest"] == "web1")
            web1["deliveries_in"] += 10  # the next refresh sees 10 more
            return snap  # type: ignore[return-value]

    with Growing(str(tmp_path / "control.sock"), sample_snapshot()) as served:
        status, out, _ = run(served, "--watch", "0.1", "--count", "2", capsys=capsys)
    blocks = [b for b in out.split("Every 0.1s: qpid-virtio-status channels") if b]
    assert len(blocks) == 2
    first, second = (table_rows(b.split("\n\n", 1)[1]) for b in blocks)
    header = first[0]
    rate_in = header.index("IN/S")
    assert first[4][rate_in] == "-"
    assert 0 < float(second[4][rate_in]) <= 100  # 10 msgs in at least 0.1 s
    assert second[1][rate_in] == "0.0"  # batch: nothing flowing
    assert status == cli.EXIT_UNHEALTHY


def test_watch_json_prints_one_document_per_refresh(served: ServedState, capsys: Any) -> None:
    _, out, _ = run(served, "--json", "--count", "2", "--watch=0.1", "links", capsys=capsys)
    lines = out.splitlines()
    assert len(lines) == 2 and all(list(json.loads(ln)) == ["links"] for ln in lines)


def test_watch_may_be_followed_by_the_command(served: ServedState, capsys: Any) -> None:
    opts = cli.parse_options(["--watch", "guest", "web1"])
    assert (opts.command, opts.guest, opts.watch) == ("guest", "web1", 2.0)


def test_broker_types_match_the_adapters() -> None:
    from connector.status.brokers.registry import ADAPTERS

    assert set(cli.BROKER_TYPES) == set(ADAPTERS)


def test_usage_errors_exit_64(capsys: Any) -> None:
    for argv in (["guest"], ["links", "extra"], ["reboot"], ["--count", "2"], ["--watch", "0"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == cli.EXIT_USAGE, argv
    assert "guest needs exactly one NAME" in capsys.readouterr().err


@pytest.mark.parametrize("interval", ["nan", "inf", "1e400", "86401", "1e10"])
def test_a_watch_interval_out_of_range_or_not_a_number_is_a_usage_error(
    interval: str, capsys: Any
) -> None:
    """float() takes nan and inf, and time.sleep() would raise on them (or on a huge one)."""
    with pytest.raises(SystemExit) as info:
        cli.parse_options(["--watch", interval, "--count", "2"])
    assert info.value.code == cli.EXIT_USAGE
    assert f"--watch: a number of seconds from 0.1 to 86400, not {interval!r}" in (
        capsys.readouterr().err
    )
    assert cli.parse_options(["--watch", "86400"]).watch == 86400.0


def test_missing_socket_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "nope.sock"
    result = status_subprocess("--control-socket", str(path))
    assert result.returncode == cli.EXIT_UNREACHABLE and result.stdout == ""
    assert result.stderr == (
        f"qpid-virtio-status: control socket {path} does not exist: is qpid-virtio-connector "
        "running? (set --control-socket or $QPID_VIRTIO_CONTROL for another path)\n"
    )


def test_a_socket_path_too_long_says_so(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / ("d" * 120) / "control.sock"
    assert cli.main(["--control-socket", str(path)]) == cli.EXIT_UNREACHABLE
    assert capsys.readouterr().err == (
        f"qpid-virtio-status: cannot connect to control socket {path}: the path is too long "
        f"for a unix socket ({len(str(path))} bytes; at most 107)\n"
    )


def test_a_connector_with_too_many_clients_says_so(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connector.control import server

    monkeypatch.setattr(server, "MAX_CLIENTS", 1)
    with (
        ServedState(str(tmp_path / "control.sock"), sample_snapshot()) as served,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent,
    ):
        silent.connect(served.control.path)
        status, out, err = run(served, capsys=capsys)
    assert status == cli.EXIT_UNREACHABLE and out == ""
    assert err == (
        "qpid-virtio-status: too many control clients connected at once (1); try again\n"
    )


def test_the_environment_names_the_socket(served: ServedState) -> None:
    result = status_subprocess("--json", env={"QPID_VIRTIO_CONTROL": served.control.path})
    assert result.returncode == cli.EXIT_UNHEALTHY
    assert len(json.loads(result.stdout)["channels"]) == 4


def test_a_stale_socket_file_says_nothing_listens(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    result = status_subprocess("--control-socket", str(path))
    assert result.returncode == cli.EXIT_UNREACHABLE
    assert "nothing listens on control socket" in result.stderr


def test_an_older_connector_is_named_too_old(
    served: ServedState, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connector.control.protocol, "PROTOCOL_VERSION", 0)
    status, out, err = run(served, capsys=capsys)
    assert status == cli.EXIT_UNREACHABLE and out == ""
    assert "speaks control protocol 0, this qpid-virtio-status needs 1: upgrade the connector" \
        in err  # fmt: skip


def _status_against(path: Path, read: int) -> int:
    """Run the tool against a stand-in connector on ``path`` that reads ``read`` bytes of
    the request and closes the connection without a reply."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def close_unanswered() -> None:
        conn, _ = listener.accept()
        conn.recv(read)
        conn.close()

    thread = threading.Thread(target=close_unanswered)
    thread.start()
    try:
        return cli.main(["--control-socket", str(path)])
    finally:
        thread.join()
        listener.close()


def test_a_connector_that_hangs_up_without_reply_is_too_old(tmp_path: Path, capsys: Any) -> None:
    status = _status_against(tmp_path / "old.sock", 1000)
    assert status == cli.EXIT_UNREACHABLE
    assert "closed the connection without a reply" in capsys.readouterr().err


def test_a_connector_that_drops_the_connection_is_one_clear_line(
    tmp_path: Path, capsys: Any
) -> None:
    """Closing with the request unread resets the connection: no traceback for that."""
    path = tmp_path / "rude.sock"
    status = _status_against(path, 1)  # the request has arrived; the rest stays unread
    assert status == cli.EXIT_UNREACHABLE
    assert capsys.readouterr().err == (
        f"qpid-virtio-status: the connector at {path} dropped the connection without a "
        "reply: Connection reset by peer\n"
    )


def python_for_nobody() -> str | None:
    """An interpreter the user nobody may run (this one may live under /root)."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            subprocess.run([python, "-c", ""], user="nobody", check=True, timeout=60)
        except (OSError, subprocess.CalledProcessError):
            continue
        return python
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the tool as another user")
def test_permission_denied_names_the_group_to_join(request: pytest.FixtureRequest) -> None:
    python = python_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter that the user nobody may run")
    # pytest's base folder is 0700: use a folder in /tmp that nobody can search, so that only
    # the socket's own mode stops it, and then one that nobody cannot search.
    folder = Path(tempfile.mkdtemp(prefix="qvc-status-"))
    request.addfinalizer(lambda: shutil.rmtree(folder))
    folder.chmod(0o755)
    path = folder / "control.sock"
    with ServedState(str(path), sample_snapshot(), mode=0o660, group="daemon"):
        result = status_subprocess("--control-socket", str(path), python=python, user="nobody")
        assert result.returncode == cli.EXIT_UNREACHABLE, result.stderr
        assert result.stderr.strip() == (
            f"qpid-virtio-status: permission denied on control socket {path}: it is owned by "
            "root:daemon with mode 0660: join group 'daemon' (usermod -aG daemon $USER, then "
            "log in again) or run as root"
        )
        folder.chmod(0o700)
        result = status_subprocess("--control-socket", str(path), python=python, user="nobody")
        assert result.returncode == cli.EXIT_UNREACHABLE, result.stderr
        assert result.stderr.strip().endswith(
            f"{path}: you may not search its directory {folder}: ask for access to it"
        )


def test_colour_on_a_terminal_never_in_a_pipe(served: ServedState) -> None:
    piped = status_subprocess("--control-socket", served.control.path)
    assert "\x1b" not in piped.stdout and "connected" in piped.stdout
    leader, follower = pty.openpty()
    try:
        on_tty = status_subprocess("--control-socket", served.control.path, stdout=follower)
        os.close(follower)
        raw = b""
        while chunk := _read_pty(leader):
            raw += chunk
    finally:
        os.close(leader)
    text = raw.decode()
    assert on_tty.returncode == cli.EXIT_UNHEALTHY
    assert "\x1b[32mconnected" in text and "\x1b[1;31merror" in text
    # the colour codes do not move columns: without them each line is as long as piped
    plain = ANSI.sub("", text).replace("\r\n", "\n").splitlines()
    assert [len(line) for line in plain] == [len(line) for line in piped.stdout.splitlines()]


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the writer closed
        return b""
