"""Helpers for the tests of ``connector.guest``: a port opener that can be opened once, and
a bridge's loop run in a thread for the length of a block or in the test's own thread
until a condition holds."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from connector.guest.bridge import Bridge

# How long a bridge's loop waits in one poll: short, so a stopped loop ends at once.
POLL_S = 0.05
# How long stopping a bridge's loop may take before the test goes on without it.
STOP_TIMEOUT_S = 5.0


class OpensOnce:
    """A port opener for ``GuestClient`` that opens the port once (``open()``) and refuses
    every later open as a host whose side has gone would: a client that reopened a port it
    opened itself would find this out. ``opens`` counts the attempts."""

    def __init__(self, open_: Callable[[], int]) -> None:
        self._open = open_
        self.opens = 0

    def __call__(self) -> int:
        self.opens += 1
        if self.opens > 1:
            raise ConnectionRefusedError("host side of p is not connected")
        return self._open()


@contextlib.contextmanager
def bridge_running(bridge: Bridge) -> Iterator[Bridge]:
    """Run ``bridge``'s loop in a thread while the block runs (for tests whose clients need
    it to serve them meanwhile); then stop the loop and close the bridge."""
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            bridge.poll(POLL_S)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield bridge
    finally:
        stop.set()
        thread.join(STOP_TIMEOUT_S)
        bridge.close()


def poll_until(bridge: Bridge, cond: Callable[[], bool], limit: float = 5.0) -> None:
    """Run ``bridge``'s loop in this thread until ``cond()`` (bounded by ``limit``
    seconds), for tests that need each step to happen in an order they choose."""
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "bridge did not get there in time"
        bridge.poll(POLL_S)
