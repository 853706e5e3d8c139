"""Routed messages, direct vs through the connector: msgs/s, MB/s, latency and connector CPU.

    python bench/throughput.py [--broker artemis|rabbitmq] [--count N] [--size BYTES]
                               [--rounds R] [--out bench/results.json]

The bench starts a broker from the test fixtures (tests/brokers) and the connector daemon as a
subprocess with two channels, and plays qemu for both: it holds the master of a pty whose
slave the connector opens, and it listens on the unix socket the connector connects to. The
same client code (bench/client.py on connector.guest's Driver) then runs five ways:

    direct     TCP straight to the broker
    pty        through the connector, over the pty master
    unix       through the connector, over the accepted unix socket
    socat-pty  through socat relaying the pty's bytes to the broker: the ceiling of any byte
               relay on a pty (no AMQP is terminated; its CPU shows in the connector column)
    socat-unix the same over a unix socket: the ceiling of any byte relay on the unix channel

Each round runs every path: N messages sent at-least-once to a fresh queue, the same N
received and accepted, then request/response round trips to a responder attached directly to
the broker. Rounds rotate the order of the paths because a 2-core machine is noisy; the
table shows the median over rounds and the spread.

The connector's CPU is read from /proc/PID/stat (utime+stime) around each phase and divided
by the messages the phase routed: a transfer and its disposition count as one routed message,
so a request/response is two. Clock ticks are 10 ms, which is why N defaults to thousands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ on the path, not the repository: the broker fixtures
# (tests.brokers) and this package live at the top of the checkout.
sys.path.insert(0, str(REPO))

import proton  # noqa: E402

from bench.client import (  # noqa: E402
    BenchError,
    Requester,
    StreamReceiver,
    StreamSender,
    encode_payload,
    run_phase,
)
from tests.brokers import Artemis, Broker, RabbitMQ  # noqa: E402
from tests.support import connector as support  # noqa: E402

DEFAULT_COUNT = 10_000
DEFAULT_SIZE = 1024
DEFAULT_ROUNDS = 5
# Artemis's first thousands of messages run in the JVM's interpreter, several times slower
# than later ones: one full round is run first and not counted.
DEFAULT_WARMUP = 1
DEFAULT_REQUESTS = 300
# Unsettled deliveries a sender keeps in flight and credit a receiver keeps out: enough to
# keep the pipe full through the extra hop, below Artemis's 1000 credits per producer.
DEFAULT_WINDOW = 250
# Round trips discarded before timing, while both ends warm their caches.
WARMUP_REQUESTS = 20
# The daemon and its channels come up in well under a second; a loaded box may be slower.
DAEMON_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATHS = ("direct", "pty", "unix", "socat-pty", "socat-unix")
CHANNELS = ("pty", "unix")  # the connector's channels
RELAYS = ("socat-pty", "socat-unix")  # a C byte relay on each kind of channel
VIA = (*CHANNELS, *RELAYS)  # the paths with a ratio to direct


# ---- machine and process facts --------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    """What a reader needs to compare a result with another machine's."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "proton": ".".join(map(str, proton.VERSION)),
    }


def proc_cpu_ticks(pid: int) -> float:
    """utime+stime of one process in seconds, from /proc/PID/stat (10 ms resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu(pid: int) -> float:
    """CPU time of all of a process's threads in seconds, from /proc/PID/task/*/schedstat.

    The same quantity as utime+stime, counted in nanoseconds: a 300-request latency phase
    costs the connector a few clock ticks, too few for /proc/PID/stat to resolve.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def group_cpu(pgid: int) -> float:
    """utime+stime summed over every live process of a process group (the broker's JVM or
    Erlang VM lives under a wrapper script in the fixture's group)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def machine_busy() -> float:
    """CPU seconds all cores spent on anything but idle and I/O wait, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / CLK_TCK


def self_cpu() -> float:
    """This process's user+system CPU: the client's cost."""
    t = os.times()
    return t.user + t.system


# ---- brokers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerKind:
    """How a broker names queues, and whether it has dynamic reply nodes."""

    cls: type[Broker]
    queue_prefix: str
    dynamic_replies: bool

    def address(self, name: str) -> str:
        return self.queue_prefix + name


