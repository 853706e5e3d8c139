"""How many clients a server on the daemon's loop holds at once.

The control socket and the metrics endpoint share the daemon's file descriptors with every
guest's channel and upstream socket. A client that connects and says nothing costs one
descriptor for as long as it is held, so without a cap enough idle clients leave the daemon
unable to accept a guest or answer `qpid-virtio-status`. Each server therefore holds at
most a fixed number of clients and closes any new one at once beyond it: a flood then costs
a bounded number of descriptors, and the operator reads about it in the log (now and then,
not once per refused client, which would flood the journal instead).
"""

from __future__ import annotations

import logging
import time

# A flood of refused clients is logged at most this often, with how many were refused.
WARN_INTERVAL_S = 60.0


class ConnectionCap:
    """Counts a server's open clients and refuses one more once ``limit`` are open.

    ``admit()`` when a client is accepted (close it at once when it says False), and
    ``release()`` when an admitted client's connection ends.
    """

    def __init__(self, limit: int, what: str, log: logging.Logger) -> None:
        self.limit = limit
        self.what = what
        self.log = log
        self.open = 0
        self._refused = 0  # since the last warning
        self._warned_at: float | None = None

    def admit(self) -> bool:
        """Count one more open client, or say False (and warn now and then) when full."""
        if self.open < self.limit:
            self.open += 1
            return True
        self._refused += 1
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= WARN_INTERVAL_S:
            self.log.warning(
                "%s: at its limit of %d open clients; closed %d new one(s) at once",
                self.what,
                self.limit,
                self._refused,
            )
            self._warned_at = now
            self._refused = 0
        return False

    def release(self) -> None:
        """An admitted client's connection ended: its place is free."""
        self.open -= 1
