"""sd_notify: the datagram systemd receives, and silence outside systemd."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from connector.notify import notify


def test_sends_fields_as_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify(READY=1, STATUS="2 channels\nconnected")
        assert server.recv(4096) == b"READY=1\nSTATUS=2 channels connected"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"qpid-virtio-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify(STOPPING=1)
        assert server.recv(4096) == b"STOPPING=1"


def test_no_systemd_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify(READY=1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not notify(READY=1)
