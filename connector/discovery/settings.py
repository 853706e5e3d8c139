"""What discovery looks for and where: the ``[discovery]`` table, checked once at start-up.

Every field has a default that fits a stock libvirt host, so an operator who writes no
``[discovery]`` table gets every guest with an ``org.qpid.amqp.*`` port.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from connector.errors import ConfigError

SOURCES = frozenset({"kvm", "watch"})

DEFAULT_PORT_PATTERNS = ("org.qpid.amqp.*",)
DEFAULT_QEMU_EXECUTABLES = ("qemu-system-*", "qemu-kvm")
# Who runs the qemus whose guests are served: root, and libvirt's qemu user (Debian's
# ``libvirt-qemu``, Fedora's ``qemu``); names this host does not have are passed over. Any
# local user may run qemu, or a program named so, and give it any guest's ``-name``.
DEFAULT_QEMU_USERS = ("root", "libvirt-qemu", "qemu")
# libvirt's auto-generated channel sockets: the current per-domain directory and the
# older flat ``NAME.PORT`` form.
DEFAULT_WATCH_GLOBS = (
    "/var/lib/libvirt/qemu/channel/target/*/org.qpid.amqp.*",
    "/var/lib/libvirt/qemu/channel/target/*.org.qpid.amqp.*",
)
DEFAULT_LIBVIRT_STATUS_DIR = "/run/libvirt/qemu"
# How long to keep looking at a new qemu process for what is not there yet: libvirtd
# writes the status XML after qemu's QMP handshake (well under a second on an idle host,
# a few seconds on a busy one), and a socket seen by the watch may precede qemu's next pty.
DEFAULT_LIBVIRT_RETRY_SECONDS = 5.0
# How often to look again within that window.
DEFAULT_LIBVIRT_RETRY_INTERVAL = 0.2
# Each look re-reads the process's /proc files and libvirt's status file on the daemon's
# loop; much more often than this (0 above all) would keep the loop busy doing only that.
MIN_LIBVIRT_RETRY_INTERVAL = 0.01
DEFAULT_PROC_ROOT = "/proc"
# The config file qemu reads before its options unless given -no-user-config (libvirt always
# gives it): CONFIG_QEMU_CONFDIR/qemu.conf, /etc/qemu in Debian's and Fedora's builds.
DEFAULT_QEMU_DEFAULT_CONFIG = "/etc/qemu/qemu.conf"


@dataclass(frozen=True)
class DiscoverySettings:
    """Which sources run and what counts as a guest's AMQP channel."""

    sources: frozenset[str] = SOURCES
    watch_globs: tuple[str, ...] = DEFAULT_WATCH_GLOBS
    port_patterns: tuple[str, ...] = DEFAULT_PORT_PATTERNS
    qemu_executables: tuple[str, ...] = DEFAULT_QEMU_EXECUTABLES
    qemu_users: tuple[str, ...] = DEFAULT_QEMU_USERS  # names or numeric uids
    libvirt_status_dir: str = DEFAULT_LIBVIRT_STATUS_DIR
    libvirt_retry_seconds: float = DEFAULT_LIBVIRT_RETRY_SECONDS
    libvirt_retry_interval: float = DEFAULT_LIBVIRT_RETRY_INTERVAL
    proc_root: str = DEFAULT_PROC_ROOT
    qemu_default_config: str = DEFAULT_QEMU_DEFAULT_CONFIG
    # Also watch ``libvirt_status_dir`` for status files, so libvirt guests without KVM
    # (TCG) are found the moment libvirtd records them.
    watch_libvirt_status: bool = True
    # ``None`` picks ``udev`` when systemd-udevd runs and ``kernel`` otherwise.
    udev_source: str | None = None

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> DiscoverySettings:
        """Build settings from the TOML ``[discovery]`` table; a bad key names itself."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            where = f"discovery.{key}"
            if key not in known:
                raise ConfigError(where, f"unknown key (known: {', '.join(sorted(known))})")
            values[key] = _convert(where, key, value)
        return cls(**values)

    def with_sources(self, sources: str) -> DiscoverySettings:
        """The ``--discovery kvm,watch`` flag: replace the set of sources."""
        return dataclasses.replace(self, sources=_sources("--discovery", sources.split(",")))


def _convert(where: str, key: str, value: Any) -> Any:
    """Check one value's type and turn lists into tuples so the settings stay frozen."""
    if key == "sources":
        return _sources(where, _strings(where, value))
    if key in ("watch_globs", "port_patterns", "qemu_executables", "qemu_users"):
        items = _strings(where, value)
        if not items and key != "watch_globs":
            raise ConfigError(where, "must name at least one, or nothing is ever found")
        if key == "watch_globs":
            for glob in items:
                if not glob.startswith("/"):
                    raise ConfigError(where, f"{glob!r} is not an absolute path pattern")
        return tuple(items)
    if key == "libvirt_retry_seconds":
        return seconds(value, where)
    if key == "libvirt_retry_interval":
        interval = seconds(value, where)
        if interval < MIN_LIBVIRT_RETRY_INTERVAL:
            raise ConfigError(
                where,
                f"must be at least {MIN_LIBVIRT_RETRY_INTERVAL}s, not {value!r}: each look "
                "re-reads /proc, and a shorter interval keeps the event loop busy doing it",
            )
        return interval
    if key == "watch_libvirt_status":
        if not isinstance(value, bool):
            raise ConfigError(where, "must be true or false")
        return value
    if key == "udev_source":
        if value not in ("udev", "kernel"):
            raise ConfigError(where, "must be 'udev' or 'kernel'")
        return value
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(where, "must be an absolute path")
    return value


def seconds(value: Any, where: str) -> float:
    """A duration from TOML: a finite number, 0 or more (TOML also spells ``inf`` and
    ``nan``); ConfigError naming ``where`` otherwise. Also used by ``connector.config``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(where, f"must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(where, f"must be a number of seconds, 0 or more, not {value!r}")
    return float(value)


def _strings(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(where, "must be a list of non-empty strings")
    return list(value)


def _sources(where: str, names: list[str]) -> frozenset[str]:
    cleaned = {n.strip() for n in names if n.strip()}
    unknown = cleaned - SOURCES
    if unknown:
        raise ConfigError(where, f"unknown source {sorted(unknown)[0]!r} (known: kvm, watch)")
    return frozenset(cleaned)
