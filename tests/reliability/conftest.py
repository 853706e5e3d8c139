"""The reliability suite's report: every fault and bad input tried, what the connector did,
and the message counts, written as JSON and printed as the table docs/reliability.md shows.

Tests add rows through the ``report`` fixture. At the end of the session the rows go to
``<pytest basetemp>/reliability-last-run.json`` (or $QVC_RELIABILITY_REPORT) and the table
is printed in the terminal summary, so the doc's numbers can be pasted from a real run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.reliability import rig

COUNT_KEYS = ("sent", "accepted", "received", "lost", "duplicated")


@dataclass
class Row:
    """One fault or bad input and its result."""

    case: str
    connector_did: str
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    """Rows in the order the tests ran."""

    rows: list[Row] = field(default_factory=list)

    def add(self, case: str, connector_did: str, **counts: int) -> None:
        """Record one case; counts use COUNT_KEYS (omit those that do not apply)."""
        self.rows.append(Row(case, connector_did, counts))

    def table(self) -> str:
        """A markdown table of the rows."""
        head = ["case", "what the connector did", *COUNT_KEYS]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            counts = [str(row.counts[k]) if k in row.counts else "" for k in COUNT_KEYS]
            lines.append("| " + " | ".join([row.case, row.connector_did, *counts]) + " |")
        return "\n".join(lines)


REPORT = Report()


@pytest.fixture(scope="session")
def report() -> Report:
    """The session's reliability report."""
    return REPORT


def _path(config: pytest.Config) -> Path:
    env = os.environ.get("QVC_RELIABILITY_REPORT")
    if env:
        return Path(env)
    return Path(str(config._tmp_path_factory.getbasetemp())) / "reliability-last-run.json"  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Write the JSON and print the table, when any reliability test added to it."""
    if not REPORT.rows and not rig.STATS:
        return
    path = _path(config)
    path.write_text(
        json.dumps({"rows": [asdict(r) for r in REPORT.rows], "fuzz": dict(rig.STATS)}, indent=2)
    )
    tr = terminalreporter
    tr.section("reliability report")
    tr.write_line(REPORT.table())
    if rig.STATS:
        tr.write_line("")
        tr.write_line("fuzz inputs, by how the guest connection ended:")
        for key, n in sorted(rig.STATS.items(), key=lambda kv: -kv[1]):
            tr.write_line(f"  {n:6d}  {key}")
    tr.write_line(f"written to {path}")
