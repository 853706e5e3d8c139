"""Which uevents are KVM VM lifecycle events, and where uevents are read from."""

from __future__ import annotations

from pathlib import Path

from connector.discovery.kvm import default_udev_source, event_from_properties

# As pyudev reports them for a kernel-source monitor on these machines (docs/discovery.md).
CREATE = {
    "ACTION": "change",
    "DEVPATH": "/devices/virtual/misc/kvm",
    "SUBSYSTEM": "misc",
    "DEVNAME": "/dev/kvm",
    "EVENT": "create",
    "PID": "5562",
    "STATS_PATH": "/kvm/5562-5",
    "CREATED": "2",
    "COUNT": "1",
}


def test_create_and_destroy() -> None:
    event = event_from_properties("change", CREATE)
    assert event is not None and (event.kind, event.pid) == ("create", 5562)
    destroy = event_from_properties("change", {**CREATE, "EVENT": "destroy", "COUNT": "0"})
    assert destroy is not None and destroy.kind == "destroy"
    raw_name = event_from_properties("change", {**CREATE, "DEVNAME": "kvm"})
    assert raw_name is not None  # the kernel's own spelling, without /dev


def test_other_uevents_are_not_vm_events() -> None:
    assert event_from_properties("add", CREATE) is None
    assert event_from_properties("change", {**CREATE, "SUBSYSTEM": "net"}) is None
    other_misc = {**CREATE, "DEVNAME": "/dev/fuse", "DEVPATH": "/devices/virtual/misc/fuse"}
    assert event_from_properties("change", other_misc) is None
    assert event_from_properties("change", {**CREATE, "EVENT": "other"}) is None
    assert event_from_properties("change", {**CREATE, "PID": ""}) is None


def test_udev_source_follows_udevd(tmp_path: Path) -> None:
    control = tmp_path / "control"
    assert default_udev_source(str(control)) == "kernel"
    control.touch()
    assert default_udev_source(str(control)) == "udev"
