"""The directory watch on real inotify: sockets that appear and go under glob patterns."""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from discovery_helpers import LOG, RecordingSink, short_tmp

from connector.discovery import Discovery
from connector.discovery.settings import DiscoverySettings
from connector.discovery.watch import Changes, GlobWatch, is_regular_file, is_socket
from connector.identity import ChannelKind, ChannelSpec, GuestIdentity

__all__ = ["short_tmp"]  # a fixture, used by name


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Bound sockets stay open for the test, like qemu's listening chardevs."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def _bind(path: Path, keep: list[socket.socket]) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    keep.append(sock)
    return str(path)


def _next(watch: GlobWatch) -> Changes:
    """Wait for the descriptor and read; empty reads (irrelevant events) are skipped."""
    while True:
        ready, _, _ = select.select([watch], [], [], 5)
        assert ready, "no inotify event within 5 s"
        changes = watch.read()
        if changes.appeared or changes.gone or changes.replaced or changes.touched:
            return changes


def test_glob_levels_appear_and_go(short_tmp: Path, sockets: list[socket.socket]) -> None:
    target = short_tmp / "lib" / "channel" / "target"
    watch = GlobWatch([f"{target}/*/org.qpid.amqp.*", f"{target}/*.org.qpid.amqp.*"], is_socket)
    try:
        assert watch.start() == Changes()  # nothing there, not even the directory

        target.mkdir(parents=True)  # the fixed prefix appears level by level
        (target / "domain-1-a").mkdir()
        path_a = _bind(target / "domain-1-a" / "org.qpid.amqp.0", sockets)
        changes = _next(watch)
        assert changes.appeared == [path_a]

        flat = _bind(target / "b.org.qpid.amqp.0", sockets)
        _bind(target / "domain-1-a" / "org.qemu.guest_agent.0", sockets)  # not a match
        (target / "domain-1-a" / "org.qpid.amqp.9").write_text("")  # not a socket
        assert _next(watch).appeared == [flat]
        assert watch.matches == {path_a, flat}

        os.unlink(flat)
        assert _next(watch).gone == [flat]

        os.rename(target / "domain-1-a", target / "domain-2-a")
        changes = _next(watch)
        assert changes.gone == [path_a]
        assert changes.appeared == [str(target / "domain-2-a" / "org.qpid.amqp.0")]

        shutil.rmtree(target.parent)  # the whole tree, anchor included
        assert _next(watch).gone == [str(target / "domain-2-a" / "org.qpid.amqp.0")]
        target.mkdir(parents=True)  # and back: watched again from the nearest ancestor
        (target / "domain-3-c").mkdir()
        path_c = _bind(target / "domain-3-c" / "org.qpid.amqp.1", sockets)
        assert _next(watch).appeared == [path_c]
    finally:
        watch.close()


def test_existing_matches_and_rewritten_files(tmp_path: Path) -> None:
    (tmp_path / "a.xml").write_text("<x/>")
    watch = GlobWatch([f"{tmp_path}/*.xml"], is_regular_file)
    try:
        assert watch.start().appeared == [str(tmp_path / "a.xml")]
        (tmp_path / "a.xml.new").write_text("<y/>")  # libvirt's way: write, then rename
        os.rename(tmp_path / "a.xml.new", tmp_path / "a.xml")
        changes = _next(watch)
        assert changes.replaced == [str(tmp_path / "a.xml")]  # a new file by that name
        assert not changes.appeared and not changes.gone and not changes.touched
        (tmp_path / "a.xml").write_text("<z/>")  # rewritten in place: the same file
        assert _next(watch) == Changes(touched=[str(tmp_path / "a.xml")])
    finally:
        watch.close()


def test_discovery_reports_watched_sockets(short_tmp: Path, sockets: list[socket.socket]) -> None:
    """Without a qemu behind them, sockets are named after their directory."""
    tmp_path = short_tmp
    target = tmp_path / "target"
    (target / "domain-4-web").mkdir(parents=True)
    early = _bind(target / "domain-4-web" / "org.qpid.amqp.0", sockets)
    settings = DiscoverySettings(
        sources=frozenset({"watch"}),
        watch_globs=(f"{target}/*/org.qpid.amqp.*", f"{target}/*.org.qpid.amqp.*"),
        libvirt_status_dir=str(tmp_path / "status"),
    )

    async def scenario() -> None:
        sink = RecordingSink()
        discovery = Discovery(settings, sink, asyncio.get_running_loop(), LOG)
        discovery.start()
        try:
            assert sink.live(str(target)) == {
                early: ChannelSpec(
                    ChannelKind.UNIX,
                    early,
                    GuestIdentity("web", "org.qpid.amqp.0", found_by="watch"),
                )
            }
            late = _bind(target / "old.org.qpid.amqp.3", sockets)
            await sink.wait_for(lambda: late in sink.live())
            identity = sink.live()[late].identity
            assert (identity.name, identity.port) == ("old", "org.qpid.amqp.3")
            os.unlink(early)
            await sink.wait_for(lambda: early not in sink.live())
            assert sink.gone(early) == ["socket removed"]
            assert discovery.stats()["watch_events"] >= 2
        finally:
            discovery.stop()

    asyncio.run(scenario())
