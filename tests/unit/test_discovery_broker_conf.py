"""The files in broker-conf/ say what the issue and the daemon need: checked, not trusted."""

from __future__ import annotations

import configparser
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

from connector import config
from connector.discovery.libvirt import parse_status_xml
from connector.discovery.settings import DiscoverySettings

CONF = Path(__file__).resolve().parents[2] / "broker-conf"


def test_example_configuration_is_valid() -> None:
    data = tomllib.loads((CONF / "connector.toml.example").read_text())
    cfg = config.build(data, "connector.toml.example")
    assert cfg.discovery == DiscoverySettings()  # the example spells out the defaults


def test_udev_rule_starts_the_unit_on_vm_create() -> None:
    rules = [
        line
        for line in (CONF / "udev" / "90-qpid-virtio-connector.rules").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules == [
        'SUBSYSTEM=="misc", KERNEL=="kvm", ACTION=="change", ENV{EVENT}=="create", '
        'TAG+="systemd", ENV{SYSTEMD_WANTS}+="qpid-virtio-connector.service"'
    ]


def test_systemd_unit_is_a_notify_sidecar_of_qpidd() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((CONF / "systemd" / "qpid-virtio-connector.service").read_text())
    assert "qpidd.service" in unit["Unit"]["After"].split()
    assert unit["Unit"]["BindsTo"] == "qpidd.service"
    service = unit["Service"]
    assert (service["Type"], service["Restart"]) == ("notify", "on-failure")
    assert service["RuntimeDirectory"] == "qpid-virtio-connector"
    assert "/run/qpid-virtio-connector" in service["ReadWritePaths"]
    assert service["ProtectProc"] == "default"  # other processes visible: qemu is found so
    assert "CAP_SYS_PTRACE" in service["CapabilityBoundingSet"]
    assert "AF_NETLINK" in service["RestrictAddressFamilies"]
    assert "char-pts" in service["DeviceAllow"]


def test_libvirt_example_channels() -> None:
    root = ET.parse(CONF / "libvirt" / "guest-with-amqp-channels.xml").getroot()
    domain = parse_status_xml(ET.tostring(root))
    served = [c for c in domain.channels if (c.target_name or "").startswith("org.qpid.amqp.")]
    assert [(c.type, c.mode) for c in served] == [("unix", "bind"), ("pty", None)]
