"""Many guests at once: what each costs the connector in memory, descriptors and CPU.

    python bench/scale.py [--broker artemis|rabbitmq] [--guests 10,100,300]
                          [--messages 20] [--idle-s 10] [--out bench/scale.json]

A host runs hundreds of guests on one daemon (one event loop, no thread per channel), so
this bench measures what the single-channel throughput bench cannot: the cost of a guest
that is merely there. For each crowd size N, a fresh daemon serves N unix channels, the
bench plays qemu for all of them (it listens on each socket the daemon connects to), and
one process drives N guests on connector.guest's Driver, multiplexed with poll:

    waiting   N channels, no guest: the daemon's resident memory and descriptors;
    connect   N guests connect at once, each attaching a sender and a receiver to its own
              queue: seconds until every link is attached, direct (N TCP connections to the
              broker, the same client) and through the connector, side by side;
    traffic   every guest sends M messages to its queue at-least-once and receives them
              back, all at once: wall seconds direct and via, and the connector's CPU per
              routed message;
    idle      the N guests stay connected and quiet for --idle-s seconds: the connector's
              CPU (heartbeats and timers), as a share of one core;
    connected the traffic twice more, then memory and descriptors again, with the
              per-guest cost (connected - waiting) / N, and what the third round added:
              proton's buffers settle at the largest burst they carried by the second
              round, so growth on the third would be a leak.

Results go to stdout as a Markdown table and to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # as in throughput.py: run as a script, find the repository

from proton import Delivery, Handler  # noqa: E402

from bench.client import encode_payload  # noqa: E402
from bench.throughput import (  # noqa: E402
    BROKERS,
    broker_version,
    machine_facts,
    machine_line,
    markdown_head,
    markdown_row,
    proc_cpu,
    run_and_report,
)
from connector.daemon import raise_fd_limit  # noqa: E402
from connector.guest.driver import Driver  # noqa: E402
from tests.brokers import Broker  # noqa: E402
from tests.support import connector as support  # noqa: E402

DEFAULT_GUESTS = (10, 100, 300)
DEFAULT_MESSAGES = 20
DEFAULT_IDLE_S = 10.0
SIZE = 1024
# How long a phase may take before the bench gives up: a stuck run must fail, not hang.
PHASE_TIMEOUT = 180.0
# Longest single poll, so that every driver's timers and heartbeats run on time.
POLL_SLICE = 0.2


class BenchError(RuntimeError):
    """A guest was refused something, or a phase did not finish."""


class Member(Handler):
    """One guest of the crowd: a sender and a receiver on its own queue.

    ``go`` starts its traffic: ``messages`` sent at-least-once, the same number received
    and accepted.
    """

    def __init__(self, address: str, messages: int, payload: bytes) -> None:
        super().__init__()
        self.address = address
        self.messages = messages
        self.payload = payload
        self.links: list[Any] = []
        self.attached = 0
        self.sent = 0
        self.accepted = 0
        self.received = 0
        self.going = False
        self.error: str | None = None

    def on_start(self, event: Any) -> None:
        driver = event.container
        conn = driver.connect()
        self.links = [
            driver.create_sender(conn, self.address),
            driver.create_receiver(conn, self.address),
        ]

    def on_link_remote_open(self, _event: Any) -> None:
        self.attached += 1

    def on_link_remote_close(self, event: Any) -> None:
        cond = event.link.remote_condition
        if cond is not None:
            self.error = f"link closed: {cond.name}: {cond.description}"

    def on_connection_remote_close(self, event: Any) -> None:
        cond = event.connection.remote_condition
        if cond is not None:
            self.error = f"connection closed: {cond.name}: {cond.description}"

    def on_transport_error(self, event: Any) -> None:
        cond = event.transport.condition
        self.error = f"transport error: {cond.name if cond else '?'}"

    def go(self) -> None:
        """Start a round of traffic (again, for a second round)."""
        self.going = True
        self.sent = self.accepted = self.received = 0
        sender, receiver = self.links
        receiver.flow(self.messages)
        self._send(sender)

    def on_link_flow(self, event: Any) -> None:
        if self.going and event.link.is_sender:
            self._send(event.link)

    def _send(self, sender: Any) -> None:
        while self.sent < self.messages and sender.credit > 0:
            sender.delivery(b"%x" % self.sent)
            sender.send(self.payload)
            sender.advance()
            self.sent += 1

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        if event.link.is_receiver:
            if not dlv.readable or dlv.partial:
                return
            event.link.recv(dlv.pending)
            event.link.advance()
            dlv.update(Delivery.ACCEPTED)
            dlv.settle()
            self.received += 1
        elif dlv.remote_state or dlv.settled:
            if dlv.remote_state != Delivery.ACCEPTED:
                self.error = f"message not accepted: {dlv.remote_state}"
            dlv.settle()
            self.accepted += 1

    @property
    def done(self) -> bool:
        return self.accepted == self.messages and self.received == self.messages


class Crowd:
    """N drivers in one process, multiplexed with poll, as N guests would be on N hosts."""

    def __init__(self, fds: list[int], members: list[Member], sasl: str | None) -> None:
        self.members = members
        self.by_fd = {
            fd: Driver(m, fd, container_id=f"scale-{i}", reconnect=False, sasl_mechanisms=sasl)
            for i, (fd, m) in enumerate(zip(fds, members, strict=True))
        }

    @property
    def drivers(self) -> list[Driver]:
        return list(self.by_fd.values())

    def run_until(self, done: Callable[[], bool], what: str) -> float:
        """Drive every guest until ``done()``; returns the wall seconds it took."""
        began = time.monotonic()
        deadline = began + PHASE_TIMEOUT
        poller = select.poll()
        for fd in self.by_fd:
            poller.register(fd, select.POLLIN)
        for driver in self.drivers:  # timers, ticks and anything already buffered
            driver.process(0)
        last_sweep = time.monotonic()
        while not done():
            errors = [m.error for m in self.members if m.error]
            if errors:
                raise BenchError(f"{what}: {len(errors)} guest(s) failed, first: {errors[0]}")
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"{what}: not finished in {PHASE_TIMEOUT:g}s")
            for fd, driver in self.by_fd.items():
                t = driver.transport
                want = select.POLLIN | (select.POLLOUT if t and t.pending() > 0 else 0)
                poller.modify(fd, want)
            for fd, _ in poller.poll(POLL_SLICE * 1000):
                self.by_fd[fd].process(0)
            if now - last_sweep > POLL_SLICE:  # heartbeats and timers of quiet guests
                for driver in self.drivers:
                    driver.process(0)
                last_sweep = now
        return time.monotonic() - began

    def connect(self) -> float:
        """Seconds until every guest has both links attached."""
        return self.run_until(lambda: all(m.attached == 2 for m in self.members), "connect")

    def traffic(self) -> float:
        """Seconds until every guest has sent, and received back, its messages."""
        for m in self.members:
            m.go()
        return self.run_until(lambda: all(m.done for m in self.members), "traffic")

    def close(self) -> None:
        """Close every guest's connection and wait for the close exchange."""
        for driver in self.drivers:
            if driver.connection is not None:
                driver.connection.close()
        self.run_until(
            lambda: all(d.transport is None or d.transport.closed for d in self.drivers), "close"
        )

    def idle(self, seconds: float) -> None:
        """Keep every guest connected and quiet (heartbeats only) for ``seconds``."""
        end = time.monotonic() + seconds
        self.run_until(lambda: time.monotonic() >= end, "idle")


