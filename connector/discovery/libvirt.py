"""Read libvirt's status XML (``/run/libvirt/qemu/NAME.xml``): qemu's pid and the channels.

libvirtd keeps one such file per running domain: a ``<domstatus pid=...>`` around the live
``<domain>``, in which every channel carries the path libvirt resolved (an auto-generated
socket path, or the ``/dev/pts/N`` that qemu reported for a pty). It is the most exact
source there is, because libvirt asked qemu over QMP. Pure functions; no file access here.
"""

from __future__ import annotations

import fnmatch
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LibvirtChannel:
    """One ``<channel>`` of the live domain."""

    type: str  # "unix", "pty", ...
    target_type: str | None  # "virtio" for a virtio-serial port
    target_name: str | None  # the port name the guest sees
    path: str | None  # the unix socket or /dev/pts/N
    mode: str | None  # unix only: "bind" (qemu listens) or "connect" (qemu connects)


@dataclass(frozen=True)
class LibvirtDomain:
    """A running domain as libvirt's status file records it."""

    name: str
    uuid: str | None
    pid: int | None
    channels: tuple[LibvirtChannel, ...]


class StatusXmlError(ValueError):
    """The file is not a libvirt status XML (or was caught half-written)."""


def parse_status_xml(text: str | bytes) -> LibvirtDomain:
    """Parse a status file; also accepts a bare ``<domain>`` (then ``pid`` is ``None``)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise StatusXmlError(f"not well-formed XML: {exc}") from exc
    if root.tag == "domstatus":
        domain = root.find("domain")
        pid_text = root.get("pid")
        try:
            pid = int(pid_text) if pid_text else None
        except ValueError as exc:
            raise StatusXmlError(f"domstatus pid {pid_text!r} is not a number") from exc
    elif root.tag == "domain":
        domain, pid = root, None
    else:
        raise StatusXmlError(f"root element is <{root.tag}>, not <domstatus>")
    if domain is None:
        raise StatusXmlError("no <domain> inside <domstatus>")
    name = (domain.findtext("name") or "").strip()
    if not name:
        raise StatusXmlError("domain has no <name>")
    uuid = (domain.findtext("uuid") or "").strip().lower() or None
    channels = tuple(_channel(el) for el in domain.findall("devices/channel"))
    return LibvirtDomain(name=name, uuid=uuid, pid=pid, channels=channels)


_DOMAIN_DIR = re.compile(r"^domain-(-?\d+)-(.+)$")


def guest_from_channel_path(path: str, port_patterns: Sequence[str]) -> tuple[str, str]:
    """Guest name and port name from a libvirt channel socket path.

    ``.../target/domain-7-vm1/org.qpid.amqp.0`` (current libvirt) gives ``vm1`` and the file
    name; the older flat ``.../target/vm1.org.qpid.amqp.0`` is split where the rest matches
    a port pattern. Otherwise the parent directory names the guest. libvirt shortens long
    domain names in the directory name, so a UUID from the status file is the better key.
    """
    parent, base = os.path.split(path)
    match = _DOMAIN_DIR.match(os.path.basename(parent))
    if match:
        return match.group(2), base
    dot = base.find(".")
    while dot > 0:
        if any(fnmatch.fnmatchcase(base[dot + 1 :], p) for p in port_patterns):
            return base[:dot], base[dot + 1 :]
        dot = base.find(".", dot + 1)
    return os.path.basename(parent), base


def _channel(el: ET.Element) -> LibvirtChannel:
    source = el.find("source")
    target = el.find("target")
    path = source.get("path") if source is not None else None
    # Older libvirt records a pty's path only in the channel's ``tty`` attribute.
    path = path or el.get("tty")
    return LibvirtChannel(
        type=el.get("type", ""),
        target_type=target.get("type") if target is not None else None,
        target_name=target.get("name") if target is not None else None,
        path=path,
        mode=source.get("mode") if source is not None else None,
    )
