"""qpid-virtio-status: what the connector is doing, for an operator or a script.

    qpid-virtio-status [channels]        one row per channel, sorted by guest
    qpid-virtio-status guest NAME        everything about one guest
    qpid-virtio-status links             every routed link across guests

Options apply to every command: --json, --watch [SECONDS], --broker-check, -w/--wide.
Exit status (scripts and monitoring rely on it): 0 every channel healthy, 1 some guest in
error (or the broker check found a mismatch), 2 the connector cannot be reached, 64 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO

from connector.control import protocol
from connector.status import views
from connector.status.client import (
    CONTROL_SOCKET_ENV,
    DEFAULT_CONTROL_SOCKET,
    ControlClient,
    ControlError,
    default_socket_path,
)

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_UNREACHABLE = 2
EXIT_USAGE = 64  # sysexits EX_USAGE: kept apart from 2, which means "connector unreachable"

DEFAULT_WATCH_INTERVAL = 2.0
# Below this, refreshing costs the daemon more than an operator can read.
MIN_WATCH_INTERVAL = 0.1
# Above this, it is a job for cron, not a screen left open; it also keeps the interval far
# inside what time.sleep() accepts (about 292 years, where its nanoseconds overflow).
MAX_WATCH_INTERVAL = 86400.0

COMMANDS = ("channels", "guest", "links")
# The adapters in connector.status.brokers.registry, named here so that the tool starts
# without importing proton unless --broker-check asks for a broker (a test checks they match).
BROKER_TYPES = ("qpidd", "artemis")
CLEAR_SCREEN = "\x1b[H\x1b[2J"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``words`` holds the command and its argument."""
    parser = _Parser(
        prog="qpid-virtio-status",
        description="Show what qpid-virtio-connector is routing: channels, guests, links.",
        epilog="Exit status: 0 all channels healthy, 1 some guest in error or a broker-check "
        "mismatch, 2 connector unreachable, 64 usage error.",
    )
    parser.add_argument(
        "words",
        nargs="*",
        metavar="COMMAND",
        help="channels (default) | guest NAME | links",
    )
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help=f"the connector's control socket (default ${CONTROL_SOCKET_ENV} or "
        f"{DEFAULT_CONTROL_SOCKET})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (docs/status.md)")
    parser.add_argument(
        "-w",
        "--wide",
        action="store_true",
        help="channels: add path, upstream, sessions, discarded bytes, and the whole last error",
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        const=str(DEFAULT_WATCH_INTERVAL),
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_INTERVAL:g}) with msgs/s rates",
    )
    parser.add_argument(
        "--count", type=int, metavar="N", help="with --watch: stop after N refreshes"
    )
    parser.add_argument(
        "--broker-check",
        action="store_true",
        help="ask the broker for its connections and mark guests missing on either side",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="broker for --broker-check (default: the connector's first upstream URL)",
    )
    parser.add_argument(
        "--broker-type",
        choices=("auto", *BROKER_TYPES),
        default="auto",
        help="management dialect (default: from the broker's product property)",
    )
    parser.add_argument("--broker-user", metavar="USER")
    parser.add_argument("--broker-password-file", metavar="FILE")
    return parser


@dataclass
class Options:
    """The parsed command line, validated."""

    command: str
    guest: str | None
    socket: str
    json: bool
    wide: bool
    watch: float | None
    count: int | None
    broker_check: bool
    broker: str | None
    broker_type: str
    broker_user: str | None
    broker_password: str | None = field(repr=False)