# ---- one crowd size ------------------------------------------------------------------------


def daemon_memory(pid: int) -> tuple[float, int]:
    """(resident MB, open descriptors) of the daemon now."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def direct_fds(broker: Broker, n: int) -> Iterator[list[int]]:
    """N TCP connections to the broker, as the same client would open them directly."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.create_connection((broker.host, broker.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            socks.append(sock)
        yield [s.fileno() for s in socks]
    finally:
        for sock in socks:
            sock.close()


def one_size(
    kind_name: str, broker: Broker, work: Path, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    kind = BROKERS[kind_name]
    row: dict[str, Any] = {"guests": n}
    payload = encode_payload(SIZE)

    def crowd(fds: list[int], sasl: str | None, path: str) -> Crowd:
        queues = [kind.address(f"scale.{os.getpid()}.{n}.{path}.{i}") for i in range(n)]
        return Crowd(fds, [Member(q, args.messages, payload) for q in queues], sasl)

    # Direct first: the same client, N TCP connections to the broker.
    with direct_fds(broker, n) as fds:
        direct = crowd(fds, "ANONYMOUS", "direct")
        row["direct_connect_s"] = direct.connect()
        row["direct_traffic_s"] = direct.traffic()
        direct.close()

    channels = [support.Qemu("unix", work, f"scale-{n}-{i}") for i in range(n)]
    daemon = support.Connector(work, broker, channels, "--log-level", "warning", watched=False)
    daemon.start()
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        fds = [q.fd(PHASE_TIMEOUT) for q in channels]
        for fd in fds:
            os.set_blocking(fd, False)
        support.wait_for(
            lambda: (
                [c["state"] for c in (daemon.snapshot() or {}).get("channels", [])]
                == ["waiting"] * n
            ),
            PHASE_TIMEOUT,
            f"{n} channels waiting",
        )
        row["waiting_rss_mb"], row["waiting_fds"] = daemon_memory(pid)
        via = crowd(fds, None, "via")
        cpu0 = proc_cpu(pid)
        row["via_connect_s"] = via.connect()
        cpu1 = proc_cpu(pid)
        row["via_traffic_s"] = via.traffic()
        cpu2 = proc_cpu(pid)
        row["connect_cpu_ms_per_guest"] = (cpu1 - cpu0) / n * 1e3
        # A routed message is a transfer and its disposition.
        row["via_cpu_us_per_msg"] = (cpu2 - cpu1) / (2 * n * args.messages) * 1e6
        # The same traffic twice more. Proton's buffers grow to the largest burst they
        # carried and keep that size, so memory settles over the second round; what still
        # grows over the third would be a leak.
        via.traffic()
        second_mb, _ = daemon_memory(pid)
        via.traffic()
        row["connected_rss_mb"], row["connected_fds"] = daemon_memory(pid)
        row["third_round_kb_per_guest"] = (row["connected_rss_mb"] - second_mb) * 1024 / n
        cpu3 = proc_cpu(pid)
        via.idle(args.idle_s)
        row["idle_core_share"] = (proc_cpu(pid) - cpu3) / args.idle_s
        row["per_guest_kb"] = (row["connected_rss_mb"] - row["waiting_rss_mb"]) * 1024 / n
        row["per_guest_fds"] = (row["connected_fds"] - row["waiting_fds"]) / n
        via.close()
        snap = daemon.snapshot() or {}
        routed = sum(c["deliveries_in"] + c["deliveries_out"] for c in snap.get("channels", []))
        if routed != 6 * n * args.messages:  # three rounds, each way
            raise BenchError(f"the daemon counted {routed} deliveries, not {6 * n * args.messages}")
    finally:
        if daemon.proc is not None:
            daemon.stop()
        for q in channels:
            q.hang_up()
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    kind = BROKERS[args.broker]
    facts = machine_facts()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qvc-scale-") as tmp:
        work = Path(tmp)
        (work / "broker").mkdir()
        broker = kind.cls(work / "broker")
        try:
            print(f"starting {args.broker} ...", file=sys.stderr, flush=True)
            broker.start()
            for n in args.guests:
                print(f"{n} guests ...", file=sys.stderr, flush=True)
                size_dir = work / f"n{n}"
                size_dir.mkdir()
                rows.append(one_size(args.broker, broker, size_dir, n, args))
        finally:
            broker.close()
    facts["broker"] = args.broker
    facts["broker_version"] = broker_version(broker, None)
    return {
        "machine": facts,
        "settings": {"messages": args.messages, "size": SIZE, "idle_s": args.idle_s},
        "rows": rows,
    }


COLUMNS = (
    ("guests", "guests", "{}"),
    ("connect s direct", "direct_connect_s", "{:.2f}"),
    ("via", "via_connect_s", "{:.2f}"),
    ("traffic s direct", "direct_traffic_s", "{:.2f}"),
    ("via", "via_traffic_s", "{:.2f}"),
    ("conn ms/connect", "connect_cpu_ms_per_guest", "{:.1f}"),
    ("conn µs/msg", "via_cpu_us_per_msg", "{:.0f}"),
    ("idle % core", "idle_core_share", "{:.1%}"),
    ("RSS MB waiting", "waiting_rss_mb", "{:.0f}"),
    ("connected", "connected_rss_mb", "{:.0f}"),
    ("KB/guest", "per_guest_kb", "{:.0f}"),
    ("3rd round KB/guest", "third_round_kb_per_guest", "{:+.0f}"),
    ("fds/guest", "per_guest_fds", "{:.1f}"),
)


def table(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    lines = [
        f"{m['broker']} {m['broker_version']}; per guest a sender and a receiver, "
        f"{s['messages']} x {s['size']} B each way, idle {s['idle_s']:g} s; {machine_line(m)}",
        "",
        *markdown_head([h for h, _, _ in COLUMNS]),
    ]
    for row in doc["rows"]:
        lines.append(markdown_row([fmt.format(row[k]) for _, k, fmt in COLUMNS]))
    return "\n".join(lines)


def guests_arg(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("a comma list of positive crowd sizes, e.g. 10,100")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--broker", choices=sorted(BROKERS), default="artemis")
    p.add_argument("--guests", type=guests_arg, default=DEFAULT_GUESTS)
    p.add_argument("--messages", type=int, default=DEFAULT_MESSAGES, help="per guest, each way")
    p.add_argument("--idle-s", type=float, default=DEFAULT_IDLE_S)
    p.add_argument("--out", default=str(REPO / "bench" / "scale.json"))
    args = p.parse_args(argv)
    raise_fd_limit()  # the bench holds three descriptors per guest
    return run_and_report(run, table, args)


if __name__ == "__main__":
    sys.exit(main())
