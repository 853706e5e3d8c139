"""Configuration: a TOML file and command-line flags, merged into one frozen ``Config``.

Every user mistake becomes a :class:`~connector.errors.ConfigError` naming the key, flag or
path, which the daemon prints as one line. Scalar flags override the file; ``--broker``
replaces the file's URL list; ``--channel`` entries are added to the file's channels.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .control.metrics import parse_listen_address
from .discovery.settings import DiscoverySettings, seconds
from .errors import ConfigError
from .identity import DEFAULT_PORT, ChannelKind, ChannelSpec, GuestIdentity
from .limits import GuestLimits
from .policy import Policy
from .upstream import UPSTREAM_IDLE_TIMEOUT_S, BrokerURL, TLSSettings, UpstreamSettings

DEFAULT_CONTROL_SOCKET = "/run/qpid-virtio-connector/control.sock"
DEFAULT_BROKER = "amqp://127.0.0.1:5672"
LOG_LEVELS = ("debug", "info", "warning", "error")

_TOP_KEYS = {"broker", "channel", "control", "metrics", "log", "limits", "discovery", "policy"}
_BROKER_KEYS = {
    "urls",
    "user",
    "password",
    "password_file",
    "sasl_mechanisms",
    "hostname",
    "idle_timeout_s",
    "tls",
}
_TLS_KEYS = {"ca_file", "cert_file", "key_file", "verify_hostname"}
_CHANNEL_KEYS = {"kind", "path", "guest", "port", "uuid"}
_CONTROL_KEYS = {"socket", "mode", "group"}
_METRICS_KEYS = {"listen"}
_LOG_KEYS = {"level"}


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs, checked."""

    upstream: UpstreamSettings
    channels: tuple[ChannelSpec, ...] = ()
    control_socket: str = DEFAULT_CONTROL_SOCKET
    control_mode: int = 0o600
    control_group: str | None = None
    metrics: str | None = None  # host:port for the Prometheus endpoint, off when None
    log_level: str = "info"
    limits: GuestLimits = field(default_factory=GuestLimits)
    policy: Policy = field(default_factory=Policy)
    discovery: DiscoverySettings | None = None  # None: discovery off
    file: str | None = None  # the TOML file, re-read on SIGHUP


def _table(value: Any, where: str) -> dict[str, Any]:
    """A TOML table, or ConfigError naming it (``broker = 5`` instead of ``[broker]``)."""
    if not isinstance(value, dict):
        raise ConfigError(where, f"must be a table ([{where}]), not {value!r}")
    return value


def _text(table: dict[str, Any], key: str, where: str) -> str | None:
    """An optional string key: ``None`` when absent, else it must be a string.

    TOML has no null, so a key is either absent or has a value of its own type; a
    forgotten pair of quotes (``group = 0``) must fail here, naming the key, rather than
    deep inside whatever uses it.
    """
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(where, f"must be a string, not {value!r}")
    return value


# SIGHUP applies the channel list and [broker] (to upstream connections opened after it,
# broker_reload.py); the daemon's other parts are built once, at start. Every other Config
# field, by the file section it comes from, so that a reload can say which of the
# operator's changes wait for a restart instead of ignoring them silently.
RELOADED_FIELDS = frozenset({"channels", "file", "upstream"})
RESTART_SECTIONS: dict[str, str] = {
    "control_socket": "control",
    "control_mode": "control",
    "control_group": "control",
    "metrics": "metrics",
    "log_level": "log",
    "limits": "limits",
    "policy": "policy",
    "discovery": "discovery",
}


def sections_needing_restart(running: Config, fresh: Config) -> list[str]:
    """The sections whose settings differ between ``running`` and ``fresh`` (re-read on
    SIGHUP) and which a reload does not apply, sorted."""
    return sorted(
        {
            section
            for name, section in RESTART_SECTIONS.items()
            if getattr(running, name) != getattr(fresh, name)
        }
    )


