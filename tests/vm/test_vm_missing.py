"""Scenario 3: a `MISSING` leg on either side gives a working single-leg array; both missing is refused.

- tab entry `LABEL MISSING`: the array has the iSCSI leg only;
- spec `MISSING+LABEL`: no iSCSI at all, the array has the local leg only (no session);
- both: `add` fails with a hotplug-error and leaves nothing behind.
"""

from __future__ import annotations

import pytest
from captures import save_capture
from xldriver import Vbd, Xl

pytestmark = pytest.mark.vm

IQN = "iqn.2026-11.test.local:missing"
MIB = 8


def test_missing_local_leg_and_missing_iscsi_leg_work_both_missing_is_refused(bed, tmp_path):
    g, xl = bed.guest, Xl(bed)
    lun = bed.make_disk("missing-lun", MIB)
    local = bed.make_disk("missing-local", MIB)
    bed.export(IQN, {1: lun})
    xl.configure({"no-local": "MISSING", "no-iscsi": local, "nothing": "MISSING"})

    # The local leg MISSING: the iSCSI leg alone, still write-mostly as specified.
    only_iscsi = Vbd(4, 51712)
    res = xl.add(only_iscsi, f"lun1@{IQN}+no-local")
    assert res.rc == 0, str(res)
    sd = bed.lun_device(IQN, 1)[5:]
    md_iscsi = bed.md_name("no-local")
    assert bed.md_legs(md_iscsi) == {sd: "in_sync,write_mostly"}
    assert g.read(f"/sys/block/{md_iscsi}/md/degraded").strip() == "1"
    # It works: what the VM writes lands on the LUN.
    written = g.call("fill", path="/dev/md/no-local", seed="through-md-iscsi", length=1 << 20)["sha256"]
    assert g.call("sha256", path=lun, length=1 << 20)["sha256"] == written

    # The iSCSI leg MISSING: no login at all, the local leg alone.
    only_local = Vbd(4, 51728)
    res = xl.add(only_local, "MISSING+no-iscsi")
    assert res.rc == 0, str(res)
    md_local = bed.md_name("no-iscsi")
    assert bed.md_legs(md_local) == {local[5:]: "in_sync"}
    written = g.call("fill", path="/dev/md/no-iscsi", seed="through-md-local", length=1 << 20)["sha256"]
    assert g.call("sha256", path=local, length=1 << 20)["sha256"] == written
    assert list(bed.sessions()) == [IQN]  # only the first array's session
    save_capture(bed, "03_missing_local_leg_and_missing_iscsi_leg", tmp_path)

    # Both MISSING: refused, with a reason, and nothing built.
    neither = Vbd(5, 51712)
    res = xl.add(neither, "MISSING+nothing")
    assert res.rc == 1, str(res)
    keys = xl.keys(neither)
    assert keys["hotplug-status"] == "error"
    assert "MISSING" in keys["hotplug-error"], keys
    assert bed.md_name("nothing") is None
    assert len(g.glob("/sys/block/md*")) == 2

    for vbd in (only_iscsi, only_local):
        res = xl.remove(vbd)
        assert res.rc == 0, str(res)
    assert g.glob("/sys/block/md*") == []
    assert bed.sessions() == {}
