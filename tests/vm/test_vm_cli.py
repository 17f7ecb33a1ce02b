"""The operator CLI outside Xen on the real stack: `iscsimple attach SPEC` logs in, builds the mirror and
prints the device; `iscsimple status` lists it; `iscsimple detach SPEC` undoes it. A bad spec is exit 2."""

from __future__ import annotations

import json

import pytest
from xldriver import CLI, Xl

pytestmark = pytest.mark.vm

IQN = "iqn.2026-11.test.local:cli"
LABEL = "cli-disk"
MIB = 8


def test_cli_attach_status_detach(bed):
    g, xl = bed.guest, Xl(bed)
    backing = bed.make_disk("cli-lun", MIB)
    local = bed.make_disk("cli-local", MIB)
    want = g.call("fill", path=backing, seed="cli-lun", length=MIB << 20)["sha256"]
    bed.export(IQN, {1: backing})
    xl.configure({LABEL: local})
    spec = f"lun1@{IQN}+{LABEL}"

    res = g.run([CLI, "attach", spec], timeout=60)
    device = res.stdout.strip()
    md = bed.md_name(LABEL)
    assert md is not None
    assert g.call("readlink", path=device)["real"] == f"/dev/{md}"
    assert list(bed.sessions()) == [IQN]
    bed.wait_in_sync(md)
    assert g.call("sha256", path=local)["sha256"] == want

    status = json.loads(g.run([CLI, "status", "--json"]).stdout)
    [disk] = status["disks"]
    assert (disk["label"], disk["md_device"], disk["running"]) == (LABEL, md, True)
    assert disk["flags"] == []
    table = g.run([CLI, "status"]).stdout
    assert LABEL in table and md in table

    bad = g.run([CLI, "attach", "lun1@not-an-iqn+x"], check=False)
    assert bad.rc == 2, str(bad)

    res = g.run([CLI, "detach", spec], timeout=60)
    assert g.glob(f"/sys/block/{md}") == []
    assert bed.sessions() == {}
    status = json.loads(g.run([CLI, "status", "--json"]).stdout)
    assert status["disks"] == []
