"""The cap on a server's open clients, and how it tells the operator it is refusing some."""

from __future__ import annotations

import logging

import pytest

from connector.control import capacity
from connector.control.capacity import ConnectionCap


def test_admits_up_to_the_limit_and_frees_a_place_on_release() -> None:
    cap = ConnectionCap(2, "test server", logging.getLogger("test.capacity"))
    assert [cap.admit(), cap.admit(), cap.admit()] == [True, True, False]
    cap.release()
    assert cap.admit() is True
    assert cap.open == 2


def test_a_flood_is_logged_now_and_then_with_its_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(capacity.time, "monotonic", lambda: clock[0])
    cap = ConnectionCap(1, "metrics on 127.0.0.1:9187", logging.getLogger("test.capacity"))
    assert cap.admit()
    with caplog.at_level(logging.WARNING, "test.capacity"):
        for _ in range(50):
            assert not cap.admit()
        clock[0] += capacity.WARN_INTERVAL_S
        assert not cap.admit()
    prefix = "metrics on 127.0.0.1:9187: at its limit of 1 open clients; closed"
    assert [r.getMessage() for r in caplog.records] == [
        f"{prefix} 1 new one(s) at once",
        f"{prefix} 50 new one(s) at once",
    ]
