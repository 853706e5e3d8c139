"""The demo: a broker, the connector, and two simulated guests, then `qpid-virtio-status`.

Run it with `bash tests/demo.sh` (which installs what it needs first). It starts Apache
ActiveMQ Artemis on a free loopback port, plays qemu for two virtio-serial channels (a pty
and a unix socket), starts `qpid-virtio-connector` on them, and has a guest on each channel
send and receive messages through its port, one of them doing request/response with a
service on the host. It ends by printing what an operator sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from proton import Message
from proton.handlers import MessagingHandler
from proton.reactor import Container

from connector.guest.client import GuestClient
from tests.brokers.artemis import Artemis
from tests.support.connector import REPO, Connector, Qemu


class _Echo(MessagingHandler):
    """A host-side service on the broker that answers each request."""

    def __init__(self, broker: Artemis) -> None:
        super().__init__()
        self.broker = broker
        self.ready = threading.Event()

    def on_start(self, event: Any) -> None:
        conn = event.container.connect(
            self.broker.url, user=self.broker.user, password=self.broker.password
        )
        event.container.create_receiver(conn, "demo.service")
        self.replies = event.container.create_sender(conn, None)

    def on_link_opened(self, event: Any) -> None:
        if event.receiver:
            self.ready.set()

    def on_message(self, event: Any) -> None:
        msg = event.message
        self.replies.send(
            Message(
                address=msg.reply_to,
                correlation_id=msg.correlation_id,
                body=f"hello {msg.body}, this is the host",
            )
        )


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _status(control: str, *argv: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "connector.status", "--control-socket", control, *argv],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="qpid-virtio-demo-"))
    _say(f"starting Apache ActiveMQ Artemis (work dir {work})")
    broker = Artemis(work / "artemis")
    broker.start()
    print(f"broker at {broker.url}")
    pty = Qemu("pty", work, "vm-pty")
    sock = Qemu("unix", work, "vm-unix")
    _say("starting qpid-virtio-connector on a pty channel and a unix-socket channel")
    daemon = Connector(work, broker, [pty, sock], watched=False).start()
    print(" ".join(daemon.argv()[1:]))
    echo = _Echo(broker)
    container = Container(echo)
    threading.Thread(target=container.run, daemon=True).start()
    echo.ready.wait(30)
    try:
        _say("guest vm-pty: 100 messages to 'demo.queue' through /dev/virtio-ports (a pty here)")
        with GuestClient(pty.fd(), container_id="vm-pty-agent", timeout=30) as guest:
            outcomes = guest.send("demo.queue", [f"reading {i}" for i in range(100)])
            print(f"sent 100, broker accepted {sum(o.state == 'accepted' for o in outcomes)}")
            got = guest.receive("demo.queue", 100)
            print(f"received {len(got)} back: first {got[0].body!r}, last {got[-1].body!r}")
        _say("guest vm-unix: request/response with a service on the host, over a unix socket")
        with GuestClient(sock.fd(), container_id="vm-unix-agent", timeout=30) as guest:
            reply = guest.request("demo.service", "vm-unix")
            print(f"reply: {reply.body!r}")
            guest.send("demo.queue", ["left for later"])
            _say("qpid-virtio-status   (while vm-unix is connected)")
            _status(daemon.control)
            _say("qpid-virtio-status guest vm-unix")
            _status(daemon.control, "guest", "vm-unix")
        _say("vm-pty's qemu exits: its channel goes 'gone'")
        pty.hang_up()
        daemon.wait_state("vm-pty", "gone")
        _say("qpid-virtio-status --wide")
        _status(daemon.control, "--wide")
    finally:
        container.stop()
        daemon.stop()
        sock.hang_up()
        broker.close()
    _say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
