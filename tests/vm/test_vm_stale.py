"""Data safety on the real stack (docs/data-safety.md, "refuse at attach"): the VM writes during an outage, only the
local leg gets those writes, and the VM is then stopped (`remove`) before the mirror healed. The next
`add` must refuse to build the array from the stale iSCSI copy and leave the local leg untouched;
`iscsimple resolve LABEL --keep local` makes the local copy the source, after which the LUN holds the
outage-time writes and a normal attach serves them."""

from __future__ import annotations

import json

import pytest
from captures import save_capture
from xldriver import CLI, Vbd, Xl

pytestmark = pytest.mark.vm

IQN = "iqn.2026-11.test.local:stale"
LABEL = "stale-disk"
MIB = 8


def test_stale_iscsi_copy_is_refused_then_resolved_keeping_local_writes(bed, tmp_path):
    g, xl = bed.guest, Xl(bed)
    backing = bed.make_disk("stale-lun", MIB)
    local = bed.make_disk("stale-local", MIB)
    g.call("fill", path=backing, seed="stale-before", length=MIB << 20)
    bed.export(IQN, {1: backing})
    xl.configure({LABEL: local}, "replacement_timeout_mirrored = 5\n[heal]\nenabled = false\n")
    vbd = Vbd(20, 51712)
    res = xl.add(vbd, f"lun1@{IQN}+{LABEL}")
    assert res.rc == 0, str(res)
    md = bed.md_name(LABEL)
    sd = bed.lun_device(IQN, 1)[5:]
    bed.wait_in_sync(md)

    # Outage, and the VM writes: the write stalls for the replacement timeout, then lands locally only.
    bed.kill_target()
    written = g.call("fill", wait=120, path=f"/dev/md/{LABEL}", seed="stale-during-outage", length=1 << 20)
    assert "faulty" in bed.md_legs(md)[sd]
    assert g.call("sha256", path=local, length=1 << 20)["sha256"] == written["sha256"]
    g.wait_for(bed.session(IQN) + "/state", "equals", "FREE", timeout=30)
    save_capture(bed, "04_outage_iscsi_leg_faulty_local_only", tmp_path)

    # The VM stops before anything healed the mirror: remove records the stale copy.
    res = xl.remove(vbd)
    assert res.rc == 0, str(res)
    assert g.glob(f"/sys/block/{md}") == []
    record = json.loads(g.read(f"/var/lib/iscsimple/stale/{LABEL}.json"))
    # Dated by the kernel's own line of md failing the leg, not by when remove looked.
    assert record["since_source"].startswith(f"kernel log: md/raid1:{md}: Disk failure on {sd}"), record
    assert record["since"] < record["recorded"] - 1, record
    local_sum = g.call("sha256", path=local)["sha256"]

    # The filer is back; the VM is started again. Building from iSCSI would lose the writes: refused.
    bed.start_target()
    vbd = Vbd(21, 51712)
    res = xl.add(vbd, f"lun1@{IQN}+{LABEL}")
    assert res.rc == 1, str(res)
    error = xl.keys(vbd)["hotplug-error"]
    assert "iscsimple resolve" in error and LABEL in error, error
    assert g.glob("/sys/block/md*") == []
    assert g.call("sha256", path=local)["sha256"] == local_sum, "the refused add touched the local leg"

    # The operator keeps the local copy: the LUN recovers from it, the record goes.
    res = g.run([CLI, "resolve", LABEL, "--keep", "local", "--wait", "120"], timeout=180)
    assert g.read(f"/var/lib/iscsimple/stale/{LABEL}.json") is None, res.stdout
    assert g.glob("/sys/block/md*") == [], "resolve leaves no array running"
    assert g.call("sha256", path=backing)["sha256"] == local_sum
    assert g.call("sha256", path=backing, length=1 << 20)["sha256"] == written["sha256"]

    # Now the normal attach works and serves the outage-time writes.
    res = xl.add(vbd, f"lun1@{IQN}+{LABEL}")
    assert res.rc == 0, str(res)
    assert g.call("sha256", path=f"/dev/md/{LABEL}", length=1 << 20)["sha256"] == written["sha256"]
    res = xl.remove(vbd)
    assert res.rc == 0, str(res)
    assert bed.sessions() == {}
