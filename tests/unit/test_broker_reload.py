"""SIGHUP and ``[broker]``: what counts as a change, and which pool a connection uses.

A reload must replace the broker pool for new upstream connections when (and only when)
the operator changed something in ``[broker]``, a rotated password file or a renewed TLS
file included; an unusable new ``[broker]`` must leave the running pool alone.
"""

from __future__ import annotations

import asyncio
import socket
import tomllib
from pathlib import Path

import pytest

from connector import config
from connector.broker_reload import CurrentBrokers, changed_keys
from connector.channel import Channel, _Hop
from connector.errors import ConfigError
from connector.identity import ChannelKind, ChannelSpec, GuestIdentity
from connector.limits import GuestLimits
from connector.upstream import BrokerPool, BrokerURL, UpstreamSettings
from tests.brokers.common import free_port
from tests.reliability.amqp import AMQP_HEADER, open_frame
from tests.support.certs import self_signed
from tests.support.reload import daemon_reading

TIMEOUT = 10.0


def broker(toml: str) -> UpstreamSettings:
    """The ``[broker]`` settings of a file, read as a reload reads them."""
    return config.build(tomllib.loads(toml)).upstream


def password_file(path: Path, secret: str) -> str:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return f"[broker]\nurls = ['amqp://a:5672', 'amqp://b:5672']\npassword_file = '{path}'\n"


def test_an_unchanged_broker_section_keeps_the_pool_and_its_failover_position(
    tmp_path: Path,
) -> None:
    text = password_file(tmp_path / "pw", "s3cret")
    brokers = CurrentBrokers(broker(text))
    pool = brokers()
    pool.failed(pool.current)  # a failover moved to b
    assert brokers.prepare(broker(text)) is None  # read again: equal, not the same object
    assert brokers() is pool
    assert str(brokers().current) == "amqp://b:5672"


def test_a_rotated_password_file_is_a_change_named_by_its_key_only(tmp_path: Path) -> None:
    brokers = CurrentBrokers(broker(password_file(tmp_path / "pw", "old-s3cret")))
    brokers().failed(brokers().current)
    change = brokers.prepare(broker(password_file(tmp_path / "pw", "new-s3cret")))
    assert change is not None
    assert change.changed == ("password",)
    assert "s3cret" not in repr(change)
    brokers.apply(change)
    assert brokers() is change.pool
    assert brokers().settings.password == "new-s3cret"
    # The same brokers in the same order: the failover position is not undone.
    assert str(brokers().current) == "amqp://b:5672"


def test_every_broker_key_is_compared_and_named_as_in_the_file() -> None:
    running = broker("[broker]\nurls = ['amqp://a']\n")
    fresh = broker(
        "[broker]\nurls = ['amqp://u:pw@a']\nuser = 'u'\nsasl_mechanisms = 'PLAIN'\n"
        "hostname = 'vhost'\nidle_timeout_s = 5\n[broker.tls]\nverify_hostname = false\n"
    )
    assert changed_keys(running, fresh) == [
        "urls", "user", "sasl_mechanisms", "tls.verify_hostname", "hostname", "idle_timeout_s",
    ]  # fmt: skip
    assert changed_keys(fresh, fresh) == []


@pytest.mark.parametrize(
    ("before", "after", "position"),
    [
        (["amqp://a", "amqp://b"], ["amqp://a", "amqp://b"], "amqp://b:5672"),
        (["amqp://a", "amqp://b"], ["amqp://u:new@a", "amqp://b"], "amqp://b:5672"),
        (["amqp://a", "amqp://b"], ["amqp://b", "amqp://a"], "amqp://b:5672"),  # first URL
        (["amqp://a", "amqp://b"], ["amqp://c", "amqp://b"], "amqp://c:5672"),
    ],
)
def test_a_new_pool_keeps_the_position_only_for_the_same_list(
    before: list[str], after: list[str], position: str
) -> None:
    old = BrokerPool(broker(f"[broker]\nurls = {before!r}\n"))
    old.failed(old.current)
    new = BrokerPool(broker(f"[broker]\nurls = {after!r}\n"))
    new.take_position(old)
    assert str(new.current) == position


def test_a_tls_file_renewed_in_place_is_a_change(tmp_path: Path) -> None:
    ca, _ = self_signed(tmp_path, "ca")
    text = f"[broker]\nurls = ['amqps://a']\n[broker.tls]\nca_file = '{ca}'\n"
    brokers = CurrentBrokers(broker(text))
    assert brokers.prepare(broker(text)) is None
    renewed, _ = self_signed(tmp_path, "renewed")
    ca.write_bytes(renewed.read_bytes())
    change = brokers.prepare(broker(text))
    assert change is not None
    assert change.changed == ("tls.ca_file (contents)",)


