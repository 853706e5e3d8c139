"""``qpid-virtio-connector``: command-line flags -> Config -> the daemon.

A user mistake prints one line naming the key, flag or path and exits 2; it never shows a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from . import __version__, logs
from . import config as config_mod
from .errors import ConfigError

EXIT_CONFIG = 2


def parser() -> argparse.ArgumentParser:
    """The daemon's arguments; each overrides the configuration file's setting."""
    p = argparse.ArgumentParser(
        prog="qpid-virtio-connector",
        description="Route guests' AMQP 1.0 connections from virtio-serial channels to a broker.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument(
        "--broker",
        action="append",
        metavar="URL",
        help="broker URL amqp[s]://host[:port]; repeat or comma-separate for failover",
    )
    p.add_argument("--broker-user", metavar="USER", help="SASL user for the broker")
    p.add_argument(
        "--broker-password-file", metavar="FILE", help="file holding the broker password"
    )
    p.add_argument(
        "--channel",
        action="append",
        metavar="KIND:PATH[,guest=NAME][,port=PORT][,uuid=UUID]",
        help="serve this channel (kind unix, unix-listen or pty); repeatable",
    )
    p.add_argument("--control-socket", metavar="PATH", help="unix socket for qpid-virtio-status")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    p.add_argument(
        "--discovery",
        metavar="SOURCES",
        help="find channels by itself: kvm,watch (the default when no --channel is given)",
    )
    p.add_argument(
        "--watch", action="append", metavar="GLOB", help="watch for channel sockets; repeatable"
    )
    p.add_argument("--log-level", choices=config_mod.LOG_LEVELS, help="log level (default: info)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    flags = vars(parser().parse_args(argv))
    try:
        cfg = config_mod.load(flags)
    except ConfigError as err:
        print(f"qpid-virtio-connector: {err}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.log_level)
    from .daemon import Daemon  # after logging is set up

    try:
        return asyncio.run(Daemon(cfg, flags).run())
    except ConfigError as err:  # found while starting: TLS files, control socket path, group...
        print(f"qpid-virtio-connector: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0
