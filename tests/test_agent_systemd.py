"""The systemd unit: hardened, and valid for systemd itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "iscsimple-agent.service"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_is_hardened():
    d = directives()
    assert d["ProtectSystem"] == ["strict"]
    assert "/var/lib/iscsimple" in d["ReadWritePaths"]
    assert d["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"]  # mdadm's ioctls for heal, nothing else
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelModules", "RestrictNamespaces"):
        assert d[key] == ["yes"], key
    assert "AF_NETLINK" in d["RestrictAddressFamilies"][0]  # udev events
    assert d["ExecStart"][0].split()[0].endswith("/iscsimple-agent")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path):
    agent = Path(sys.executable).parent / "iscsimple-agent"
    if not agent.exists():
        agent = Path(shutil.which("true"))
    unit = tmp_path / "iscsimple-agent.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/iscsimple-agent", str(agent)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "iscsimple-agent.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
