"""The host-side service for the latency test: answers each request on the broker directly.

Run as its own process (``python -m bench.responder HOST PORT ADDRESS``) so that it does not
share the bench client's interpreter lock; it prints ``ready`` once its receiver is attached
and serves until it is terminated. It echoes the request body to the request's ``reply_to``
with the same ``correlation_id``, over one sender per reply address.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import sys
from typing import Any

from proton import Handler, Message

from bench.client import take_message
from connector.guest.driver import Driver

# Credit the responder keeps out; requests come one at a time, so this only has to be > 0.
CREDIT = 50


class Responder(Handler):
    """Receive requests on ``address``; send each body back to its ``reply_to``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._senders: dict[str, Any] = {}
        self._driver: Any = None
        self._tags = itertools.count()

    def on_start(self, event: Any) -> None:
        self._driver = event.container
        rcv = self._driver.create_receiver(self._driver.connect(), self.address)
        rcv.flow(CREDIT)

    def on_link_remote_open(self, event: Any) -> None:
        if event.link.is_receiver:
            print("ready", flush=True)

    def on_delivery(self, event: Any) -> None:
        request = take_message(event)
        if request is None:
            return
        reply = Message(body=request.body, correlation_id=request.correlation_id)
        snd = self._senders.get(request.reply_to)
        if snd is None:
            snd = self._driver.create_sender(self._driver.connection, request.reply_to)
            self._senders[request.reply_to] = snd
        snd.delivery(b"%x" % next(self._tags))
        snd.send(reply.encode())
        snd.advance()
        event.link.flow(1)

    def on_link_remote_close(self, event: Any) -> None:
        cond = event.link.remote_condition
        print(f"responder link closed: {cond}", file=sys.stderr, flush=True)


def main() -> None:
    """Connect over TCP and serve until killed."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("address")
    args = p.parse_args()
    sock = socket.create_connection((args.host, args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    Driver(Responder(args.address), sock.fileno(), sasl_mechanisms="ANONYMOUS").run()


if __name__ == "__main__":
    main()