def test_an_unusable_tls_file_fails_the_reload_naming_the_key(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "client")
    _, other_key = self_signed(tmp_path, "other")
    tls = f"[broker]\nurls = ['amqps://a']\n[broker.tls]\ncert_file = '{cert}'\n"
    good = tls + f"key_file = '{key}'\n"
    brokers = CurrentBrokers(broker(good))
    pool = brokers()
    with pytest.raises(ConfigError) as mismatched:
        brokers.prepare(broker(tls + f"key_file = '{other_key}'\n"))
    assert mismatched.value.where == "broker.tls.cert_file"
    cert.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as garbled:
        brokers.prepare(broker(good))
    assert garbled.value.where == "broker.tls.cert_file"
    assert brokers() is pool


def test_a_channel_started_before_a_reload_connects_with_the_new_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon hands channels a way to the current pool, not the pool of their start;
    a reload whose file is broken keeps the old pool and the old channel list."""
    channel = f"[[channel]]\nkind = 'unix-listen'\npath = '{tmp_path / 'vm'}'\n"
    files = {"text": "[broker]\nurls = ['amqp://a']\n" + channel}
    daemon = daemon_reading(monkeypatch, files)
    (started,) = daemon.channels.values()
    brokers = started.kwargs["brokers"]  # type: ignore[attr-defined]
    files["text"] = "[broker]\nurls = ['amqp://b']\n" + channel
    daemon.reload()
    assert daemon.channels[str(tmp_path / "vm")] is started
    assert str(brokers().current) == "amqp://b:5672"
    assert [str(u) for u in daemon.config.upstream.urls] == ["amqp://b:5672"]  # as shown
    files["text"] = "[broker]\nurls = ['amqp://c']\nidle_timeout_s = -1\n"
    daemon.reload()
    assert str(brokers().current) == "amqp://b:5672"
    assert list(daemon.channels) == [str(tmp_path / "vm")]


def test_a_connect_begun_before_a_reload_reports_its_failure_to_its_own_pool(
    tmp_path: Path,
) -> None:
    """The old pool's broker hangs up on a connect still in flight when the reload puts a
    new pool (same brokers, new password) in place: that says nothing of the new
    password, so the new pool's failover position stays where it was."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    silent.setblocking(False)
    urls = f"['amqp://127.0.0.1:{silent.getsockname()[1]}', 'amqp://127.0.0.1:{free_port()}']"
    brokers = CurrentBrokers(broker(f"[broker]\nurls = {urls}\npassword = 'old'\n"))
    old = brokers()
    loop = asyncio.new_event_loop()
    spec = ChannelSpec(ChannelKind.UNIX_LISTEN, str(tmp_path / "port"), GuestIdentity("vm"))
    channel = Channel(spec, loop=loop, brokers=brokers, limits=GuestLimits())
    guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        channel.start()
        guest.connect(spec.path)
        guest.setblocking(False)
        guest.sendall(AMQP_HEADER + open_frame())
        upstream, _ = loop.run_until_complete(asyncio.wait_for(loop.sock_accept(silent), TIMEOUT))
        change = brokers.prepare(broker(f"[broker]\nurls = {urls}\npassword = 'new'\n"))
        assert change is not None
        brokers.apply(change)
        upstream.close()  # hung up before its open: a failed connect

        async def told() -> bytes:
            heard = b""
            while b"connection:forced" not in heard:
                heard += await loop.sock_recv(guest, 65536)
            return heard

        loop.run_until_complete(asyncio.wait_for(told(), TIMEOUT))
        assert old.current == old.settings.urls[1]  # the failure went to the old pool
        assert brokers().current == brokers().settings.urls[0]
    finally:
        channel.close("test over")
        loop.run_until_complete(asyncio.wait_for(channel.idle.wait(), TIMEOUT))
        guest.close()
        silent.close()
        loop.close()


def test_a_redirect_target_from_before_a_reload_gives_way_to_the_new_brokers(
    tmp_path: Path,
) -> None:
    """A broker that redirected mid-connection sends the channel's next connection to its
    target, unless a reload changed [broker] since: the operator's new list wins."""
    brokers = CurrentBrokers(broker("[broker]\nurls = ['amqp://a']\n"))
    old = brokers()
    loop = asyncio.new_event_loop()
    spec = ChannelSpec(ChannelKind.UNIX_LISTEN, str(tmp_path / "port"), GuestIdentity("vm"))
    channel = Channel(spec, loop=loop, brokers=brokers, limits=GuestLimits())
    target = BrokerURL.parse("amqp://redirected:5673")
    try:
        channel._target = _Hop(old, target, "vhost", old.current)  # as _on_redirect leaves it
        assert channel._next_broker() == channel._target
        change = brokers.prepare(broker("[broker]\nurls = ['amqp://b']\n"))
        assert change is not None
        brokers.apply(change)
        hop = channel._next_broker()
        assert (hop.pool, str(hop.url), hop.hostname) == (brokers(), "amqp://b:5672", None)
    finally:
        loop.close()
