"""Find, open and clean a virtio-serial port from inside a guest.

Two facts of virtio-serial shape this module (measured with qemu 7.2 and a Debian 6.1 guest):

* A guest without udev has no ``/dev/virtio-ports/NAME`` link; the name is only in
  ``/sys/class/virtio-ports/vportNpM/name``, and the device node is ``/dev/vportNpM``.
* qemu hands the next opener whatever the host wrote while the port was closed (for
  example the tail of the previous AMQP connection). An AMQP client speaks first, so any
  byte that arrives before it has sent its protocol header is stale: :func:`drain` throws
  those bytes away before the header goes out.

stdlib only: this subpackage is copied into guests that have nothing but Python and proton.
"""

from __future__ import annotations

import errno
import os
import select
import time

DEV_ROOT = "/dev/virtio-ports"
SYS_ROOT = "/sys/class/virtio-ports"
DEV_DIR = "/dev"

# Stale bytes arrive asynchronously after open (qemu flushes its buffer when it learns the
# guest opened the port), so draining waits until the port has been quiet this long. Under
# TCG the flush was seen within tens of milliseconds; 0.1 s leaves a margin.
DRAIN_QUIET = 0.1
# A host that keeps writing must not stall the opener forever; stop draining after this.
DRAIN_LIMIT = 2.0
# Read size while draining: large reads keep the drain loop short.
READ_SIZE = 65536


class PortNotFound(FileNotFoundError):
    """No virtio-serial port with this name exists in the guest."""

    def __init__(self, name: str, looked_in: list[str]) -> None:
        super().__init__(
            errno.ENOENT, f"no virtio-serial port named {name!r}", ", ".join(looked_in)
        )
        self.name = name
        self.looked_in = looked_in


def find_port(
    name: str, *, dev_root: str = DEV_ROOT, sys_root: str = SYS_ROOT, dev_dir: str = DEV_DIR
) -> str:
    """Return the device path of the port called ``name``.

    The udev link is preferred because it is what the rest of the system uses; the sysfs
    scan covers minimal guests (initramfs, containers) where udev never ran.
    """
    link = os.path.join(dev_root, name)
    if os.path.exists(link):
        return link
    try:
        entries = sorted(os.listdir(sys_root))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(sys_root, entry, "name")) as f:
                found = f.read().strip()
        except OSError:
            continue
        if found == name:
            return os.path.join(dev_dir, entry)
    raise PortNotFound(name, [dev_root, sys_root])


def open_port(port: str, **roots: str) -> int:
    """Open a port given by name (``org.qpid.amqp.0``) or by path (anything with a ``/``).

    Non-blocking so one loop can serve it with ``poll``; ``O_NOCTTY`` so that a pty used
    in its place (tests) never becomes the controlling terminal.
    """
    return os.open(port_path(port, **roots), os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)


def port_path(port: str, **roots: str) -> str:
    """The device path of a port given by name or by path (anything with a ``/``); raise
    :class:`FileNotFoundError` (:class:`PortNotFound` for a name) if there is none."""
    if "/" not in port:
        return find_port(port, **roots)
    if not os.path.exists(port):
        raise FileNotFoundError(errno.ENOENT, "no such port", port)
    return port


def read_some(fd: int, size: int = READ_SIZE) -> bytes | None:
    """One non-blocking read. ``b""`` means end of stream, ``None`` means nothing yet.

    A pty master reads ``EIO`` once its slave is closed; that is the pty's end of stream.
    """
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno == errno.EIO:
            return b""
        raise


def drain(fd: int, quiet: float = DRAIN_QUIET, limit: float = DRAIN_LIMIT) -> int:
    """Discard what the port holds until it has been quiet for ``quiet`` seconds.

    Returns the number of bytes thrown away. Call it after opening and before writing the
    AMQP protocol header: nothing the host sends before it has seen our header can belong
    to our connection. End of stream (host side not connected) counts as quiet.
    """
    discarded = 0
    end = time.monotonic() + limit
    while True:
        wait = min(quiet, end - time.monotonic())
        if wait <= 0:
            return discarded
        if not wait_fd(fd, select.POLLIN, wait):
            return discarded
        data = read_some(fd)
        if not data:
            return discarded
        discarded += len(data)


def wait_fd(fd: int | None, events: int, timeout: float | None) -> int:
    """Wait until ``fd`` shows one of ``events`` (``select.POLLIN``, ``POLLOUT``), a hang-up
    or an error, or ``timeout`` seconds pass (``None``: no limit); return the events seen,
    0 on timeout. Without an ``fd`` or ``events`` it only sleeps.

    ``poll``, not ``select``: select refuses fd numbers of 1024 and over (FD_SETSIZE), which
    a process with many files open gets. Unlike select, poll reports ``POLLHUP`` whatever
    was asked for, so a caller must act on it (read the end of stream, or give the channel
    up) rather than wait again at once.
    """
    poller = select.poll()
    if fd is not None and events:
        poller.register(fd, events)
    for _, revents in poller.poll(None if timeout is None else timeout * 1000):
        if revents & select.POLLNVAL:  # as select would fail on it
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return revents
    return 0


def host_connected(fd: int) -> bool:
    """Whether the host side of the port is there now.

    The guest's virtio_console driver reports ``POLLHUP`` while the host side (qemu's
    chardev peer: the connector) is absent. A pty host side never shows this.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLOUT)
    events = poller.poll(0)
    return not any(mask & select.POLLHUP for _, mask in events)
