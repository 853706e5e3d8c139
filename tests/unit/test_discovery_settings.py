"""The ``[discovery]`` table: defaults, conversions, and errors that name the key."""

from __future__ import annotations

from typing import Any

import pytest

from connector.discovery.settings import DiscoverySettings
from connector.errors import ConfigError


def test_defaults_fit_a_stock_libvirt_host() -> None:
    settings = DiscoverySettings.from_table({})
    assert settings == DiscoverySettings()
    assert settings.sources == {"kvm", "watch"}
    assert settings.port_patterns == ("org.qpid.amqp.*",)
    assert settings.qemu_executables == ("qemu-system-*", "qemu-kvm")
    assert settings.qemu_users == ("root", "libvirt-qemu", "qemu")
    assert "/var/lib/libvirt/qemu/channel/target/*/org.qpid.amqp.*" in settings.watch_globs
    assert settings.libvirt_status_dir == "/run/libvirt/qemu"
    assert settings.proc_root == "/proc"
    assert settings.qemu_default_config == "/etc/qemu/qemu.conf"  # Debian's and Fedora's qemu


def test_values_are_converted() -> None:
    settings = DiscoverySettings.from_table(
        {
            "sources": ["watch"],
            "watch_globs": ["/srv/vms/*/amqp.sock"],
            "port_patterns": ["org.example.*"],
            "qemu_executables": ["qemu-system-x86_64", "python3*"],
            "qemu_users": ["libvirt-qemu", "107"],
            "libvirt_retry_seconds": 2,
            "libvirt_status_dir": "/tmp/status",
            "watch_libvirt_status": False,
            "udev_source": "kernel",
            "qemu_default_config": "/usr/local/etc/qemu/qemu.conf",
        }
    )
    assert settings.sources == {"watch"}
    assert settings.watch_globs == ("/srv/vms/*/amqp.sock",)
    assert settings.qemu_executables == ("qemu-system-x86_64", "python3*")
    assert settings.qemu_users == ("libvirt-qemu", "107")
    assert settings.libvirt_retry_seconds == 2.0
    assert settings.watch_libvirt_status is False
    assert settings.qemu_default_config == "/usr/local/etc/qemu/qemu.conf"
    hash(settings)  # frozen all the way down: lists became tuples


def test_with_sources_from_the_flag() -> None:
    assert DiscoverySettings().with_sources("kvm").sources == {"kvm"}
    assert DiscoverySettings().with_sources("kvm, watch").sources == {"kvm", "watch"}
    with pytest.raises(ConfigError) as info:
        DiscoverySettings().with_sources("kvm,dbus")
    assert info.value.where == "--discovery"


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"watch": ["/x/*"]}, "discovery.watch"),
        ({"sources": ["kvm", "libvirt"]}, "discovery.sources"),
        ({"sources": "kvm"}, "discovery.sources"),
        ({"watch_globs": ["relative/*"]}, "discovery.watch_globs"),
        ({"port_patterns": [""]}, "discovery.port_patterns"),
        ({"qemu_executables": [1]}, "discovery.qemu_executables"),
        ({"libvirt_retry_seconds": -1}, "discovery.libvirt_retry_seconds"),
        ({"libvirt_retry_seconds": True}, "discovery.libvirt_retry_seconds"),
        ({"libvirt_retry_seconds": float("inf")}, "discovery.libvirt_retry_seconds"),
        ({"libvirt_retry_interval": 0}, "discovery.libvirt_retry_interval"),  # a spinning timer
        ({"libvirt_retry_interval": 0.001}, "discovery.libvirt_retry_interval"),
        ({"libvirt_retry_interval": float("nan")}, "discovery.libvirt_retry_interval"),
        ({"port_patterns": []}, "discovery.port_patterns"),  # nothing would ever match
        ({"qemu_executables": []}, "discovery.qemu_executables"),  # no process trusted
        ({"qemu_users": []}, "discovery.qemu_users"),
        ({"qemu_users": "root"}, "discovery.qemu_users"),
        ({"proc_root": "proc"}, "discovery.proc_root"),
        ({"qemu_default_config": "qemu.conf"}, "discovery.qemu_default_config"),
        ({"watch_libvirt_status": "yes"}, "discovery.watch_libvirt_status"),
        ({"udev_source": "systemd"}, "discovery.udev_source"),
    ],
)
def test_mistakes_name_the_key(table: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        DiscoverySettings.from_table(table)
    assert info.value.where == where