def parse_options(argv: Sequence[str] | None) -> Options:
    """argv as Options; a usage error exits 64 with argparse's message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    words = list(args.words)
    watch: float | None = None
    if args.watch is not None:
        try:
            watch = float(args.watch)
        except ValueError:
            # `--watch links`: argparse gave the command to --watch's optional value.
            words.insert(0, args.watch)
            watch = DEFAULT_WATCH_INTERVAL
        # "nan" and "inf" parse as floats too. Asking for the range, rather than ruling out
        # what lies outside it, refuses both: nan compares false with everything.
        if not MIN_WATCH_INTERVAL <= watch <= MAX_WATCH_INTERVAL:
            parser.error(
                f"--watch: a number of seconds from {MIN_WATCH_INTERVAL:g} to "
                f"{MAX_WATCH_INTERVAL:g}, not {args.watch!r}"
            )
    if args.count is not None and (args.count < 1 or watch is None):
        parser.error("--count needs --watch and a positive number")
    command = words[0] if words else "channels"
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    if command == "guest" and len(words) != 2:
        parser.error("guest needs exactly one NAME")
    if command != "guest" and len(words) > 1:
        parser.error(f"{command} takes no argument")
    password = None
    if args.broker_password_file:
        try:
            with open(args.broker_password_file) as f:
                password = f.read().strip()
        except OSError as exc:
            parser.error(f"--broker-password-file: {exc.strerror}: {args.broker_password_file}")
    return Options(
        command=command,
        guest=words[1] if command == "guest" else None,
        socket=args.control_socket or default_socket_path(),
        json=args.json,
        wide=args.wide,
        watch=watch,
        count=args.count,
        broker_check=args.broker_check,
        broker=args.broker,
        broker_type=args.broker_type,
        broker_user=args.broker_user,
        broker_password=password,
    )


@dataclass
class Report:
    """One refresh: the text or JSON to print and the exit status it implies."""

    text: str
    status: int
    sample: Any = None  # what the next refresh computes rates against; None for an error


def health(channels: Sequence[protocol.ChannelRow]) -> int:
    """0 when no channel is in error, 1 otherwise. gone and waiting are normal states."""
    return EXIT_UNHEALTHY if any(c["state"] == "error" for c in channels) else EXIT_OK


def build_report(
    opts: Options,
    snapshot: dict[str, Any],
    colour: bool,
    previous: Report | None,
    interval: float,
) -> Report:
    """Render one refresh of the chosen command from a snapshot."""
    now = time.time()
    # Guests, and whoever runs a VM, choose many of the strings shown: a table shows them
    # inert (JSON escapes them itself). The broker check matches the connector's strings
    # as they are against the broker's.
    shown: Callable[[Any], Any] = _as_is if opts.json else views.printable_data
    raw, snapshot = snapshot, shown(snapshot)
    view = (
        protocol.guest_view(snapshot, shown(guest_name(raw, opts.guest or "")))
        if opts.command == "guest"
        else None
    )
    if opts.command == "guest" and view is None:
        return Report(f"qpid-virtio-status: no guest named {opts.guest!r}", EXIT_UNHEALTHY)
    check = shown(run_broker_check(opts, raw)) if opts.broker_check else None
    status = EXIT_OK
    if check is not None and (
        check.get("error") or check.get("missing_on_broker") or check.get("unknown_to_connector")
    ):
        status = EXIT_UNHEALTHY
    document: dict[str, Any]
    watching = opts.watch is not None
    if view is not None:
        status = max(status, health(view["channels"]))
        rows = [protocol.channel_row(c) for c in view["channels"]]
        rates = _rates(previous, rows, interval, views.channel_rates) if watching else None
        document = {"guest": view}
        text = views.render_guest(view, now, colour, rates)
        sample: Any = rows
    elif opts.command == "links":
        links = protocol.link_views(snapshot)
        status = max(status, health(protocol.channel_rows(snapshot)))
        rates = _rates(previous, links, interval, views.link_rates) if watching else None
        document = {"links": links}
        text = views.render_links(links, colour, rates)
        sample = links
    else:
        rows = protocol.channel_rows(snapshot)
        status = max(status, health(rows))
        rates = _rates(previous, rows, interval, views.channel_rates) if watching else None
        document = {"channels": rows}
        marks = broker_marks(check) if check is not None else None
        text = views.render_channels(rows, now, colour, opts.wide, rates, marks)
        sample = rows
    if check is not None:
        document["broker_check"] = check
        text += "\n\n" + views.render_broker_check(check)
    if opts.json:
        text = json.dumps(document, indent=None if watching else 2, sort_keys=False)
    return Report(text, status, sample)


def guest_name(snapshot: dict[str, Any], asked: str) -> str:
    """The name of the guest ``asked`` for, as the connector knows it.

    An operator may type a name as it is or copy it from a table, where its control
    characters are escaped (``views.printable``): either finds the guest.
    """
    wanted = views.printable(asked)
    names = (c["guest"] for c in snapshot["channels"])
    return next((name for name in names if views.printable(name) == wanted), asked)


def _as_is(data: Any) -> Any:
    return data


def _rates(
    previous: Report | None,
    current: Any,
    interval: float,
    compute: Callable[[Any, Any, float], views.Rates],
) -> views.Rates:
    if previous is None or previous.sample is None:
        return views.NO_RATES
    return compute(previous.sample, current, interval)


def run_broker_check(opts: Options, snapshot: dict[str, Any]) -> dict[str, Any]:
    """The cross-check result, or {"broker": URL, "error": TEXT} when the broker cannot be
    asked (the status then is 1: the operator asked for a check that did not happen)."""
    from connector.status.brokers.base import BrokerError  # proton: only when asked for
    from connector.status.brokers.registry import check_broker

    url = opts.broker or next(iter(snapshot["connector"]["upstream_urls"]), None)
    if url is None:
        return {"broker": None, "error": "no broker URL: give --broker"}
    try:
        result = check_broker(
            url,
            protocol.sorted_channels(snapshot),
            opts.broker_type,
            opts.broker_user,
            opts.broker_password,
        )
    except BrokerError as exc:
        return {"broker": url, "error": str(exc)}
    return dict(result)


def broker_marks(check: dict[str, Any]) -> dict[str, str]:
    """The BROKER column: per channel path, whether the broker lists its connection."""
    if check.get("error"):
        return {}
    marks = {path: "listed" for path in check["matched"]}
    marks.update({m["path"]: "MISSING" for m in check["missing_on_broker"]})
    return marks


def fetch(opts: Options) -> dict[str, Any]:
    """The daemon's snapshot; every view is derived from it, so one refresh is consistent."""
    return ControlClient(opts.socket).request("snapshot")["snapshot"]


