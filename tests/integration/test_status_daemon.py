"""qpid-virtio-status against a running qpid-virtio-connector with channels in every state.

One daemon, four channels, a real Artemis:
  web1      unix-listen  a guest connected through it, with a sender and a receiver
  idle      unix         qemu listens, its guest never opens       -> waiting
  vm-gone   pty          the pty's master closed (qemu exited)     -> gone
  broken    pty          the path is a directory, not a pty        -> error
Each command's real output is checked for content, the JSON for its documented keys, the
metrics endpoint is scraped, and --broker-check asks Artemis.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connector.control.protocol import ROW_KEYS
from tests.brokers.common import free_port
from tests.support.connector import Connector, Qemu, wait_for

pytest.importorskip("connector.daemon", reason="needs the daemon (connector/daemon.py)")
GuestClient = pytest.importorskip("connector.guest").GuestClient

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
# State changes follow an event on a channel within a loop iteration or two.
STATE_TIMEOUT = 30.0
SENT = 5
QUEUE = "status.test"
WANT = {"web1": "connected", "idle": "waiting", "vm-gone": "gone", "broken": "error"}


@dataclass
class Running:
    """The daemon under test and what the test holds of its channels."""

    daemon: Connector
    metrics_port: int
    broker_url: str

    def status(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NO_COLOR", None)
        return subprocess.run(
            [sys.executable, "-m", "connector.status", "--control-socket", self.daemon.control,
             *argv],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip


def states(daemon: Connector) -> dict[str, str]:
    snap = daemon.snapshot()
    return {c["guest"]: c["state"] for c in snap["channels"]} if snap else {}


@pytest.fixture(scope="module")
def running(artemis: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    work = tmp_path_factory.mktemp("status-daemon")
    (work / "not-a-pty").mkdir()
    web1 = Qemu("unix-listen", work, "web1")  # the test connects as qemu (server=off)
    idle = Qemu("unix", work, "idle")  # qemu listens; its guest never opens the port
    gone = Qemu("pty", work, "vm-gone")
    metrics_port = free_port()
    daemon = Connector(
        work, artemis, [web1, idle, gone],
        "--channel", f"pty:{work / 'not-a-pty'},guest=broken",
        "--metrics", f"127.0.0.1:{metrics_port}",
    ).start()  # fmt: skip
    guest = None
    try:
        daemon.wait_state("vm-gone", "waiting")
        gone.hang_up()  # qemu exits: the pty's far end is gone
        guest = GuestClient(web1.fd(), container_id="web1-app", timeout=30)
        guest.send(QUEUE, [f"hello {i}" for i in range(SENT)])
        guest.receive(QUEUE, 2)
        wait_for(lambda: states(daemon) == WANT, STATE_TIMEOUT, f"states {WANT}")
        yield Running(daemon, metrics_port, artemis.url)
    finally:
        if guest is not None:
            guest.close()
        daemon.stop()
        for qemu in (web1, idle, gone):
            qemu.hang_up()


def test_channels_table(running: Running) -> None:
    result = running.status()
    assert result.returncode == 1, result.stderr  # broken is in error
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["GUEST", "PORT", "KIND", "STATE"]
    rows = {line.split()[0]: re.split(r"\s{2,}", line) for line in lines[1:]}
    assert list(rows) == ["broken", "idle", "vm-gone", "web1"]  # sorted by guest
    web1 = rows["web1"]
    assert web1[1:4] == ["org.qpid.amqp.0", "unix-listen", "connected"]
    # links: the guest's sender and its receiver; 5 in, 2 out
    assert web1[5:8] == ["2", str(SENT), "2"]
    assert rows["vm-gone"][3] == "gone" and rows["idle"][3] == "waiting"
    assert rows["broken"][3] == "error"
    wide = running.status("--wide").stdout
    broken = next(line for line in wide.splitlines() if line.startswith("broken"))
    assert re.search(r"not-a-pty: Is a directory$", broken), broken


def test_channels_json(running: Running) -> None:
    doc = json.loads(running.status("--json").stdout)
    assert list(doc) == ["channels"]
    assert all(list(row) == list(ROW_KEYS) for row in doc["channels"])
    web1 = next(r for r in doc["channels"] if r["guest"] == "web1")
    assert web1["upstream"] == running.broker_url
    assert (web1["deliveries_in"], web1["deliveries_out"], web1["links"]) == (SENT, 2, 2)
    assert web1["sessions"] in (1, 2)  # the guest client may open a session per link
    assert web1["bytes_in"] > 0


def test_guest_detail(running: Running) -> None:
    result = running.status("guest", "web1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "found by    config" in out
    assert f"upstream    {running.broker_url} (open), container-id web1-app" in out
    assert re.search(rf"in →broker\s+{QUEUE}\s+\S+\s+\d+\s+0\s+{SENT}\s", out), out
    assert re.search(rf"out →guest\s+{QUEUE}\s+\S+\s+\d+\s+\d+\s+2\s", out), out
    broken = running.status("guest", "broken")
    assert broken.returncode == 1
    assert "state       error for" in broken.stdout and "recent errors:" in broken.stdout


def test_links(running: Running) -> None:
    result = running.status("links", "--json")
    links = json.loads(result.stdout)["links"]
    assert {(lk["guest"], lk["direction"], lk["address"]) for lk in links} == {
        ("web1", "in", QUEUE),
        ("web1", "out", QUEUE),
    }


def test_broker_check_finds_web1_on_artemis(running: Running) -> None:
    result = running.status("--broker-check")
    assert "broker check against" in result.stdout and "(artemis): 1 listed, 0 missing" \
        in result.stdout, result.stdout  # fmt: skip
    web1 = next(line for line in result.stdout.splitlines() if line.startswith("web1"))
    assert "  listed  " in web1


def test_metrics(running: Running) -> None:
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
    web1 = 'guest="web1",port="org.qpid.amqp.0"'
    assert f'qpid_virtio_deliveries_total{{{web1},direction="in"}} {SENT}' in body
    assert f'qpid_virtio_channels{{{web1},state="connected"}} 1' in body
    assert 'qpid_virtio_channels{guest="broken",port="org.qpid.amqp.0",state="error"} 1' in body
