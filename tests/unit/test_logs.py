"""The daemon's log: one line per event, naming the guest, whatever the guest chose."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterator

import pytest

from connector import logs


@pytest.fixture
def log_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[str]]]:
    """The lines the daemon's log set-up writes, as stderr would show them."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup("info")
    try:
        yield lambda: err.getvalue().splitlines()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_a_line_names_the_guest_and_its_port(log_lines: Callable[[], list[str]]) -> None:
    logs.guest_logger("web1", "org.qpid.amqp.0").info("attached %s", "q1")
    (line,) = log_lines()
    assert line.endswith("INFO guest web1/org.qpid.amqp.0: attached q1")


def test_names_and_text_from_guests_cannot_forge_lines(log_lines: Callable[[], list[str]]) -> None:
    # A VM's name and port come from whoever started qemu; link names, addresses and error
    # descriptions from the guest. A newline or an escape in any of them stays in its line.
    forged = "x\nERROR connector: broker credentials leaked\x1b[2J"
    logs.guest_logger(f"vm{forged}", f"port{forged}").warning("detach: %s", forged)
    logging.getLogger("connector").info(f"a message built with {forged}")
    lines = log_lines()
    assert len(lines) == 2, lines
    assert all(line.isprintable() for line in lines), lines
    assert "vmx\\nERROR" in lines[0] and "portx\\nERROR" in lines[0]
    assert lines[1].endswith(
        "a message built with x\\nERROR connector: broker credentials leaked\\x1b[2J"
    )


def test_a_traceback_still_spans_lines(log_lines: Callable[[], list[str]]) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logs.guest_logger("web1", "p").exception("internal error while serving this channel")
    lines = log_lines()
    assert lines[0].endswith("guest web1/p: internal error while serving this channel")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"
