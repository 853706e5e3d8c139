"""The systemd unit is one systemd itself accepts (where systemd-analyze is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[2] / "broker-conf" / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    unit = (CONF / "qpid-virtio-connector.service").read_text()
    # Verify the unit as installed: its ExecStart and qpidd.service must exist for that.
    exe = tmp_path / "qpid-virtio-connector"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (tmp_path / "qpidd.service").write_text("[Service]\nExecStart=/bin/true\n")
    target = tmp_path / "qpid-virtio-connector.service"
    target.write_text(unit.replace("/usr/bin/qpid-virtio-connector", str(exe)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(target)],
        capture_output=True,
        text=True,
        env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "qpid-virtio-connector.service" in line
    ]
    assert problems == [], problems


def test_the_unit_runs_as_a_non_root_user_with_named_capabilities() -> None:
    unit = (CONF / "qpid-virtio-connector.service").read_text()
    assert "User=qpid-virtio" in unit
    assert "User=root" not in unit
    assert "AmbientCapabilities=CAP_SYS_PTRACE CAP_DAC_OVERRIDE CAP_NET_ADMIN" in unit
    sysusers = (CONF / "qpid-virtio-connector.sysusers").read_text()
    assert "u qpid-virtio " in sysusers
