"""The control server on a real unix socket: replies, bad input, permissions, stale files,
and how many clients it holds."""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from connector.control import server as server_module
from connector.control.protocol import MAX_REQUEST_BYTES, PROTOCOL_VERSION, error_reply
from connector.control.sample import ServedState, sample_snapshot
from connector.control.server import ControlServer
from connector.errors import ConfigError
from tests.support.connector import wait_for

TOO_LONG = error_reply(f"request too long (over {MAX_REQUEST_BYTES} bytes)")


class Conversation:
    """A raw client: send lines, read reply lines."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def ask(self, raw: bytes) -> dict[str, Any]:
        self.sock.sendall(raw)
        return self.reply()

    def reply(self) -> dict[str, Any]:
        return json.loads(self.file.readline())

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.sock.close()


def answered(path: Path, command: str) -> bool:
    """Whether a fresh connection gets an ok reply to one command."""
    with Conversation(path) as conv:
        return bool(conv.ask(json.dumps({"command": command}).encode() + b"\n")["ok"])


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "control.sock"


def test_requests_and_bad_requests_on_one_connection(sock_path: Path) -> None:
    with ServedState(str(sock_path), sample_snapshot()), Conversation(sock_path) as conv:
        bad = conv.ask(b"{not json\n")
        assert bad["ok"] is False and "malformed request" in bad["error"]
        assert bad["version"] == PROTOCOL_VERSION
        # blank lines are ignored; the connection still serves the next request
        reply = conv.ask(b'\n{"command": "channels"}\n')
        assert reply["ok"] is True and len(reply["channels"]) == 4
        guest = conv.ask(b'{"command": "guest", "name": "web1"}\n')
        assert guest["guest"]["uuid"] == "5b2f0a8e-3c1d-4f7a-9e61-0c2b8d4e7f10"
        unknown = conv.ask(b'{"command": "shutdown"}\n')
        assert "unknown command 'shutdown'" in unknown["error"]


def test_an_oversized_request_gets_an_error_and_the_connection_lives_on(sock_path: Path) -> None:
    """A line over the limit is one bad request: answered, the rest of the line thrown away,
    and the next line answered on the same connection (docs/status.md: the daemon never
    closes on a bad request)."""
    with ServedState(str(sock_path), sample_snapshot()), Conversation(sock_path) as conv:
        assert conv.ask(b"x" * (MAX_REQUEST_BYTES + 10) + b"\n") == TOO_LONG
        assert conv.ask(b'{"command": "links"}\n')["ok"] is True
        # the overlong line, its end and the next request all in one write
        assert conv.ask(b"x" * (MAX_REQUEST_BYTES + 10) + b'\n{"command": "links"}\n') == TOO_LONG
        assert conv.reply()["ok"] is True
        # a line many times the limit, answered before it ends, its end arriving later
        assert conv.ask(b"y" * (8 * MAX_REQUEST_BYTES)) == TOO_LONG
        assert conv.ask(b"y" * 1000 + b'\n{"command": "channels"}\n')["ok"] is True
        # a line of exactly the limit, newline included, is still a request
        exact = b'{"command": "links"}'.ljust(MAX_REQUEST_BYTES, b" ") + b"\n"
        assert conv.ask(exact)["ok"] is True


def test_a_deeply_nested_request_is_a_malformed_one() -> None:
    """json's decoder recurses once per bracket: RecursionError must not escape reply_to()."""
    server = ControlServer("unused.sock", None)  # type: ignore[arg-type]
    reply = server.reply_to(b"[" * 20000)
    assert reply == error_reply("malformed request: nested too deeply")
    assert server.reply_to(b'{"command": ' + b"[" * 20000 + b"\n")["ok"] is False


def test_a_failing_snapshot_is_an_error_reply(sock_path: Path) -> None:
    broken = {"channels": "not a list of channels"}
    with ServedState(str(sock_path), broken) as served, Conversation(sock_path) as conv:
        reply = conv.ask(b'{"command": "channels"}\n')
        assert reply["ok"] is False and reply["error"].startswith("internal error")
        served.state = sample_snapshot()
        assert conv.ask(b'{"command": "channels"}\n')["ok"] is True


