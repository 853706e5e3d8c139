"""qpid-virtio-connector: route guests' AMQP 1.0 connections from virtio-serial ports to a broker.

The folders read like the architecture: ``discovery`` finds channels, ``channels`` turns a
qemu chardev endpoint into a byte stream, ``routing`` pairs a guest's proton connection with
an upstream one, ``control`` answers ``qpid-virtio-status``, and ``loop`` is the one place
that owns file descriptors and timers.
"""

__version__ = "0.1.0"
