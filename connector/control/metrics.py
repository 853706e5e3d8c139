"""An optional Prometheus endpoint: the control snapshot in the text exposition format.

Rendered from the very snapshot the control socket serves, so `qpid-virtio-status` and a
dashboard never disagree. The HTTP side is deliberately tiny (GET /metrics, one response,
close), because it runs on the daemon's loop beside the guests' traffic and a scraper is
its only client.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from connector.control.capacity import ConnectionCap
from connector.control.protocol import CHANNEL_STATES, StateSource
from connector.errors import ConfigError

log = logging.getLogger("connector.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "qpid_virtio"

# A scrape request is a request line and a few headers. Anything longer is not Prometheus,
# and reading it would let any local process grow the daemon's memory.
MAX_REQUEST_BYTES = 16 * 1024
# A scraper that has not sent its request and read the whole response in this long is
# dropped; on loopback a real one takes milliseconds.
REQUEST_TIMEOUT = 10.0
# Connections held at once. Prometheus opens one per scrape and we close it after the
# response, so even an HA pair of servers and an operator's curl need three. The port is
# TCP, open to any local user: without a cap, idle connections (each held REQUEST_TIMEOUT)
# use up the descriptors the guests' channels and the control socket need. One over the cap
# is closed at once.
MAX_CONNECTIONS = 8

# (name, type, help) of every metric, in output order. Counters end in _total.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("up", "gauge", "1 while the connector answers; the scrape failing says the rest."),
    ("info", "gauge", "Always 1; the connector's version is in its label."),
    ("start_time_seconds", "gauge", "Unix time the connector started."),
    ("channels", "gauge", "Channels of a guest's port in each state."),
    ("sessions", "gauge", "Sessions open now."),
    ("links", "gauge", "Routed links attached now."),
    ("guest_connections_total", "counter", "Guest AMQP connections accepted."),
    ("deliveries_total", "counter", "Deliveries routed; direction in = guest to broker."),
    ("bytes_total", "counter", "Message bytes routed; direction in = guest to broker."),
    ("discarded_bytes_total", "counter", "Bytes discarded while waiting for a header."),
    ("errors_total", "counter", "Errors by AMQP (or connector) condition."),
    ("upstream_reconnects_total", "counter", "Upstream connections opened after the first."),
    ("discovery_events_total", "counter", "Discovery events by kind."),
)

Labels = tuple[tuple[str, str], ...]


def parse_listen_address(text: str, option: str = "--metrics") -> tuple[str, int]:
    """``127.0.0.1:9187`` or ``[::1]:9187`` as (host, port); ConfigError naming ``option``."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(option, f"expected HOST:PORT (like 127.0.0.1:9187), got {text!r}")
    return host, int(port)


def render(snapshot: Mapping[str, Any]) -> str:
    """The snapshot as Prometheus text exposition format (version 0.0.4)."""
    samples: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))

    def add(name: str, labels: Labels, value: float) -> None:
        samples[name][labels] += value

    connector = snapshot["connector"]
    add("up", (), 1)
    add("info", (("version", connector["version"]),), 1)
    add("start_time_seconds", (), connector["started"])
    for entry in snapshot["channels"]:
        # Labels are guest and port, as an operator thinks of them. A guest restarted on a
        # new pty keeps its old, gone channel for a while; summing by (guest, port) keeps
        # one series per port instead of a duplicate that Prometheus would reject.
        key: Labels = (("guest", entry["guest"]), ("port", entry["port"]))
        detail = entry["detail"]
        for state in CHANNEL_STATES:
            add("channels", (*key, ("state", state)), entry["state"] == state)
        add("sessions", key, entry["sessions"])
        add("links", key, entry["links"])
        add("guest_connections_total", key, detail["guest_connections"])
        for direction in ("in", "out"):
            labels = (*key, ("direction", direction))
            add("deliveries_total", labels, entry[f"deliveries_{direction}"])
            add("bytes_total", labels, entry[f"bytes_{direction}"])
        add("discarded_bytes_total", key, entry["discarded_bytes"])
        for condition, count in detail["errors_by_condition"].items():
            add("errors_total", (*key, ("condition", condition)), count)
        add("upstream_reconnects_total", key, detail["upstream_reconnects"])
    for event, count in snapshot["discovery"].items():
        add("discovery_events_total", (("event", event),), count)
    return "".join(_family(name, kind, text, samples.get(name, {})) for name, kind, text in METRICS)


def _family(name: str, kind: str, text: str, series: Mapping[Labels, float]) -> str:
    full = f"{PREFIX}_{name}"
    lines = [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
    lines += [
        f"{full}{_labels(labels)} {_value(value)}" for labels, value in sorted(series.items())
    ]
    return "\n".join(lines) + "\n"


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{{{inner}}}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class MetricsServer:
    """Serves ``GET /metrics`` on ``host:port`` from ``source``'s snapshot.

    ``port`` 0 picks a free port; ``bound_port`` tells which after ``start()``.
    """

    def __init__(self, host: str, port: int, source: StateSource) -> None:
        self.host = host
        self.port = port
        self.source = source
        self._server: asyncio.base_events.Server | None = None
        self._cap = ConnectionCap(MAX_CONNECTIONS, f"metrics on {host}:{port}", log)

    @property
    def bound_port(self) -> int:
        """The port actually listened on."""
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen; ConfigError naming --metrics when the address cannot be bound."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            raise ConfigError(
                "--metrics", f"cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        log.info("metrics on http://%s:%d/metrics", self.host, self.bound_port)

    def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._cap.admit():
            writer.transport.abort()  # nothing to flush: the descriptor goes right away
            return
        try:
            # The whole exchange is bounded, the response's flush included: a scraper that
            # stops reading a large page holds its place no longer than one that never asks.
            await asyncio.wait_for(self._exchange(reader, writer), REQUEST_TIMEOUT)
        except (
            ConnectionError,
            TimeoutError,
            asyncio.LimitOverrunError,
            asyncio.IncompleteReadError,
        ):
            pass  # a broken or slow scraper; the next scrape tries again
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.transport.abort()  # closed already, unless the scraper stalled
            self._cap.release()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one request, write its response, and close once the response is sent."""
        status, body = await self._respond(reader)
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        writer.close()
        await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, bytes]:
        request = await reader.readuntil(b"\r\n\r\n")
        method, _, rest = request.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.split(" ", 1)[0]
        if method != "GET":
            return "405 Method Not Allowed", b"GET /metrics\n"
        if path.split("?", 1)[0] != "/metrics":
            return "404 Not Found", b"metrics are at /metrics\n"
        body = render(self.source.snapshot()).encode()
        return "200 OK", body
