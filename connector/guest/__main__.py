"""``python3 -m connector.guest``: the guest-side commands (today: ``bridge``).

Runs inside the guest with nothing but Python 3 and proton, so it uses argparse and logging
from the standard library only.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from .bridge import Bridge, parse_listen
from .port import port_path

LOG_LEVELS = ("debug", "info", "warning", "error")
# Exit status of a command that was understood but could not start (argparse uses 2 for
# usage errors).
EXIT_CANNOT_START = 1


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command until interrupted."""
    parser = argparse.ArgumentParser(prog="python3 -m connector.guest")
    sub = parser.add_subparsers(dest="command", required=True)
    bridge = sub.add_parser(
        "bridge",
        help="relay TCP AMQP clients to virtio-serial ports",
        description="Accept AMQP clients on one TCP address and relay each to a free port "
        "(one client per port at a time; repeat --port for a pool).",
    )
    bridge.add_argument("--listen", default="127.0.0.1:5672", help="HOST:PORT to accept on")
    bridge.add_argument(
        "--port", action="append", required=True, help="virtio-serial port name or path"
    )
    parser.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        listen = parse_listen(args.listen)
    except ValueError as e:
        parser.error(str(e))

    def cannot_start(why: str) -> NoReturn:
        parser.exit(EXIT_CANNOT_START, f"{parser.prog}: {why}\n")

    for name in args.port:  # each must exist now; one unplugged later is skipped then
        try:
            port_path(name)
        except FileNotFoundError as e:
            cannot_start(f"--port {name}: {e.strerror} ({e.filename})")
    try:
        server = Bridge(listen, args.port)
    except OSError as e:  # address in use or not ours, unknown host name
        cannot_start(f"cannot listen on {args.listen}: {e.strerror or e}")
    logging.getLogger(__name__).info("bridge listening on %s:%d for %s", *server.address, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