def test_mode_and_group_are_set_and_close_removes_the_socket(sock_path: Path) -> None:
    group = grp.getgrgid(os.getgid() if os.getgid() != 0 else 1)  # root: use gid 1 (daemon)
    with ServedState(str(sock_path), sample_snapshot(), mode=0o660, group=group.gr_name):
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group.gr_gid
    assert not sock_path.exists()


def test_default_mode_is_owner_only_in_a_directory_made_for_it(tmp_path: Path) -> None:
    sock_path = tmp_path / "run" / "qpid-virtio-connector" / "control.sock"
    with ServedState(str(sock_path), sample_snapshot()):
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o755


def test_close_leaves_a_socket_another_daemon_bound_at_the_path(sock_path: Path) -> None:
    """Our file was removed (a tmp cleaner, an operator's rm) and a newer daemon bound the
    path: stopping must not cut that one off from qpid-virtio-status."""
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with ServedState(str(sock_path), sample_snapshot()):
            sock_path.unlink()
            newer.bind(str(sock_path))
            newer.listen()
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(sock_path))
    finally:
        newer.close()


def test_a_path_too_long_for_a_unix_socket_is_named_as_such(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120) / "control.sock"
    with pytest.raises(ConfigError, match="the path is too long for a unix socket") as info:
        asyncio.run(ControlServer(str(deep), None).start())  # type: ignore[arg-type]
    assert info.value.where == str(deep)
    assert not deep.parent.exists()  # refused before anything was made for it


def test_clients_over_the_cap_are_told_and_closed_at_once(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "MAX_CLIENTS", 2)
    with ServedState(str(sock_path), sample_snapshot()):
        silent = [Conversation(sock_path), Conversation(sock_path)]
        try:
            with Conversation(sock_path) as third:
                assert third.reply() == error_reply(
                    "too many control clients connected at once (2); try again"
                )
                assert third.file.readline() == b""  # closed, not held
            silent[0].sock.shutdown(socket.SHUT_WR)  # one of the silent clients goes away
            wait_for(lambda: answered(sock_path, "channels"), 10, "a place to free up")
            assert silent[1].ask(b'{"command": "links"}\n')["ok"] is True
        finally:
            for conv in silent:
                conv.__exit__()


def test_stopping_with_a_client_connected_logs_no_error(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `qpid-virtio-status --watch` connected while the daemon stops: its task is
    cancelled, which must not read as a failure in the daemon's log."""
    with caplog.at_level(logging.ERROR):
        with ServedState(str(sock_path), sample_snapshot()):
            conv = Conversation(sock_path)
            assert conv.ask(b'{"command": "links"}\n')["ok"] is True
        # the daemon has stopped with the client still connected
        try:
            assert conv.file.readline() == b""
        finally:
            conv.__exit__()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_stale_socket_is_replaced(sock_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves
    with ServedState(str(sock_path), sample_snapshot()):
        assert answered(sock_path, "channels")


def test_a_live_socket_or_a_regular_file_is_not_taken_over(sock_path: Path) -> None:
    with ServedState(str(sock_path), sample_snapshot()):
        with pytest.raises(ConfigError, match="already serving"):
            asyncio.run(ControlServer(str(sock_path), None).start())  # type: ignore[arg-type]
        assert sock_path.exists()
    sock_path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        asyncio.run(ControlServer(str(sock_path), None).start())  # type: ignore[arg-type]
    assert sock_path.read_text() == "precious"


def test_an_unknown_group_is_a_config_error(sock_path: Path) -> None:
    server = ControlServer(str(sock_path), None, group="no-such-group-qvc")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no such group 'no-such-group-qvc'") as info:
        asyncio.run(server.start())
    assert info.value.where == "control.group"
    assert not sock_path.exists()
