"""Channel endpoints: what a failure to reach the other end of a port means."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.channel import Channel, ChannelState
from connector.channels.endpoint import EndpointUnavailable
from connector.channels.unix_listen import UnixListenEndpoint
from connector.identity import ChannelKind, ChannelSpec, GuestIdentity
from connector.limits import GuestLimits
from connector.upstream import BrokerPool, BrokerURL, UpstreamSettings


@contextlib.contextmanager
def _no_descriptor_left() -> Iterator[None]:
    """Lower this process's open-file limit to its lowest free descriptor, so that the
    next descriptor anything opens fails with EMFILE; restored on leaving."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_peer_not_accepted_for_want_of_descriptors_is_an_error_not_a_wait(
    tmp_path: Path,
) -> None:
    # qemu connected, but the connector has no descriptor left to accept it with: that is
    # the connector's problem, and the operator must see it (a warning and state "error"),
    # not "waiting for PATH" at info level as if qemu were not there yet.
    endpoint = UnixListenEndpoint(str(tmp_path / "port"))
    endpoint.listen_fd()
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        qemu.connect(endpoint.path)
        with _no_descriptor_left(), pytest.raises(OSError) as failed:
            endpoint.connect()
        assert not isinstance(failed.value, EndpointUnavailable)
        assert failed.value.errno == errno.EMFILE
        accepted = endpoint.connect()  # with descriptors back, the same peer is served
        assert accepted is not None
        accepted.close()
    finally:
        qemu.close()
        endpoint.close()


def test_a_channel_out_of_descriptors_says_so_and_does_not_spin(tmp_path: Path) -> None:
    # qemu waits to be accepted, which keeps the listening socket readable: if a failed
    # accept left the channel watching it, the loop would call accept again on every turn.
    loop = asyncio.new_event_loop()
    pool = BrokerPool(UpstreamSettings(urls=(BrokerURL.parse("amqp://127.0.0.1:1"),)))
    spec = ChannelSpec(ChannelKind.UNIX_LISTEN, str(tmp_path / "port"), GuestIdentity("vm"))
    channel = Channel(spec, loop=loop, brokers=lambda: pool, limits=GuestLimits())
    tries = []
    connect = channel._endpoint.connect

    def counted() -> Any:
        tries.append(1)
        return connect()

    channel._endpoint.connect = counted  # type: ignore[method-assign]
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        loop.call_soon(channel.start)
        loop.run_until_complete(asyncio.sleep(0))  # listening, nobody there yet
        qemu.connect(spec.path)
        with _no_descriptor_left():
            for _ in range(100):  # loop turns, each polling the listening socket
                loop.run_until_complete(asyncio.sleep(0))
        assert channel.state is ChannelState.ERROR
        assert "Too many open files" in (channel.last_error or "")
        assert len(tries) <= 3, f"accept tried {len(tries)} times in 100 loop turns"
    finally:
        channel.close("test over")
        qemu.close()
        loop.close()
