"""A sample connector for tests, the docs' examples and trying the status tool.

``sample_snapshot()`` is a consistent snapshot: its counters add up from its links the way
the daemon's must, so a test that checks a rendered sum checks something true.
``ServedState`` runs the real ControlServer (and optionally the MetricsServer) on a loop of
its own in a thread, for a caller that is itself blocking (a CLI test, a demo).
``python -m connector.control.sample SOCKET [HOST:PORT]`` serves the sample until ^C.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

from connector.control.metrics import MetricsServer, parse_listen_address
from connector.control.protocol import (
    PROTOCOL_VERSION,
    ChannelEntry,
    ChannelState,
    ErrorEntry,
    Link,
    Snapshot,
)
from connector.control.server import ControlServer


def sample_channel(
    guest: str,
    path: str,
    *,
    state: ChannelState = "connected",
    kind: str = "unix",
    port: str = "org.qpid.amqp.0",
    since: float,
    links: list[Link] | None = None,
    errors: list[ErrorEntry] | None = None,
    uuid: str | None = None,
    pid: int | None = None,
    upstream_url: str | None = "amqp://127.0.0.1:5672",
    container_id: str | None = None,
    local_address: str | None = None,
) -> ChannelEntry:
    """A consistent channel entry for tests and docs: counters add up from its links."""
    links = links or []
    errors = errors or []
    connected = state == "connected"
    by_condition: dict[str, int] = {}
    for err in errors:
        by_condition[err["condition"]] = by_condition.get(err["condition"], 0) + 1
    sessions = sorted({lk["session"] for lk in links})
    inbound = [lk for lk in links if lk["direction"] == "in"]
    outbound = [lk for lk in links if lk["direction"] == "out"]
    return {
        "guest": guest,
        "port": port,
        "kind": kind,
        "path": path,
        "state": state,
        "since": since,
        "upstream": upstream_url if connected else None,
        "sessions": len(sessions),
        "links": len(links),
        "deliveries_in": sum(lk["deliveries"] for lk in inbound),
        "deliveries_out": sum(lk["deliveries"] for lk in outbound),
        "bytes_in": sum(lk["bytes"] for lk in inbound),
        "bytes_out": sum(lk["bytes"] for lk in outbound),
        "discarded_bytes": 0,
        "last_error": (
            f"{errors[-1]['condition']}: {errors[-1]['description']}" if errors else None
        ),
        "detail": {
            "identity": {"name": guest, "uuid": uuid, "pid": pid, "found_by": "config"},
            "upstream": {
                "url": upstream_url if connected else None,
                "container_id": container_id if connected else None,
                "state": "open" if connected else ("failed" if state == "error" else "idle"),
                "local_address": local_address if connected else None,
            },
            "sessions": [
                {"channel": s, "links": sum(1 for lk in links if lk["session"] == s)}
                for s in sessions
            ],
            "links": links,
            "errors": errors,
            "errors_by_condition": by_condition,
            "upstream_reconnects": 0,
            "guest_connections": 1 if connected else 0,
        },
    }


def sample_snapshot(now: float | None = None) -> Snapshot:
    """A snapshot with a guest in each state, for tests and the documentation's examples."""
    now = time.time() if now is None else now
    web_links: list[Link] = [
        {
            "session": 0,
            "name": "web1-sender-orders",
            "direction": "in",
            "address": "orders",
            "credit": 100,
            "unsettled": 2,
            "deliveries": 1500,
            "bytes": 1536000,
        },
        {
            "session": 0,
            "name": "web1-receiver-replies",
            "direction": "out",
            "address": "replies.web1",
            "credit": 10,
            "unsettled": 0,
            "deliveries": 1498,
            "bytes": 299600,
        },
    ]
    db_error: ErrorEntry = {
        "time": now - 42,
        "condition": "amqp:connection:forced",
        "description": "upstream amqp://127.0.0.1:5672: connection refused",
    }
    return {
        "version": PROTOCOL_VERSION,
        "connector": {
            "pid": 4242,
            "started": now - 3600,
            "version": "0.1.0",
            "upstream_urls": ["amqp://127.0.0.1:5672"],
        },
        "channels": [
            sample_channel(
                "web1",
                "/run/qpid-virtio/web1.sock",
                since=now - 754,
                links=web_links,
                uuid="5b2f0a8e-3c1d-4f7a-9e61-0c2b8d4e7f10",
                pid=3101,
                container_id="web1-app",
                local_address="127.0.0.1:40112",
            ),
            sample_channel("batch", "/dev/pts/7", kind="pty", state="waiting", since=now - 12),
            sample_channel(
                "db", "/run/qpid-virtio/db.sock", state="error", since=now - 42, errors=[db_error]
            ),
            sample_channel(
                "old",
                "/run/qpid-virtio/old.sock",
                kind="unix-listen",
                state="gone",
                since=now - 90000,
            ),
        ],
        "discovery": {"appeared": 4, "gone": 1},
    }


class ServedState:
    """A StateSource whose snapshot a test may replace, served on a thread's own loop.

    Use as a context manager: on entry the control socket (and the metrics port, when
    ``metrics`` is given) is listening; on exit both are closed and the thread joined.
    """

    def __init__(
        self,
        path: str,
        snapshot: Snapshot | dict[str, Any],
        mode: int = 0o600,
        group: str | None = None,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        self.state: Snapshot | dict[str, Any] = snapshot
        self.control = ControlServer(path, self, mode, group)
        self.metrics = MetricsServer(*metrics, self) if metrics else None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def snapshot(self) -> Snapshot | dict[str, Any]:
        """A copy, so a reply being encoded never sees a test's later change."""
        return copy.deepcopy(self.state)

    def __enter__(self) -> ServedState:
        self._thread.start()
        started: Future[None] = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            started.result()
        except BaseException:
            self.__exit__()
            raise
        return self

    async def _start(self) -> None:
        await self.control.start()
        if self.metrics is not None:
            await self.metrics.start()

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self.control.close()
            if self.metrics is not None:
                self.metrics.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def main(argv: list[str]) -> None:
    """Serve the sample snapshot on a control socket (and metrics) until interrupted."""
    metrics = parse_listen_address(argv[1]) if len(argv) > 1 else None
    with ServedState(argv[0], sample_snapshot(), metrics=metrics) as served:
        where = f" and http://{argv[1]}/metrics" if served.metrics else ""
        print(f"serving a sample connector state on {argv[0]}{where}; ^C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
