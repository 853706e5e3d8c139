"""VM lifecycle from the kernel: ``change`` uevents of ``misc/kvm`` with ``EVENT=create|destroy``.

The kernel sends one for every ``KVM_CREATE_VM`` and one when the VM's last reference goes
(normally when qemu exits), with ``PID`` set to the process that created it. pyudev reads
them from netlink: from systemd-udevd's re-broadcast when udevd runs, straight from the
kernel otherwise.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass

import pyudev

UDEV_CONTROL = "/run/udev/control"
KVM_EVENTS = frozenset({"create", "destroy"})
# Not from the kernel: what ``KvmMonitor.read`` reports when the kernel dropped uevents.
LOST = "lost"
# Room for a burst of VM starts (a host booting all its guests) between two loop turns;
# the kernel drops uevents silently when the netlink buffer is full.
RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class KvmEvent:
    """A VM created or destroyed by process ``pid``; ``received`` is ``time.monotonic()``."""

    kind: str  # "create" | "destroy" | LOST (then ``pid`` is 0)
    pid: int
    received: float


def default_udev_source(control: str = UDEV_CONTROL) -> str:
    """``udev`` when systemd-udevd runs (its control socket exists), else ``kernel``."""
    return "udev" if os.path.exists(control) else "kernel"


def event_from_properties(action: str | None, props: dict[str, str]) -> KvmEvent | None:
    """Turn one uevent's properties into a ``KvmEvent``, or ``None`` if it is not one."""
    if action != "change" or props.get("SUBSYSTEM") != "misc":
        return None
    if props.get("DEVNAME") not in ("/dev/kvm", "kvm") and not props.get("DEVPATH", "").endswith(
        "/kvm"
    ):
        return None
    kind = props.get("EVENT")
    pid_text = props.get("PID", "")
    if kind not in KVM_EVENTS or not pid_text.isdigit():
        return None
    return KvmEvent(kind=kind, pid=int(pid_text), received=time.monotonic())


class KvmMonitor:
    """A non-blocking netlink monitor for KVM's VM create/destroy uevents."""

    def __init__(self, source: str | None = None) -> None:
        self.source = source or default_udev_source()
        context = pyudev.Context()
        self._monitor = pyudev.Monitor.from_netlink(context, source=self.source)
        self._monitor.filter_by("misc")
        # Needs CAP_NET_ADMIN; without it the default buffer still holds dozens of events.
        with contextlib.suppress(OSError):
            self._monitor.set_receive_buffer_size(RECEIVE_BUFFER_BYTES)
        self._monitor.start()

    def fileno(self) -> int:
        return self._monitor.fileno()

    def read(self) -> list[KvmEvent]:
        """Every KVM event queued now (call when the descriptor is readable).

        When the buffer was full the kernel dropped uevents and flagged the socket with
        ENOBUFS; pyudev then raises on every poll without reading, and the flag stays until
        someone takes it. It is taken here and reported as one ``LOST`` event, so that the
        caller looks for what it missed and the socket is read again.
        """
        events: list[KvmEvent] = []
        while True:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError:
                if not self._take_error():
                    raise
                events.append(KvmEvent(kind=LOST, pid=0, received=time.monotonic()))
                continue
            if device is None:
                return events
            event = event_from_properties(device.action, dict(device.properties))
            if event is not None:
                events.append(event)

    def _take_error(self) -> int:
        """Read and clear the socket's pending error (SO_ERROR); 0 if there was none."""
        with socket.socket(fileno=os.dup(self.fileno())) as sock:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def close(self) -> None:
        """Close the netlink socket: libudev closes it when pyudev drops the monitor."""
        del self._monitor
