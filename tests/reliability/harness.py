"""Fault injection with counts that must add up.

Several guests, each on its own channel of one daemon, send numbered durable messages
at-least-once to their own queue on the broker and receive them back through the connector,
while a test breaks something (the broker, the daemon, a channel). Each guest keeps a
``Ledger``: every message it saw accepted must in the end have been received through the
connector or still be on the broker (a direct drain after the run); none may be lost.
Messages received more than once are counted as duplicates, which at-least-once allows.

A guest reconnects after any failure, as a real guest's client would: it drains what the
channel holds (stale bytes from the connection that died), and on a socket channel whose
peer went away it waits for the daemon to connect again.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proton import Message, Timeout

from connector.guest.client import GuestClient, GuestClientError
from connector.guest.port import drain
from tests.support.connector import Qemu

# Messages per send batch and credit per receive: small enough that a fault lands between
# many batches, large enough that a run of a few hundred messages takes a second or two.
BATCH = 20
# Each blocking call of a guest; a fault makes some calls wait for this long at most.
CALL_TIMEOUT = 10.0
# Pause between reconnect attempts while the broker or the daemon is down.
RETRY_PAUSE = 0.2
# How long the daemon may take to reconnect to a unix channel (qemu server=on).
RECONNECT_TIMEOUT = 2.0
# How long a raw guest waits for the daemon's answer to what it wrote.
ANSWER_TIMEOUT = 10.0
# A direct drain from the broker stops after this long without a message.
DRAIN_QUIET = 0.5


class ChannelEnd(Qemu):
    """qemu's end of a channel that can be picked up again after the daemon reconnects."""

    def peer_gone(self) -> bool:
        """On a socket channel, whether the daemon's end has closed (EOF is pending)."""
        conn = self._conn
        if conn is None:
            return self.kind != "pty"
        try:
            return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def reopen(self, timeout: float = RECONNECT_TIMEOUT) -> int:
        """Drop a dead socket connection and take the daemon's next one."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        return self.fd(timeout)


@dataclass
class Ledger:
    """What one guest sent, saw accepted and received, by message number."""

    guest: str
    queue: str
    total: int
    sent: int = 0  # transfers attempted, resends included
    accepted: set[int] = field(default_factory=set)
    received: collections.Counter[int] = field(default_factory=collections.Counter)
    on_broker: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    connections: int = 0

    @property
    def lost(self) -> list[int]:
        """Accepted, yet neither received nor left on the broker."""
        return sorted(self.accepted - set(self.received) - set(self.on_broker))

    @property
    def duplicated(self) -> int:
        """Deliveries beyond the first of each message."""
        both = self.received + self.on_broker
        return sum(n - 1 for n in both.values() if n > 1)

    @property
    def done(self) -> bool:
        """Every message accepted and received at least once."""
        return len(self.accepted) == self.total and self.accepted <= set(self.received)


class Guest:
    """One guest's at-least-once loop over its channel; runs in a thread or step by step."""

    def __init__(self, end: ChannelEnd, queue: str, total: int, progress: threading.Condition):
        self.end = end
        self.ledger = Ledger(end.guest, queue, total)
        self._progress = progress
        self._client: GuestClient | None = None
        self._next = 0
        self._resend: list[int] = []

    # -- steps ---------------------------------------------------------------------------

    def connect(self) -> GuestClient:
        """A fresh connection: drain stale bytes, take a new socket if the old one died."""
        fd = self.end.reopen() if self.end.peer_gone() else self.end.fd()
        drain(fd, quiet=0.05, limit=1.0)
        self._client = GuestClient(fd, container_id=self.end.guest, timeout=CALL_TIMEOUT)
        self.ledger.connections += 1
        return self._client

    def send_batch(self) -> None:
        """Send the next numbers (and any that were not accepted before), durable."""
        client = self._client or self.connect()
        batch = self._resend[:BATCH]
        while len(batch) < BATCH and self._next < self.ledger.total:
            batch.append(self._next)
            self._next += 1
        if not batch:
            return
        self._resend = [n for n in self._resend if n not in batch]
        self.ledger.sent += len(batch)
        try:
            outcomes = client.send(
                self.ledger.queue, [Message(body=n, durable=True) for n in batch]
            )
        except BaseException:
            self._resend = batch + self._resend
            raise
        with self._progress:
            for n, outcome in zip(batch, outcomes, strict=True):
                if outcome.state == "accepted":
                    self.ledger.accepted.add(n)
                else:
                    self._resend.append(n)
            self._progress.notify_all()

    def receive_batch(self) -> int:
        """Take what the queue has now (drain), accepting each; returns how many."""
        client = self._client or self.connect()
        got = client.receive(self.ledger.queue, BATCH, drain=True)
        with self._progress:
            for msg in got:
                self.ledger.received[msg.body] += 1
            self._progress.notify_all()
        return len(got)

    def fail(self, err: BaseException) -> None:
        """Note a failure and drop the connection; the next step reconnects."""
        name = getattr(err, "name", None) or type(err).__name__
        self.ledger.errors[str(name)] += 1
        self.close()

    def close(self) -> None:
        """End the connection quietly (it may already be dead)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(GuestClientError, OSError):
                client.close(timeout=1.0)

    # -- the loop ------------------------------------------------------------------------

    def run(self, deadline: float, stop: threading.Event) -> None:
        """Send and receive until every message is through, the deadline, or ``stop``."""
        while not self.ledger.done and time.monotonic() < deadline and not stop.is_set():
            try:
                sending = self._next < self.ledger.total or self._resend
                if sending:
                    self.send_batch()
                if not self.receive_batch() and not sending:
                    stop.wait(0.05)  # nothing arrived and nothing to send: do not spin
            except (GuestClientError, OSError) as err:
                self.fail(err)
                stop.wait(RETRY_PAUSE)
        self.close()


class Fleet:
    """Guests on their own threads, with a condition to wait for their progress on."""

    def __init__(self, ends: Iterable[ChannelEnd], total: int, queue_prefix: str) -> None:
        self.progress = threading.Condition()
        self.guests = [Guest(e, f"{queue_prefix}-{e.guest}", total, self.progress) for e in ends]
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, timeout: float) -> Fleet:
        deadline = time.monotonic() + timeout
        for g in self.guests:
            t = threading.Thread(target=g.run, args=(deadline, self.stop), name=g.end.guest)
            t.start()
            self._threads.append(t)
        return self

    def wait_accepted(self, fraction: float, timeout: float) -> None:
        """Block until every guest has had ``fraction`` of its messages accepted."""

        def reached() -> bool:
            return all(len(g.ledger.accepted) >= fraction * g.ledger.total for g in self.guests)

        with self.progress:
            if not self.progress.wait_for(reached, timeout):
                raise AssertionError(f"guests did not reach {fraction:.0%}: {self.summary()}")

    def join(self, timeout: float) -> None:
        """Wait for the guests to finish; stop them at the timeout."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.stop.set()
        for t in self._threads:
            t.join(CALL_TIMEOUT + 5)

    def summary(self) -> dict[str, Any]:
        return totals([g.ledger for g in self.guests])