BROKERS = {
    "artemis": BrokerKind(Artemis, "", True),
    # RabbitMQ 3.10 has no dynamic nodes: replies go to a named queue (shared/README.md).
    "rabbitmq": BrokerKind(RabbitMQ, "/queue/", False),
}


def broker_pgid(broker: Broker) -> int | None:
    """The fixture's process group, for the broker's CPU; None if it is not exposed."""
    process = getattr(broker, "_process", None)
    return getattr(process, "pgid", None)


# ---- the connector and the channels the bench plays qemu for ---------------------------


class Connector:
    """The daemon as a subprocess (tests/support/connector.py), with a pty and a unix-socket
    channel whose qemu ends the bench holds."""

    def __init__(self, work: Path, broker: Broker) -> None:
        self.qemu = {kind: support.Qemu(kind, work, f"bench-{kind}") for kind in CHANNELS}
        self.daemon = support.Connector(
            work, broker, list(self.qemu.values()), "--log-level", "warning", watched=False
        )
        self.daemon.start()
        assert self.daemon.proc is not None
        self.pid = self.daemon.proc.pid

    def wait_ready(self) -> None:
        """Take the bench's end of each channel and wait until both wait for a guest."""
        for q in self.qemu.values():
            # Non-blocking like a guest's port: the client's driver never stalls in a write.
            os.set_blocking(q.fd(DAEMON_TIMEOUT), False)
        for q in self.qemu.values():
            self.daemon.wait_state(q.guest, "waiting", DAEMON_TIMEOUT)

    def snapshot(self) -> dict[str, Any] | None:
        return self.daemon.snapshot()

    def fd(self, path: str) -> int:
        """The bench's end of a channel: what a guest application would hold."""
        return self.qemu[path].fd()

    def cpu(self) -> tuple[float, float]:
        """(precise CPU seconds, tick-counted CPU seconds) of the daemon so far."""
        return proc_cpu(self.pid), proc_cpu_ticks(self.pid)

    def tail(self) -> str:
        return self.daemon.log_text()[-3000:]

    def peak_rss_mb(self) -> float:
        """The daemon's peak resident memory so far (VmHWM), in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        if self.daemon.proc is not None:
            self.daemon.stop()
        for q in self.qemu.values():
            q.hang_up()


@contextlib.contextmanager
def responder(broker: Broker, address: str) -> Iterator[subprocess.Popen[str]]:
    """The host-side service for the latency test, attached to the broker directly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.responder", broker.host, str(broker.port), address],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], DAEMON_TIMEOUT)
        if not ready or proc.stdout.readline().strip() != "ready":
            raise BenchError("the responder did not attach to the broker")
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


