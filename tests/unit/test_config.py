"""``config.build``: every key's type is checked, and a mistake names the key.

docs/configuration.md promises one line naming the key for any mistake, a wrong type
included; the daemon prints ``ConfigError`` as that line, so raising it is the promise.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from connector import config
from connector.errors import ConfigError


def build(toml: str) -> config.Config:
    return config.build(tomllib.loads(toml))


@pytest.mark.parametrize(
    ("toml", "where"),
    [
        # a forgotten pair of quotes, or a table written as a value
        ("[control]\nsocket = 5\n", "control.socket"),
        ("[control]\nsocket = ''\n", "control.socket"),
        ("[control]\ngroup = 0\n", "control.group"),
        ("[control]\nmode = true\n", "control.mode"),
        ("[control]\nmode = 660\n", "control.mode"),  # decimal: 0o1224 is no mode
        ("[control]\nmode = '-1'\n", "control.mode"),
        ("[control]\nsokcet = '/run/x.sock'\n", "control.sokcet"),
        ("control = 5\n", "control"),
        ("[metrics]\nlisten = 9187\n", "metrics.listen"),
        ("[metrics]\nlisten = '9187'\n", "metrics.listen"),
        ("[metrics]\nport = 9187\n", "metrics.port"),
        ("[log]\nlevel = 10\n", "log.level"),
        ("[log]\nlevle = 'debug'\n", "log.levle"),
        ("broker = 'amqp://h'\n", "broker"),
        ("[broker]\nurls = [5672]\n", "broker.urls"),
        ("[broker]\nuser = 1\n", "broker.user"),
        ("[broker]\npassword_file = 3\n", "broker.password_file"),
        ("[broker]\nsasl_mechanisms = ['PLAIN']\n", "broker.sasl_mechanisms"),
        ("[broker]\nhostname = false\n", "broker.hostname"),
        ("[broker]\nidle_timeout_s = nan\n", "broker.idle_timeout_s"),
        ("[broker]\nidle_timeout_s = inf\n", "broker.idle_timeout_s"),
        ("[broker]\ntls = 1\n", "broker.tls"),
        ("[broker.tls]\nca_file = 0\n", "broker.tls.ca_file"),
        ("[broker.tls]\nverify_hostname = 'no'\n", "broker.tls.verify_hostname"),
        ("channel = 'unix:/run/x.sock'\n", "channel"),
        ("channel = [1]\n", "channel[0]"),
        ("[[channel]]\nkind = 'pty'\npath = '/dev/null'\nguest = 7\n", "channel[0].guest"),
        ("[[channel]]\nkind = 'pty'\npath = '/dev/null'\nport = 0\n", "channel[0].port"),
        ("[[channel]]\nkind = 'pty'\npath = '/dev/null'\nuuid = 1\n", "channel[0].uuid"),
        ("limits = 1\n", "limits"),
        ("policy = []\n", "policy"),
        ("discovery = 'kvm'\n", "discovery"),
        ("[discovery]\nlibvirt_retry_interval = 0\n", "discovery.libvirt_retry_interval"),
        ("[discovery]\nlibvirt_retry_seconds = inf\n", "discovery.libvirt_retry_seconds"),
    ],
)
def test_a_wrong_type_or_value_names_its_key(toml: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(toml)
    assert info.value.where == where


def test_well_typed_values_are_taken() -> None:
    cfg = build(
        "[control]\nsocket = '/run/q/c.sock'\nmode = 0o660\ngroup = 'kvm'\n"
        "[metrics]\nlisten = '[::1]:9187'\n[log]\nlevel = 'DEBUG'\n"
        "[broker]\nidle_timeout_s = 0\n"
        "[[channel]]\nkind = 'pty'\npath = '/dev/null'\nguest = 'vm'\nport = 'p'\n"
    )
    control = (cfg.control_socket, cfg.control_mode, cfg.control_group)
    assert control == ("/run/q/c.sock", 0o660, "kvm")
    assert (cfg.metrics, cfg.log_level, cfg.upstream.idle_timeout_s) == ("[::1]:9187", "debug", 0)
    assert build("[control]\nmode = '0640'\n").control_mode == 0o640
    assert [(c.identity.name, c.identity.port) for c in cfg.channels] == [("vm", "p")]


def test_every_setting_is_either_reloaded_or_named_as_needing_a_restart() -> None:
    """A new Config field must be given a section, or a reload would ignore it silently."""
    names = {field.name for field in dataclasses.fields(config.Config)}
    assert names == config.RELOADED_FIELDS | config.RESTART_SECTIONS.keys()


def test_a_reload_names_the_sections_it_does_not_apply() -> None:
    """``[broker]`` is applied by a reload (to new upstream connections), so it is not
    among the sections said to wait for a restart."""
    running = build("[limits]\nmax_sessions = 32\n[[channel]]\nkind = 'pty'\npath = '/dev/null'\n")
    channels_only = build("[limits]\nmax_sessions = 32\n")
    assert config.sections_needing_restart(running, channels_only) == []
    fresh = build(
        "[limits]\nmax_sessions = 8\n[policy.default]\nrelay = false\n[log]\nlevel = 'debug'\n"
        "[control]\nmode = '0660'\n[discovery]\nsources = ['watch']\n"
        "[broker]\nurls = ['amqp://elsewhere']\n"  # applied by the reload: not named
    )
    assert config.sections_needing_restart(running, fresh) == [
        "control", "discovery", "limits", "log", "policy",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"caf\xe9\n", "not UTF-8"),
    ],
)
def test_a_password_file_that_holds_no_password_names_the_key(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    # An empty file would have made the connector log in as ANONYMOUS, which a broker
    # allowing it takes silently; bytes that are not text ended in a traceback.
    with pytest.raises(ConfigError) as info:
        _with_password_file(tmp_path, content)
    assert info.value.where == "broker.password_file"
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("content", "password"),
    [(b"s3cret\n", "s3cret"), (b"s3cret\r\n", "s3cret"), (b" spaced pass \n", " spaced pass ")],
)
def test_a_password_file_loses_only_its_line_ending(
    tmp_path: Path, content: bytes, password: str
) -> None:
    assert _with_password_file(tmp_path, content).upstream.password == password


def _with_password_file(tmp_path: Path, content: bytes) -> config.Config:
    """The configuration of a broker user whose password file holds ``content``."""
    secret = tmp_path / "broker.pw"
    secret.write_bytes(content)
    secret.chmod(0o600)
    return build(f"[broker]\nuser = 'qpid-virtio'\npassword_file = '{secret}'\n")
