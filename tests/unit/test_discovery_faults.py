"""One VM that discovery fails on must cost only that VM: the others in the same scan or
batch of events are still found, and the failure is logged with the guest it concerns.

A fake /proc names two live processes (this test and its parent, so their pidfds are
real and never fire) as qemu; resolving the first one is made to fail.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import connector.discovery
from connector.discovery.resolve import Resolution
from connector.discovery.settings import DiscoverySettings
from tests.unit.test_discovery_reports import PORT, Sink, scan_settings, start_and_stop
from tests.unit.test_discovery_resolve import QEMU, FakeProc


def _argv(name: str) -> list[str]:
    return [
        "qemu", "-name", f"guest={name}",
        "-chardev", f"socket,id=c0,path=/run/{name}.sock,server=off",
        "-device", f"virtserialport,chardev=c0,name={PORT}",
    ]  # fmt: skip


def test_a_process_discovery_fails_on_costs_only_that_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    proc = FakeProc(tmp_path / "proc")
    first, second = sorted((os.getpid(), os.getppid()))  # the scan goes in pid order
    proc.process(first, QEMU, _argv("broken"))
    proc.process(second, QEMU, _argv("fine"))
    real_resolve = connector.discovery.resolve_pid

    def resolve(pid: int, settings: DiscoverySettings) -> Resolution:
        if pid == first:
            raise RuntimeError("a bug discovery has not met yet")
        return real_resolve(pid, settings)

    monkeypatch.setattr(connector.discovery, "resolve_pid", resolve)
    sink = Sink()
    stats = start_and_stop(scan_settings(proc.root, ()), sink)
    assert list(sink.live) == ["/run/fine.sock"]
    assert stats["errors"] == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "broken" in error and str(first) in error