# ---- one phase ---------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything a phase needs: the broker, the daemon, and the run's settings."""

    broker: Broker
    kind: BrokerKind
    connector: Connector
    count: int
    size: int
    window: int
    requests: int
    responder_pid: int | None = None
    remote_properties: dict[str, Any] | None = None
    relay_cpu: float = 0.0  # CPU seconds of the last phase's socat

    @contextlib.contextmanager
    def channel(self, path: str) -> Iterator[tuple[int, str | None]]:
        """An fd for the client on ``path`` and the SASL mechanism to use on it.

        Direct gets a fresh TCP connection per phase, like proton's container: TCP_NODELAY
        and ANONYMOUS (both brokers allow it; the connector is the one that authenticates).
        Through the connector the guest speaks no SASL, as a guest application may.
        """
        if path in RELAYS:
            yield from self._socat(path)
            return
        if path != "direct":
            yield self.connector.fd(path), None
            return
        sock = socket.create_connection((self.broker.host, self.broker.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        try:
            yield sock.fileno(), "ANONYMOUS"
        finally:
            sock.close()

    def _socat(self, path: str) -> Iterator[tuple[int, str | None]]:
        """A channel whose far end socat relays to the broker, as a byte relay would: the
        slave of a pty (the client holds the master, as qemu does), or one end of a unix
        socket pair (the client holds the other)."""
        if path == "socat-pty":
            ours, theirs = os.openpty()
            tty.setraw(theirs)  # before the client's first byte, which a cooked tty would echo
            far = f"{os.ttyname(theirs)},rawer"
        else:
            pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours, theirs = (s.detach() for s in pair)
            far = f"FD:{theirs}"
        relay = subprocess.Popen(
            ["socat", "-b65536", far, f"TCP:{self.broker.host}:{self.broker.port},nodelay"],
            pass_fds=(theirs,),
        )
        # Our copy of the far end stays open too: a pty master whose slave nobody holds
        # reads EIO.
        os.set_blocking(ours, False)
        try:
            yield ours, "ANONYMOUS"
        finally:
            self.relay_cpu = proc_cpu(relay.pid)
            os.close(ours)
            os.close(theirs)
            relay.terminate()
            relay.wait()

    def meters(self) -> dict[str, float]:
        """CPU seconds so far of everything taking part, and of the whole machine."""
        pgid = broker_pgid(self.broker)
        con, con_ticks = self.connector.cpu()
        return {
            "client": self_cpu(),
            "connector": con,
            "connector_stat": con_ticks,
            "broker": group_cpu(pgid) if pgid else 0.0,
            "responder": proc_cpu(self.responder_pid) if self.responder_pid else 0.0,
            "machine": machine_busy(),
            "wall": time.monotonic(),
        }

    def measure(self, path: str, handler: Any, routed: int) -> dict[str, float]:
        """Run one phase on ``path``; return its CPU costs per routed message in µs, and
        how many cores other work on the machine took meanwhile (the noise)."""
        before = self.meters()
        with self.channel(path) as (fd, mechs):
            run_phase(handler, fd, sasl_mechanisms=mechs)
        after = self.meters()
        d = {k: after[k] - before[k] for k in before}
        if path == "direct" and self.remote_properties is None:
            self.remote_properties = handler.remote_properties
        ours = d["client"] + d["connector"] + d["broker"] + d["responder"]
        out = {
            "client_us": d["client"] / routed * 1e6,
            "broker_us": d["broker"] / routed * 1e6,
            "other_cores": max(0.0, d["machine"] - ours) / d["wall"],
        }
        if path in RELAYS:
            out["connector_us"] = self.relay_cpu / routed * 1e6
        elif path != "direct":
            out["connector_us"] = d["connector"] / routed * 1e6
            out["connector_us_stat"] = d["connector_stat"] / routed * 1e6
        return out

    def throughput(self, path: str, queue: str) -> dict[str, Any]:
        """Send N to a fresh queue, then receive the same N."""
        address = self.kind.address(queue)
        snd = StreamSender(address, encode_payload(self.size), self.count, self.window)
        send_cpu = self.measure(path, snd, self.count)
        rcv = StreamReceiver(address, self.count, self.window)
        recv_cpu = self.measure(path, rcv, self.count)
        assert snd.started and snd.ended and rcv.started and rcv.ended
        send_s, recv_s = snd.ended - snd.started, rcv.ended - rcv.started
        return {
            "send_msgs_per_s": self.count / send_s,
            "send_mb_per_s": self.count * self.size / send_s / 1e6,
            "recv_msgs_per_s": self.count / recv_s,
            "recv_mb_per_s": self.count * self.size / recv_s / 1e6,
            **{f"send_{k}": v for k, v in send_cpu.items()},
            **{f"recv_{k}": v for k, v in recv_cpu.items()},
        }

    def latency(self, path: str, service: str) -> dict[str, Any]:
        """Request/response round trips through ``path`` to the direct responder."""
        reply = None if self.kind.dynamic_replies else self.kind.address(f"bench.replies.{path}")
        req = Requester(
            self.kind.address(service), reply, b"x" * self.size, self.requests + WARMUP_REQUESTS
        )
        cpu = self.measure(path, req, 2 * (self.requests + WARMUP_REQUESTS))
        rtts = sorted(req.samples[WARMUP_REQUESTS:])
        return {
            "rtt_p50_ms": percentile(rtts, 0.50) * 1e3,
            "rtt_p99_ms": percentile(rtts, 0.99) * 1e3,
            **{f"rtt_{k}": v for k, v in cpu.items()},
        }


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# ---- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, run the rounds, and return the results document."""
    kind = BROKERS[args.broker]
    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="qvc-bench-") as tmp:
        work = Path(tmp)
        (work / "broker").mkdir()
        broker = kind.cls(work / "broker")
        connector: Connector | None = None
        try:
            print(f"starting {args.broker} ...", file=sys.stderr, flush=True)
            broker.start()
            connector = Connector(work, broker)
            connector.wait_ready()
            bench = Bench(
                broker, kind, connector, args.count, args.size, args.window, args.requests
            )
            runs: list[dict[str, Any]] = []
            service = f"bench.service.{os.getpid()}"
            with responder(broker, kind.address(service)) as service_proc:
                bench.responder_pid = service_proc.pid
                # Negative rounds warm up the JVM's JIT, the broker's queues and our caches;
                # their numbers are thrown away.
                paths = args.paths
                for rnd in range(-args.warmup, args.rounds):
                    order = paths[rnd % len(paths) :] + paths[: rnd % len(paths)]
                    for path in order:
                        name = "warm-up" if rnd < 0 else f"round {rnd + 1}/{args.rounds}"
                        print(f"{name}: {path}", file=sys.stderr, flush=True)
                        queue = f"bench.{os.getpid()}.{rnd}.{path}"
                        row = {"round": rnd + 1, "path": path}
                        row.update(bench.throughput(path, queue))
                        if args.requests:
                            row.update(bench.latency(path, service))
                        if rnd >= 0:
                            runs.append(row)
            snap = connector.snapshot() or {}
            per_round = args.count + (args.requests + WARMUP_REQUESTS if args.requests else 0)
            check_counters(snap, (args.warmup + args.rounds) * per_round, args.paths)
            peak_rss_mb = connector.peak_rss_mb()
        except BaseException:
            if connector is not None:
                print(connector.tail(), file=sys.stderr)
            raise
        finally:
            if connector is not None:
                connector.close()
            broker.close()
    facts["broker"] = args.broker
    facts["broker_version"] = broker_version(broker, bench.remote_properties)
    return {
        "machine": facts,
        "settings": {
            "count": args.count,
            "size": args.size,
            "window": args.window,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "requests": args.requests,
            "paths": list(args.paths),
        },
        "connector": {"peak_rss_mb": peak_rss_mb},
        "summary": summarise(runs, args.paths),
        "runs": runs,
        "channels": snap.get("channels", []),
    }


def check_counters(snap: dict[str, Any], per_channel: int, paths: tuple[str, ...]) -> None:
    """Prove the via runs went through the connector: each channel's counters must show
    every message sent and received on it (the warm-up requests included), and nothing on
    a channel that was not benchmarked."""
    for row in snap.get("channels", []):
        want = per_channel if row["kind"] in paths else 0
        got = (row["deliveries_in"], row["deliveries_out"])
        if got != (want, want):
            raise BenchError(f"{row['guest']} routed {got} (in, out), expected {want}")


def broker_version(broker: Broker, props: dict[str, Any] | None) -> str:
    """The version the broker announced in its open frame, else the fixture's own."""
    for key, value in (props or {}).items():
        if str(key) == "version":
            return str(value)
    return str(getattr(sys.modules[type(broker).__module__], "ARTEMIS_VERSION", "unknown"))


def summarise(
    runs: list[dict[str, Any]], paths: tuple[str, ...]
) -> dict[str, dict[str, dict[str, float]]]:
    """Median, min and max over rounds of every metric, per path; plus ratios to direct."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for path in paths:
        rows = [r for r in runs if r["path"] == path]
        metrics = [k for k in rows[0] if k not in ("round", "path")]
        out[path] = {
            k: {
                "median": statistics.median(r[k] for r in rows),
                "min": min(r[k] for r in rows),
                "max": max(r[k] for r in rows),
            }
            for k in metrics
        }
    for path in (p for p in VIA if p in paths and "direct" in paths):
        for k in ("send_msgs_per_s", "recv_msgs_per_s"):
            ratios = [
                via[k] / direct[k]
                for via, direct in zip(
                    (r for r in runs if r["path"] == path),
                    (r for r in runs if r["path"] == "direct"),
                    strict=True,
                )
            ]
            out[path][k.replace("msgs_per_s", "x_direct")] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
    return out


# ---- the table -------------------------------------------------------------------------------

COLUMNS = (
    # (header, metric, format)
    ("send msg/s", "send_msgs_per_s", "{:.0f}"),
    ("MB/s", "send_mb_per_s", "{:.1f}"),
    ("x direct", "send_x_direct", "{:.2f}"),
    ("recv msg/s", "recv_msgs_per_s", "{:.0f}"),
    ("MB/s", "recv_mb_per_s", "{:.1f}"),
    ("x direct", "recv_x_direct", "{:.2f}"),
    ("rtt p50 ms", "rtt_p50_ms", "{:.2f}"),
    ("rtt p99 ms", "rtt_p99_ms", "{:.2f}"),
    ("conn µs/msg send", "send_connector_us", "{:.0f}"),
    ("recv", "recv_connector_us", "{:.0f}"),
    ("rtt", "rtt_connector_us", "{:.0f}"),
)
COST_COLUMNS = (
    ("client µs/msg send", "send_client_us", "{:.0f}"),
    ("recv", "recv_client_us", "{:.0f}"),
    ("broker µs/msg send", "send_broker_us", "{:.0f}"),
    ("recv", "recv_broker_us", "{:.0f}"),
    ("other load (cores) send", "send_other_cores", "{:.2f}"),
    ("recv", "recv_other_cores", "{:.2f}"),
)


def machine_line(m: dict[str, Any]) -> str:
    """The machine as a results table names it (from ``machine_facts``)."""
    return f"{m['nproc']} x {m['cpu_model']}, Python {m['python']}, proton {m['proton']}"


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_head(headers: list[str]) -> list[str]:
    """A Markdown table's header row and the rule under it."""
    return [markdown_row(headers), "|---" * len(headers) + "|"]


def table(doc: dict[str, Any]) -> str:
    """A Markdown table of medians with the min-max spread, ready for docs/performance.md."""
    m, s = doc["machine"], doc["settings"]
    lines = [
        f"{m['broker']} {m['broker_version']}; {s['count']} x {s['size']} B at-least-once, "
        f"window {s['window']}, {s['requests']} requests, {s['rounds']} rounds; "
        f"{machine_line(m)}",
        f"median [min-max] over rounds; connector peak RSS "
        f"{doc['connector']['peak_rss_mb']:.0f} MB",
        "",
    ]
    for columns in (COLUMNS, COST_COLUMNS):
        lines += markdown_head(["path", *(h for h, _, _ in columns)])
        for path in s["paths"]:
            cells = [cell(doc["summary"][path].get(key), fmt) for _, key, fmt in columns]
            lines.append(markdown_row([path, *cells]))
        lines.append("")
    return "\n".join(lines)


def cell(value: dict[str, float] | None, fmt: str) -> str:
    """'median [min-max]', or '-' for a metric the path does not have."""
    if value is None:
        return "-"
    return f"{fmt.format(value['median'])} [{fmt.format(value['min'])}-{fmt.format(value['max'])}]"


def paths_arg(text: str) -> tuple[str, ...]:
    """``--paths``: known names only, in the order given."""
    paths = tuple(p for p in text.split(",") if p)
    unknown = set(paths) - set(PATHS)
    if unknown or not paths:
        raise argparse.ArgumentTypeError(f"paths are {', '.join(PATHS)}")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--broker", choices=sorted(BROKERS), default="artemis")
    p.add_argument("--count", type=int, default=DEFAULT_COUNT, help="messages per phase")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="message body bytes")
    p.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help="unsettled messages in flight / receiver credit",
    )
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="rounds run and discarded")
    p.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help="timed request/response round trips per path and round",
    )
    p.add_argument(
        "--paths",
        type=paths_arg,
        default=PATHS,
        help=f"comma-separated subset of {','.join(PATHS)} (ratios need direct)",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    return run_and_report(run, table, p.parse_args(argv))


def run_and_report(
    run: Callable[[argparse.Namespace], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    args: argparse.Namespace,
) -> int:
    """Run a bench, write its results document to ``args.out`` as JSON, print its table."""
    began = time.monotonic()
    doc = run(args)
    doc["settings"]["wall_seconds"] = round(time.monotonic() - began, 1)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"(took {doc['settings']['wall_seconds']} s; JSON in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