def load_file(path: str) -> dict[str, Any]:
    """Read and parse a TOML file; refuse one that lets others read a password."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError(path, "no such file") from err
    except PermissionError as err:
        raise ConfigError(path, "permission denied") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, f"not valid TOML: {err}") from err
    broker = data.get("broker")
    if isinstance(broker, dict) and "password" in broker and st.st_mode & stat.S_IROTH:
        raise ConfigError(path, "holds broker.password but is readable by others; chmod o-r it")
    return data


def parse_channel(text: str, where: str = "--channel") -> ChannelSpec:
    """``KIND:PATH[,guest=NAME][,port=PORT][,uuid=UUID]`` -> ChannelSpec."""
    kind_text, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ConfigError(where, f"{text!r}: expected KIND:PATH[,guest=NAME][,port=PORT]")
    path, *opts = rest.split(",")
    table: dict[str, str] = {"kind": kind_text, "path": path}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in {"guest", "port", "uuid"}:
            raise ConfigError(where, f"{text!r}: unknown option {opt!r} (guest, port, uuid)")
        table[key] = value
    return channel_from_table(table, where)


def channel_from_table(table: dict[str, Any], where: str) -> ChannelSpec:
    """A ``[[channel]]`` table (or a parsed --channel) -> ChannelSpec, with its path checked."""
    for key in table:
        if key not in _CHANNEL_KEYS:
            raise ConfigError(f"{where}.{key}", "unknown key")
    try:
        kind = ChannelKind(table.get("kind"))
    except ValueError as err:
        kinds = ", ".join(k.value for k in ChannelKind)
        raise ConfigError(
            f"{where}.kind", f"{table.get('kind')!r}: must be one of {kinds}"
        ) from err
    path = table.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"{where}.path", f"{path!r}: must be an absolute path")
    _check_channel_path(kind, path)
    guest = _text(table, "guest", f"{where}.guest") or default_guest_name(path)
    identity = GuestIdentity(
        name=guest,
        port=_text(table, "port", f"{where}.port") or DEFAULT_PORT,
        uuid=_text(table, "uuid", f"{where}.uuid"),
        found_by="config",
    )
    return ChannelSpec(kind, path, identity)


def default_guest_name(path: str) -> str:
    """A guest name when none is given: the socket or pty file name, without '.sock'."""
    name = Path(path).name
    return name.removesuffix(".sock") or path


def _check_channel_path(kind: ChannelKind, path: str) -> None:
    """Catch paths that can never work at start-up, with the reason in one line."""
    parent = os.path.dirname(path) or "/"
    if kind is ChannelKind.PTY:
        if not os.path.exists(path):
            raise ConfigError(path, "no such pty")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(path, "pty not readable and writable by this user")
    elif not os.path.isdir(parent):
        raise ConfigError(path, f"directory {parent} does not exist")
    elif kind is ChannelKind.UNIX_LISTEN and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(path, f"cannot create a socket in {parent}")


def _read_password_file(path: str, where: str) -> str:
    """The password in ``path``: the whole file but its line ending (``echo pw > file``
    adds one; any other whitespace may be part of the password). A reload (SIGHUP) reads
    it again: that is how a rotated password reaches the next upstream connections."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            secret = f.read()
    except OSError as err:
        raise ConfigError(where, f"{path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(where, f"{path}: not UTF-8 text ({err.reason})") from err
    if st.st_mode & stat.S_IROTH:
        raise ConfigError(where, f"{path} is readable by others; chmod o-r it")
    secret = secret.removesuffix("\n").removesuffix("\r")
    if not secret:
        # Without a password the connector would log in as ANONYMOUS, which a broker
        # that allows it takes silently: a mistake that must not pass as a working setup.
        raise ConfigError(where, f"{path} is empty")
    return secret


def _broker_from_table(table: dict[str, Any]) -> UpstreamSettings:
    for key in table:
        if key not in _BROKER_KEYS:
            raise ConfigError(f"broker.{key}", "unknown key")
    urls = table.get("urls", [DEFAULT_BROKER])
    if isinstance(urls, str):
        urls = [u for u in urls.split(",") if u]
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ConfigError("broker.urls", "must be a non-empty list of URLs")
    password = _text(table, "password", "broker.password")
    password_file = _text(table, "password_file", "broker.password_file")
    if password_file is not None:
        password = _read_password_file(password_file, "broker.password_file")
    tls_table = _table(table.get("tls", {}), "broker.tls")
    for key in tls_table:
        if key not in _TLS_KEYS:
            raise ConfigError(f"broker.tls.{key}", "unknown key")
    for key in ("ca_file", "cert_file", "key_file"):
        file = _text(tls_table, key, f"broker.tls.{key}")
        if file is not None and not os.access(file, os.R_OK):
            raise ConfigError(f"broker.tls.{key}", f"{file}: not readable")
    if not isinstance(tls_table.get("verify_hostname", True), bool):
        raise ConfigError("broker.tls.verify_hostname", "must be true or false")
    idle = table.get("idle_timeout_s", UPSTREAM_IDLE_TIMEOUT_S)
    return UpstreamSettings(
        urls=tuple(BrokerURL.parse(u) for u in urls),
        user=_text(table, "user", "broker.user"),
        password=password,
        sasl_mechanisms=_text(table, "sasl_mechanisms", "broker.sasl_mechanisms"),
        tls=TLSSettings(**tls_table),
        hostname=_text(table, "hostname", "broker.hostname"),
        idle_timeout_s=seconds(idle, "broker.idle_timeout_s"),
    )


def _mode(value: Any) -> int:
    """``control.mode``: an octal string (``"0660"``) or a TOML octal integer (``0o660``).

    A decimal ``660`` is refused rather than read as 0o1224, which would not be a mode.
    """
    wrong = ConfigError("control.mode", f'{value!r}: an octal mode such as "0660", at most 0777')
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError as err:
            raise wrong from err
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise wrong
    if not 0 <= mode <= 0o777:
        raise wrong
    return mode


def build(data: dict[str, Any], file: str | None = None) -> Config:
    """A Config from a parsed TOML document."""
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(key, "unknown section")
    control = _known_keys(data, "control", _CONTROL_KEYS)
    metrics = _known_keys(data, "metrics", _METRICS_KEYS)
    log = _known_keys(data, "log", _LOG_KEYS)
    level = (_text(log, "level", "log.level") or "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError("log.level", f"{level!r}: one of {', '.join(LOG_LEVELS)}")
    channel_list = data.get("channel", [])
    if not isinstance(channel_list, list):
        raise ConfigError("channel", "must be a list of [[channel]] tables")
    channels = tuple(
        channel_from_table(_table(t, f"channel[{i}]"), f"channel[{i}]")
        for i, t in enumerate(channel_list)
    )
    discovery = None
    if "discovery" in data:
        discovery = DiscoverySettings.from_table(_table(data["discovery"], "discovery"))
    socket = _text(control, "socket", "control.socket")
    if socket == "":
        raise ConfigError("control.socket", "must be a path, not empty")
    listen = _text(metrics, "listen", "metrics.listen")
    if listen is not None:
        parse_listen_address(listen, "metrics.listen")
    return Config(
        upstream=_broker_from_table(_table(data.get("broker", {}), "broker")),
        channels=channels,
        control_socket=socket or DEFAULT_CONTROL_SOCKET,
        control_mode=_mode(control.get("mode", 0o600)),
        control_group=_text(control, "group", "control.group"),
        metrics=listen,
        log_level=level,
        limits=GuestLimits.from_table(_table(data.get("limits", {}), "limits")),
        policy=Policy.from_table(_table(data.get("policy", {}), "policy")),
        discovery=discovery,
        file=file,
    )


def _known_keys(data: dict[str, Any], section: str, known: set[str]) -> dict[str, Any]:
    """A small section's table, every key in it known."""
    table = _table(data.get(section, {}), section)
    for key in table:
        if key not in known:
            names = ", ".join(sorted(known))
            raise ConfigError(f"{section}.{key}", f"unknown key (known: {names})")
    return table


def with_flags(config: Config, flags: dict[str, Any]) -> Config:
    """Apply command-line flags (None = not given) over a Config."""
    changes: dict[str, Any] = {}
    up = config.upstream
    if flags.get("broker"):
        urls = [u for item in flags["broker"] for u in item.split(",") if u]
        up = replace(up, urls=tuple(BrokerURL.parse(u, "--broker") for u in urls))
    if flags.get("broker_user"):
        up = replace(up, user=flags["broker_user"])
    if flags.get("broker_password_file"):
        secret = _read_password_file(flags["broker_password_file"], "--broker-password-file")
        up = replace(up, password=secret)
    changes["upstream"] = up
    if flags.get("channel"):
        changes["channels"] = config.channels + tuple(parse_channel(c) for c in flags["channel"])
    if flags.get("control_socket"):
        changes["control_socket"] = flags["control_socket"]
    if flags.get("metrics"):
        parse_listen_address(flags["metrics"])  # a bad value fails here, before anything binds
        changes["metrics"] = flags["metrics"]
    if flags.get("log_level"):
        changes["log_level"] = flags["log_level"]
    discovery = config.discovery
    if flags.get("discovery") or flags.get("watch"):
        discovery = discovery or DiscoverySettings()
        if flags.get("discovery"):
            discovery = discovery.with_sources(flags["discovery"])
        if flags.get("watch"):
            discovery = replace(discovery, watch_globs=tuple(flags["watch"]))
    elif discovery is None and not (config.channels or flags.get("channel")):
        discovery = DiscoverySettings()  # no channels named: find them
    changes["discovery"] = discovery
    return replace(config, **changes)


def load(flags: dict[str, Any]) -> Config:
    """The configuration from ``--config FILE`` (if given) and the other flags."""
    file = flags.get("config")
    data = load_file(file) if file else {}
    return with_flags(build(data, file), flags)
