"""A daemon in the test's process whose configuration file is a string the test rewrites,
read again on every reload (SIGHUP's ``Daemon.reload``), with channels that open nothing."""

from __future__ import annotations

import tomllib

import pytest

from connector import config
from connector.daemon import Daemon
from connector.identity import ChannelSpec


class Recorded:
    """A channel that keeps what the daemon gave it, and opens nothing."""

    def __init__(self, spec: ChannelSpec, **kwargs: object) -> None:
        self.spec = spec
        self.kwargs = kwargs

    def start(self) -> None:
        pass


def daemon_reading(monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> Daemon:
    """A daemon configured by ``files["text"]`` (TOML), serving its channels as
    ``Recorded`` ones; each ``reload()`` reads ``files["text"]`` again."""
    monkeypatch.setattr(
        "connector.config.load", lambda flags: config.build(tomllib.loads(files["text"]))
    )
    monkeypatch.setattr("connector.daemon.Channel", Recorded)
    daemon = Daemon(config.load({}))
    daemon.reload()  # serves the configured channels, as run() does
    return daemon
