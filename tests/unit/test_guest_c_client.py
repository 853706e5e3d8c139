"""The C client of docs/guest.md (tests/vm/guest_c_client.c): proton-c's connection driver
over a port's fd, with the stale-bytes drain. Compiled and run against the in-memory peer
on the far end of a pty, as a guest would use a virtio-serial port.

Needs gcc and proton-c's headers (Debian: libqpid-proton11-dev); skipped without them.
"""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import threading
import tty
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from connector.guest.peer import MemoryBroker, PeerThread

STALE = b"\x00\x00\x00\x0cstale tail of an older connection"
SOURCE = Path(__file__).resolve().parents[1] / "vm" / "guest_c_client.c"


@pytest.fixture(scope="module")
def c_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None or not Path("/usr/include/proton/connection_driver.h").exists():
        pytest.skip("needs gcc and proton-c headers (libqpid-proton11-dev)")
    binary = tmp_path_factory.mktemp("c") / "guest_c_client"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-O2", "-o", str(binary), str(SOURCE), "-lqpid-proton"],
        check=True,
    )
    return binary


def _run(
    c_client: Path, count: int, host_side: Callable[[int], Any]
) -> subprocess.CompletedProcess[str]:
    """Run the C client on a raw pty's guest end for ``count`` messages, with what
    ``host_side(host_fd)`` returns (closed at the end) serving the other end."""
    host, guest = pty.openpty()
    tty.setraw(guest)  # a virtio port has no line discipline; the pty must not have one
    server = host_side(host)
    try:
        return subprocess.run(
            [str(c_client), os.ttyname(guest), "c-queue", str(count)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.close()
        os.close(guest)
        os.close(host)


def test_c_client_drains_then_sends_at_least_once(c_client: Path) -> None:
    broker = MemoryBroker()

    def stale_then_broker(host: int) -> PeerThread:
        os.write(host, STALE)
        return PeerThread(host, broker)

    run = _run(c_client, 25, stale_then_broker)
    assert run.returncode == 0, run.stderr
    assert "accepted 25 of 25" in run.stdout
    assert f"discarded {len(STALE)} stale bytes" in run.stderr
    assert [m.body for m in broker.queues["c-queue"]] == [f"c{i}" for i in range(25)]
    assert broker.remote_container == "c-guest"


@pytest.mark.parametrize("host_answers", ["nothing", "stale bytes"])
def test_c_client_sends_its_header_again_when_it_went_into_an_old_frame(
    c_client: Path, host_answers: str
) -> None:
    # The connector takes a header for a new client only after a pause; right after a
    # client died mid-frame, ours goes into that frame and the host says nothing, or the
    # old connection's last bytes come back instead of a header. The client must drain
    # and send its header again, as connector.guest's driver does.
    broker = MemoryBroker()
    swallowed = threading.Event()
    peer: list[PeerThread] = []

    def swallow_then_broker(host: int) -> SimpleNamespace:
        def serve() -> None:
            # Take the client's first header and open as if they completed an old frame,
            # answer with the old connection's tail (or nothing), then serve the retry.
            os.read(host, 65536)
            if host_answers == "stale bytes":
                os.write(host, STALE)
            swallowed.set()
            peer.append(PeerThread(host, broker))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()

        def close() -> None:
            thread.join(10)
            for p in peer:
                p.close()

        return SimpleNamespace(close=close)

    run = _run(c_client, 5, swallow_then_broker)
    assert swallowed.is_set()
    assert run.returncode == 0, run.stderr
    why = {"nothing": "no answer to our", "stale bytes": "stale bytes instead of a"}[host_answers]
    assert f"{why} protocol header; sending our protocol header again" in run.stderr
    assert [m.body for m in broker.queues["c-queue"]] == [f"c{i}" for i in range(5)]
