"""The daemon as discovery's sink: a configured path wins only while it is configured.

Channels here are stand-ins that record what the daemon asks of them, so the test sees
which spec serves each path without opening anything.
"""

from __future__ import annotations

import pytest

from connector.channel import ChannelState
from connector.config import Config
from connector.daemon import Daemon
from connector.identity import ChannelKind, ChannelSpec, GuestIdentity
from connector.upstream import BrokerURL, UpstreamSettings

PATH = "/run/vm/org.qpid.amqp.0"
PINNED = ChannelSpec(ChannelKind.UNIX, PATH, GuestIdentity("pinned", found_by="config"))
FOUND = ChannelSpec(
    ChannelKind.UNIX, PATH, GuestIdentity("vm", port="org.qpid.amqp.0", pid=7, found_by="watch")
)


class FakeChannel:
    """Records the spec it serves and whether it was closed."""

    def __init__(self, spec: ChannelSpec) -> None:
        self.spec = spec
        self.state = ChannelState.WAITING

    def close(self, reason: str, *, gone: bool = True) -> None:
        self.state = ChannelState.GONE


class SinkDaemon(Daemon):
    def _start_channel(self, spec: ChannelSpec) -> None:
        self.channels[spec.path] = FakeChannel(spec)  # type: ignore[assignment]


UPSTREAM = UpstreamSettings(urls=(BrokerURL.parse("amqp://127.0.0.1:1"),))


class Files:
    """What ``config.load`` returns on the next SIGHUP: the file as the operator left it."""

    def __init__(self) -> None:
        self.config = Config(upstream=UPSTREAM, channels=(PINNED,))

    def unpin(self) -> None:
        self.config = Config(upstream=UPSTREAM)


@pytest.fixture
def files(monkeypatch: pytest.MonkeyPatch) -> Files:
    files = Files()
    monkeypatch.setattr("connector.config.load", lambda flags: files.config)
    return files


@pytest.fixture
def daemon(files: Files) -> SinkDaemon:
    d = SinkDaemon(files.config)
    d.reload()  # serves the configured channel, as run() does
    return d


def serving(d: Daemon) -> tuple[str, ChannelState]:
    ch = d.channels[PATH]
    return ch.spec.identity.name, ch.state


def test_a_configured_path_wins_then_discovery_serves_it_once_unpinned(
    daemon: SinkDaemon, files: Files
) -> None:
    daemon.channel_appeared(FOUND)
    assert serving(daemon) == ("pinned", ChannelState.WAITING)
    files.unpin()
    daemon.reload()  # the [[channel]] entry was taken out of the file
    assert serving(daemon) == ("vm", ChannelState.WAITING)


def test_discovery_losing_a_configured_path_leaves_the_configured_channel(
    daemon: SinkDaemon, files: Files
) -> None:
    daemon.channel_appeared(FOUND)
    daemon.channel_gone(PATH, "qemu exited")
    assert serving(daemon) == ("pinned", ChannelState.WAITING)
    files.unpin()
    daemon.reload()  # unpinned after the VM went: nothing serves the path any more
    assert serving(daemon) == ("pinned", ChannelState.GONE)
