"""The Prometheus endpoint: scraped over HTTP, parsed, and checked against the snapshot."""

from __future__ import annotations

import contextlib
import copy
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from connector.control import metrics as metrics_module
from connector.control.metrics import parse_listen_address, render
from connector.control.sample import ServedState, sample_snapshot
from connector.errors import ConfigError
from tests.support.connector import wait_for

NOW = 1_800_000_000.0

# One sample line of the text format: name, optional {labels}, value.
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
ESCAPE = re.compile(r"\\(.)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Series, dict[str, str]]:
    """Samples by (name, labels), and each family's TYPE; fails on any malformed line."""
    series: Series = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        match = SAMPLE.match(line)
        assert match, f"not exposition format: {line!r}"
        name, labels, value = match.groups()
        pairs = frozenset(
            (k, ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), v))
            for k, v in LABEL.findall(labels or "")
        )
        key = (name, pairs)
        assert key not in series, f"duplicate series {key}"
        assert name in types or name.rsplit("_", 1)[0] in types, f"no TYPE for {name}"
        series[key] = float(value)
    return series, types


def labels(**kv: str) -> frozenset[tuple[str, str]]:
    return frozenset(kv.items())


def scrape(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_scraped_metrics_match_the_snapshot(tmp_path: Path) -> None:
    snap = sample_snapshot(NOW)
    with ServedState(str(tmp_path / "c.sock"), snap, metrics=("127.0.0.1", 0)) as served:
        assert served.metrics is not None
        base = f"http://127.0.0.1:{served.metrics.bound_port}"
        status, ctype, body = scrape(base + "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        series, types = parse(body)
        web1 = {"guest": "web1", "port": "org.qpid.amqp.0"}
        assert series[("qpid_virtio_channels", labels(**web1, state="connected"))] == 1
        assert series[("qpid_virtio_channels", labels(**web1, state="error"))] == 0
        db = {"guest": "db", "port": "org.qpid.amqp.0"}
        assert series[("qpid_virtio_channels", labels(**db, state="error"))] == 1
        assert series[("qpid_virtio_deliveries_total", labels(**web1, direction="in"))] == 1500
        assert series[("qpid_virtio_deliveries_total", labels(**web1, direction="out"))] == 1498
        assert series[("qpid_virtio_bytes_total", labels(**web1, direction="in"))] == 1536000
        assert series[("qpid_virtio_links", labels(**web1))] == 2
        assert (
            series[("qpid_virtio_errors_total", labels(**db, condition="amqp:connection:forced"))]
            == 1
        )
        assert series[("qpid_virtio_discovery_events_total", labels(event="appeared"))] == 4
        assert series[("qpid_virtio_start_time_seconds", frozenset())] == NOW - 3600
        assert types["qpid_virtio_deliveries_total"] == "counter"
        assert types["qpid_virtio_channels"] == "gauge"
        # the same snapshot, the same numbers: a second scrape after a change follows it
        next(c for c in served.state["channels"] if c["guest"] == "web1")["deliveries_in"] += 7
        series2, _ = parse(scrape(base + "/metrics")[2])
        assert series2[("qpid_virtio_deliveries_total", labels(**web1, direction="in"))] == 1507

        assert scrape(base + "/")[0] == 404
        assert scrape(base + "/metrics?x=1")[0] == 200


def test_a_junk_request_does_not_hurt_the_endpoint(tmp_path: Path) -> None:
    with ServedState(
        str(tmp_path / "c.sock"), sample_snapshot(NOW), metrics=("127.0.0.1", 0)
    ) as served:
        assert served.metrics is not None
        port = served.metrics.bound_port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as junk:
            junk.sendall(b"POST /metrics HTTP/1.1\r\n\r\n")
            assert junk.recv(100).startswith(b"HTTP/1.1 405")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as junk:
            junk.sendall(b"GET " + b"a" * 20000)  # no end of headers, past the limit
            assert junk.recv(100) == b""  # dropped
        assert scrape(f"http://127.0.0.1:{port}/metrics")[0] == 200


def test_connections_over_the_cap_are_closed_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle connections hold at most MAX_CONNECTIONS descriptors; one more is closed long
    before REQUEST_TIMEOUT, and a place freed serves the next scrape."""
    monkeypatch.setattr(metrics_module, "MAX_CONNECTIONS", 2)
    with ServedState(
        str(tmp_path / "c.sock"), sample_snapshot(NOW), metrics=("127.0.0.1", 0)
    ) as served:
        assert served.metrics is not None
        port = served.metrics.bound_port
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            with socket.create_connection(("127.0.0.1", port)) as over:
                over.settimeout(metrics_module.REQUEST_TIMEOUT / 2)
                # closed with nothing said: a reset is as good as an end
                with contextlib.suppress(ConnectionResetError):
                    assert over.recv(100) == b""
            idle[0].close()
            url = f"http://127.0.0.1:{port}/metrics"
            wait_for(lambda: _scrape_status(url) == 200, 10, "a place to free up")
        finally:
            for sock in idle:
                sock.close()


def _scrape_status(url: str) -> int | None:
    try:
        return scrape(url)[0]
    except (OSError, urllib.error.URLError):
        return None


def test_one_series_per_guest_and_port_even_with_a_gone_twin() -> None:
    snap = sample_snapshot(NOW)
    web1 = snap["channels"][0]
    twin = copy.deepcopy(web1)
    twin.update(path="/dev/pts/3", state="gone", deliveries_in=10)
    snap["channels"].append(twin)
    series, _ = parse(render(snap))
    key = {"guest": "web1", "port": "org.qpid.amqp.0"}
    assert series[("qpid_virtio_deliveries_total", labels(**key, direction="in"))] == 1510
    assert series[("qpid_virtio_channels", labels(**key, state="connected"))] == 1
    assert series[("qpid_virtio_channels", labels(**key, state="gone"))] == 1


def test_label_values_are_escaped() -> None:
    snap = sample_snapshot(NOW)
    snap["channels"][0]["guest"] = 'we"ird\\name\nx'
    series, _ = parse(render(snap))
    assert ("qpid_virtio_links", labels(guest='we"ird\\name\nx', port="org.qpid.amqp.0")) in series


def test_parse_listen_address() -> None:
    assert parse_listen_address("127.0.0.1:9187") == ("127.0.0.1", 9187)
    assert parse_listen_address("[::1]:9187") == ("::1", 9187)
    for bad in ("9187", "127.0.0.1:", ":9187", "host:99999", "host:http"):
        with pytest.raises(ConfigError, match="expected HOST:PORT"):
            parse_listen_address(bad)