def drain_broker(broker: Any, ledgers: Iterable[Ledger]) -> None:
    """Take whatever is left on each guest's queue straight from the broker."""
    with broker.connection() as conn:
        for ledger in ledgers:
            rcv = conn.create_receiver(ledger.queue, credit=BATCH)
            while True:
                try:
                    msg = rcv.receive(timeout=DRAIN_QUIET)
                except Timeout:
                    break
                rcv.accept()
                ledger.on_broker[msg.body] += 1
            rcv.close()


def totals(ledgers: Iterable[Ledger]) -> dict[str, Any]:
    """The counts the report shows, summed over guests."""
    ledgers = list(ledgers)
    return {
        "sent": sum(lg.sent for lg in ledgers),
        "accepted": sum(len(lg.accepted) for lg in ledgers),
        "received": sum(sum(lg.received.values()) + sum(lg.on_broker.values()) for lg in ledgers),
        "lost": sum(len(lg.lost) for lg in ledgers),
        "duplicated": sum(lg.duplicated for lg in ledgers),
        "left_on_broker": sum(sum(lg.on_broker.values()) for lg in ledgers),
        "connections": sum(lg.connections for lg in ledgers),
        "errors": dict(sum((lg.errors for lg in ledgers), collections.Counter())),
    }


def check(ledgers: Iterable[Ledger]) -> dict[str, Any]:
    """Assert that the counts add up; return them for the report."""
    ledgers = list(ledgers)
    for lg in ledgers:
        assert not lg.lost, f"{lg.guest}: accepted but lost: {lg.lost[:20]} ({len(lg.lost)})"
        stray = set(lg.received) | set(lg.on_broker)
        assert stray <= set(range(lg.total)), f"{lg.guest}: unknown messages {stray}"
    return totals(ledgers)


def read_until(fd: int, needle: bytes, timeout: float = ANSWER_TIMEOUT) -> bytes:
    """What the daemon wrote to a raw guest, up to ``needle`` or the timeout."""
    got = b""
    end = time.monotonic() + timeout
    while needle not in got:
        left = end - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            got += chunk
    return got


def send_one_retrying(fd: int, queue: str, *, every: float, patience: float) -> tuple[int, float]:
    """A new guest client that retries like a real one until one message is accepted:
    drain stale bytes, connect with a short timeout, try again. Returns (attempts, seconds);
    raises the last error after ``patience`` seconds."""
    start = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        drain(fd, quiet=0.05)
        try:
            with GuestClient(fd, container_id="retrying", timeout=every) as guest:
                if guest.send(queue, ["after"])[0].state == "accepted":
                    return attempts, time.monotonic() - start
        except GuestClientError:
            if time.monotonic() - start > patience:
                raise


def channel_ends(kinds: Iterable[str], workdir: Path, prefix: str) -> list[ChannelEnd]:
    """One channel end per kind, named ``prefix-KIND-i``."""
    return [ChannelEnd(kind, workdir, f"{prefix}-{kind}-{i}") for i, kind in enumerate(kinds)]
