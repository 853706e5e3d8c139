"""The host side of a virtio-serial port as a byte stream.

``framing`` finds where a guest's AMQP connection starts in that stream; ``unix``,
``unix_listen`` and ``pty`` each turn one kind of qemu chardev endpoint into a non-blocking
file descriptor. They share the small :class:`~connector.channels.endpoint.Endpoint` API.
"""
