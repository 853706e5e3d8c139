"""The routing core alone: CPU per routed message with no sockets, no event loop, no broker.

    python bench/core.py [--count N] [--size BYTES] [--batches 1,10,100]

A guest and a broker made of plain proton objects drive the connector's ``Router`` in memory
through the test suite's harness (tests/support/routing.py). Only the router's own work is
timed: pushing bytes into its two engines, ``Router.process()``, and taking their output.
The peers' work is not. Messages go in batches of B per "wakeup" (what one read of the
channel would carry), so the result separates the per-message cost of the core from its
fixed per-wakeup cost:

    µs per message at batch B  ~  per-message + per-wakeup / B

Comparing it with bench/throughput.py's measured daemon CPU shows how much of the
connector's cost is the core and how much is the I/O and the event loop around it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ on the path, not the repository (tests.support lives
# at the top of the checkout).
sys.path.insert(0, str(REPO))

from proton import Delivery, Message  # noqa: E402

from connector.routing.engine import Engine  # noqa: E402
from tests.support.routing import Harness  # noqa: E402

DEFAULT_COUNT = 20_000
DEFAULT_SIZE = 1024
DEFAULT_BATCHES = (1, 10, 100)
# Repeats per batch size; the median is reported because other work shares the machine.
REPEATS = 3
# Pump rounds without progress before a batch is declared stuck (a bug, not slowness).
STUCK_ROUNDS = 50


class Timer:
    """Accumulates the CPU time of the calls made through it.

    Reading a thread's CPU clock is a system call (about 0.6 µs here, no vDSO), and a
    one-message wakeup makes a dozen timed calls: ``ns`` would count several µs per message
    of the timer's own. ``calls`` lets ``measure`` take off what an empty call costs
    (``timer_overhead_ns``)."""

    def __init__(self) -> None:
        self.ns = 0
        self.calls = 0

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.calls += 1
        t0 = time.thread_time_ns()
        try:
            return fn(*args)
        finally:
            self.ns += time.thread_time_ns() - t0


def timer_overhead_ns(samples: int = 100_000) -> float:
    """What ``Timer.call`` counts for a call that does nothing: the median of five runs."""

    def nothing() -> None:
        return None

    runs = []
    for _ in range(5):
        t = Timer()
        for _ in range(samples):
            t.call(nothing)
        runs.append(t.ns / samples)
    return statistics.median(runs)


class Rig:
    """A harness with one routed link and a broker that grants credit and accepts."""

    def __init__(self, direction: str, window: int, payload: bytes) -> None:
        self.h = Harness()  # its scripted broker answers open, begin and attach
        self.direction = direction  # "in": guest sends; "out": guest receives
        self.window = window
        self.payload = payload
        self.timer = Timer()
        self.to_send = 0  # messages the sending peer still has to send
        self.sent = 0
        self.settled = 0  # outcomes the sending peer has seen
        self.h.open_guest("bench-core")
        session = self.h.guest.connection.session()
        session.open()
        if direction == "in":
            self.guest_link = session.sender("core-in")
            self.guest_link.target.address = "q"
        else:
            self.guest_link = session.receiver("core-out")
            self.guest_link.source.address = "q"
        self.guest_link.open()
        self.h.pump()
        self.broker_link = self.h.broker.connection.link_head(0)
        (self.broker_link if direction == "in" else self.guest_link).flow(window)
        self.h.pump()

    # -- the peers (not timed) ---------------------------------------------------------------

    def _peer_event(self, ev: Any) -> None:
        name = ev.type.name
        if name == "PN_DELIVERY":
            self._on_delivery(ev.delivery, ev.link)
        elif name == "PN_LINK_FLOW" and ev.link.is_sender:
            self._send(ev.link)

    def _send(self, link: Any) -> None:
        while self.to_send and link.credit > 0:
            link.delivery(b"%x" % self.sent)
            link.send(self.payload)
            link.advance()
            self.sent += 1
            self.to_send -= 1

    def _on_delivery(self, dlv: Any, link: Any) -> None:
        if link.is_receiver:
            if dlv.readable and not dlv.partial:
                link.recv(dlv.pending)
                link.advance()
                dlv.update(Delivery.ACCEPTED)
                dlv.settle()
                if link.credit < self.window // 2:
                    link.flow(self.window - link.credit)
        elif dlv.remote_state or dlv.settled:
            dlv.settle()
            self.settled += 1

    def _peer_events(self, side: Any) -> None:
        for ev in side.collect():
            self._peer_event(ev)
        side.events.clear()

    # -- moving bytes: the router's side of each move is timed -------------------------------

    def _into_router(self, src: Any, engine: Engine) -> int:
        n = src.pending()
        if n <= 0:
            return 0
        data = src.peek(n)
        src.pop(n)
        self.timer.call(engine.push, data)
        return n

    def _out_of_router(self, engine: Engine, dst: Any) -> int:
        moved = 0
        while dst.capacity() > 0:
            out = self.timer.call(_take, engine, dst.capacity())
            if not out:
                break
            dst.push(out)
            moved += len(out)
        return moved

    def round(self) -> int:
        """One pass over both sides; returns the bytes moved."""
        h = self.h
        router = h.router
        moved = self._into_router(h.guest.transport, router.guest)
        self.timer.call(router.process)
        up = router.upstream
        moved += self._out_of_router(up, h.broker.transport)
        self._peer_events(h.broker)
        moved += self._into_router(h.broker.transport, up)
        self.timer.call(router.process)
        moved += self._out_of_router(router.guest, h.guest.transport)
        self._peer_events(h.guest)
        return moved

    def batch(self, size: int) -> None:
        """Route ``size`` messages and their outcomes completely."""
        goal = self.settled + size
        self.to_send += size
        if self.direction == "in":
            self._send(self.guest_link)
        else:
            self._send(self.broker_link)
        idle = 0
        while self.settled < goal:
            if self.round() == 0:
                idle += 1
                if idle > STUCK_ROUNDS:
                    raise RuntimeError(f"stuck at {self.settled}/{goal} settled")
            else:
                idle = 0


def _take(engine: Engine, room: int) -> bytes:
    out = bytes(engine.peek_output()[:room])
    if out:
        engine.pop_output(len(out))
    return out


def measure(direction: str, batch: int, count: int, size: int, overhead_ns: float) -> float:
    """Router CPU µs per routed message for ``count`` messages in batches of ``batch``, less
    ``overhead_ns`` per timed call (the timer's own cost)."""
    payload = Message(body=b"x" * size).encode()
    rig = Rig(direction, window=max(batch, 100), payload=payload)
    rig.batch(batch)  # warm the caches and the first-delivery paths
    rig.timer.ns = rig.timer.calls = 0
    done = 0
    while done < count:
        rig.batch(batch)
        done += batch
    return (rig.timer.ns - rig.timer.calls * overhead_ns) / done / 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--count", type=int, default=DEFAULT_COUNT)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE)
    p.add_argument(
        "--batches",
        default=",".join(map(str, DEFAULT_BATCHES)),
        help="messages per wakeup, comma separated",
    )
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    overhead = timer_overhead_ns()
    print(f"router core, {args.size} B messages, µs of router CPU per routed message")
    print(f"(less the timer's own {overhead / 1e3:.2f} µs per timed call)")
    print("| direction | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---" * (len(batches) + 1) + "|")
    for direction in ("in", "out"):
        cells = []
        for b in batches:
            n = max(b, args.count // b * b if b > 1 else args.count // 4)
            runs = [measure(direction, b, n, args.size, overhead) for _ in range(REPEATS)]
            cells.append(f"{statistics.median(runs):.1f}")
        print(f"| {direction} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