def run_once(opts: Options, colour: bool, previous: Report | None, interval: float) -> Report:
    """Fetch and render once; a control error becomes its message and exit status."""
    try:
        snapshot = fetch(opts)
    except ControlError as exc:
        return Report(views.printable(f"qpid-virtio-status: {exc}"), EXIT_UNREACHABLE)
    return build_report(opts, snapshot, colour, previous, interval)


def watch(opts: Options, out: TextIO, colour: bool) -> int:
    """Refresh in place like `watch`: clear the screen on a terminal, else print blocks."""
    in_place = out.isatty()
    assert opts.watch is not None
    previous: Report | None = None
    last_time = time.monotonic()
    refreshes = 0
    report = Report("", EXIT_OK)
    try:
        while opts.count is None or refreshes < opts.count:
            now = time.monotonic()
            report = run_once(opts, colour, previous, now - last_time)
            if report.sample is not None:
                previous, last_time = report, now
            if opts.json:  # one JSON document a line; a failed refresh says why on stderr
                (out if report.sample is not None else sys.stderr).write(report.text + "\n")
            else:
                header = (
                    f"Every {opts.watch:g}s: qpid-virtio-status {opts.command}"
                    f"{' ' + views.printable(opts.guest) if opts.guest else ''}    "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}"
                )
                out.write(
                    (CLEAR_SCREEN if in_place else "")
                    + header
                    + "\n\n"
                    + report.text
                    + "\n"
                    + ("" if in_place else "\n")
                )
            out.flush()
            refreshes += 1
            if opts.count is None or refreshes < opts.count:
                time.sleep(opts.watch)  # the refresh period itself, not a synchronisation
    except KeyboardInterrupt:
        pass
    return report.status


def use_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the qpid-virtio-status console script."""
    opts = parse_options(argv)
    colour = use_colour(sys.stdout) and not opts.json
    if opts.watch is not None:
        return watch(opts, sys.stdout, colour)
    report = run_once(opts, colour, None, 0.0)
    stream = sys.stderr if report.sample is None else sys.stdout
    print(report.text, file=stream)
    return report.status


if __name__ == "__main__":
    sys.exit(main())
