"""Logging set-up: one readable line per event, naming the guest it concerns.

Channel loggers are children of ``connector.guest`` (``connector.guest.vm1``) and carry the
port, so every line says which guest and which port. Under journald (``JOURNAL_STREAM``
set) the timestamp is left to the journal.

A line is one line: guest names, ports, addresses and error descriptions come from VMs and
guests, so the message and the guest's name are made ``printable()`` and cannot forge a
line of their own. Only a traceback, which we write, spans lines.
"""

from __future__ import annotations

import logging
import os
import sys

from .printable import printable


class _GuestFormatter(logging.Formatter):
    """Render ``connector.guest.NAME`` records as ``guest NAME/PORT: message``."""

    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        if name.startswith("connector.guest."):
            port = getattr(record, "port", None)
            who = name[len("connector.guest.") :]
            record.who = f"guest {who}/{port}" if port else f"guest {who}"
        else:
            record.who = name
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line without its traceback: everything in it made printable."""
        record.message = printable(record.message)
        record.who = printable(record.who)
        return super().formatMessage(record)


class _PortAdapter(logging.LoggerAdapter):
    """Puts the port in each record so the formatter can name it."""

    def process(self, msg: str, kwargs: dict) -> tuple[str, dict]:
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return msg, kwargs


def guest_logger(name: str, port: str) -> logging.LoggerAdapter:
    """The logger for one guest's channel."""
    return _PortAdapter(logging.getLogger(f"connector.guest.{name}"), {"port": port})


def setup(level: str) -> None:
    """Log to stderr at ``level`` in a form journald and people both read."""
    fmt = "%(levelname)s %(who)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_GuestFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
