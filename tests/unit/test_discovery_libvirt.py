"""libvirt status XML and libvirt's channel socket paths."""

from __future__ import annotations

import pytest

from connector.discovery.libvirt import (
    LibvirtChannel,
    StatusXmlError,
    guest_from_channel_path,
    parse_status_xml,
)

# The shape libvirtd writes to /run/libvirt/qemu/NAME.xml (abridged: qemuCaps and most
# devices dropped). Note the second <devices> directly under <domstatus>: it lists aliases
# only and must not be mistaken for the domain's devices.
TARGET = "/var/lib/libvirt/qemu/channel/target/domain-7-db1"
STATUS_XML = """\
<domstatus state='running' reason='booted' pid='4242'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-7-db1/monitor.sock' type='unix'/>
  <qemuCaps>
    <flag name='kvm'/>
  </qemuCaps>
  <devices>
    <device alias='channel0'/>
    <device alias='channel1'/>
  </devices>
  <libDir path='/var/lib/libvirt/qemu/domain-7-db1'/>
  <channelTargetDir path='/var/lib/libvirt/qemu/channel/target/domain-7-db1'/>
  <domain type='kvm' id='7'>
    <name>db1</name>
    <uuid>C7A5FDBD-EDAF-9455-926A-D65C16DB1809</uuid>
    <devices>
      <emulator>/usr/bin/qemu-system-x86_64</emulator>
      <serial type='pty'>
        <source path='/dev/pts/3'/>
        <target type='isa-serial' port='0'/>
        <alias name='serial0'/>
      </serial>
      <channel type='unix'>
        <source mode='bind' path='{T}/org.qpid.amqp.0'/>
        <target type='virtio' name='org.qpid.amqp.0' state='disconnected'/>
        <alias name='channel0'/>
        <address type='virtio-serial' controller='0' bus='0' port='1'/>
      </channel>
      <channel type='pty'>
        <source path='/dev/pts/4'/>
        <target type='virtio' name='org.qpid.amqp.1' state='connected'/>
        <alias name='channel1'/>
        <address type='virtio-serial' controller='0' bus='0' port='2'/>
      </channel>
      <channel type='pty' tty='/dev/pts/5'>
        <target type='virtio' name='org.qpid.amqp.2'/>
        <alias name='channel2'/>
      </channel>
      <channel type='unix'>
        <source mode='connect' path='/run/qpid-virtio/db1.sock'/>
        <target type='virtio' name='org.qpid.amqp.3'/>
      </channel>
      <channel type='unix'>
        <source mode='bind' path='{T}/org.qemu.guest_agent.0'/>
        <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      </channel>
      <channel type='spicevmc'>
        <target type='virtio' name='com.redhat.spice.0'/>
      </channel>
      <channel type='unix'>
        <source mode='bind' path='/var/lib/libvirt/qemu/guestfwd.sock'/>
        <target type='guestfwd' address='10.0.2.1' port='4600'/>
      </channel>
    </devices>
  </domain>
</domstatus>
""".replace("{T}", TARGET)


def test_status_xml() -> None:
    domain = parse_status_xml(STATUS_XML)
    assert domain.name == "db1"
    assert domain.uuid == "c7a5fdbd-edaf-9455-926a-d65c16db1809"
    assert domain.pid == 4242
    target = TARGET + "/"
    assert domain.channels == (
        LibvirtChannel("unix", "virtio", "org.qpid.amqp.0", target + "org.qpid.amqp.0", "bind"),
        LibvirtChannel("pty", "virtio", "org.qpid.amqp.1", "/dev/pts/4", None),
        LibvirtChannel("pty", "virtio", "org.qpid.amqp.2", "/dev/pts/5", None),
        LibvirtChannel("unix", "virtio", "org.qpid.amqp.3", "/run/qpid-virtio/db1.sock", "connect"),
        LibvirtChannel(
            "unix", "virtio", "org.qemu.guest_agent.0", target + "org.qemu.guest_agent.0", "bind"
        ),
        LibvirtChannel("spicevmc", "virtio", "com.redhat.spice.0", None, None),
        LibvirtChannel("unix", "guestfwd", None, "/var/lib/libvirt/qemu/guestfwd.sock", "bind"),
    )


def test_bare_domain_xml_has_no_pid() -> None:
    domain = parse_status_xml("<domain type='kvm'><name>x</name></domain>")
    assert (domain.name, domain.uuid, domain.pid, domain.channels) == ("x", None, None, ())


@pytest.mark.parametrize(
    "text",
    [
        "<domstatus pid='1'><domain type='kvm'><name>half",  # caught mid-write
        "<domstatus pid='1'/>",
        "<domstatus pid='x'><domain><name>a</name></domain></domstatus>",
        "<domstatus pid='1'><domain><name> </name></domain></domstatus>",
        "<network><name>default</name></network>",
    ],
)
def test_not_a_status_file(text: str) -> None:
    with pytest.raises(StatusXmlError):
        parse_status_xml(text)


PATTERNS = ["org.qpid.amqp.*"]
LV = "/var/lib/libvirt/qemu/channel/target"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (LV + "/domain-7-db1/org.qpid.amqp.0", ("db1", "org.qpid.amqp.0")),
        (LV + "/domain--1-a-b/org.qpid.amqp.1", ("a-b", "org.qpid.amqp.1")),
        (LV + "/db1.org.qpid.amqp.0", ("db1", "org.qpid.amqp.0")),
        (LV + "/my.vm.org.qpid.amqp.2", ("my.vm", "org.qpid.amqp.2")),
        ("/srv/guests/vm9/org.qpid.amqp.0", ("vm9", "org.qpid.amqp.0")),
    ],
)
def test_guest_from_channel_path(path: str, expected: tuple[str, str]) -> None:
    assert guest_from_channel_path(path, PATTERNS) == expected
