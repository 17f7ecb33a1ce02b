"""The storage stack itself, with plain commands: what the project builds on behaves as captured in
../shared/fixtures/kernel-6.1-raid1-iscsi (login, build, recover from iSCSI, outage -> FAILED -> FREE,
iSCSI leg faulty, writes carry on on the local leg)."""

from __future__ import annotations

import pytest
from captures import save_capture
from conftest import record

IQN = "iqn.2026-11.test.local:stack"
MIB = 8

pytestmark = pytest.mark.vm


def test_mirror_recovers_from_iscsi_and_survives_an_outage(bed, tmp_path):
    g = bed.guest
    backing = bed.make_disk("stack-iscsi", MIB)
    local = bed.make_disk("stack-local", MIB)
    g.call("fill", path=backing, seed="iscsi", length=MIB << 20)
    want = g.call("fill", path=local, seed="stale-local", length=MIB << 20)
    bed.export(IQN, {1: backing})
    bed.discover_and_login(IQN, replacement_timeout=5)

    session = bed.session(IQN)
    assert g.read(session + "/state").strip() == "LOGGED_IN"
    sd = bed.lun_device(IQN, 1)
    assert sd is not None, "LUN 1 has no block device under its session"
    iscsi_sum = g.call("sha256", path=sd)["sha256"]
    assert iscsi_sum == g.call("sha256", path=backing)["sha256"]

    g.run(
        [
            "mdadm",
            "--build",
            "/dev/md/stack",
            "--level=1",
            "--raid-devices=2",
            "missing",
            "--write-mostly",
            sd,
        ]
    )
    md = bed.md_name("stack")
    assert md is not None and md.startswith("md")
    assert g.read(f"/sys/block/{md}/md/degraded").strip() == "1"
    assert bed.md_legs(md) == {sd[5:]: "in_sync,write_mostly"}

    g.run(["mdadm", "/dev/md/stack", "--add", local])
    bed.wait_in_sync(md)
    legs = bed.md_legs(md)
    assert legs == {sd[5:]: "in_sync,write_mostly", local[5:]: "in_sync"}
    # The local leg recovered *from* iSCSI: its old content is gone.
    local_sum = g.call("sha256", path=local)["sha256"]
    assert local_sum == iscsi_sum != want["sha256"]
    save_capture(bed, "stack_in_sync", tmp_path, keep=False)  # checked against core's live reading

    # Outage: with no I/O, md does not notice; the session fails at once.
    killed = bed.kill_target()
    failed = g.wait_for(session + "/state", "equals", "FAILED", timeout=30)
    record("stack: target kill -> session FAILED", failed["at"] - killed)
    assert bed.md_legs(md)[sd[5:]] == "in_sync,write_mostly"

    # A write stalls until the replacement timeout, then md fails the iSCSI leg and completes locally.
    g.spawn("writer", ["dd", "if=/dev/urandom", "of=/dev/md/stack", "bs=4k", "count=64", "oflag=direct"])
    free = g.wait_for(session + "/state", "equals", "FREE", timeout=60)
    record("stack: target kill -> session FREE (replacement_timeout 5 s)", free["at"] - killed)
    faulty = g.wait_for(f"/sys/block/{md}/md/dev-{sd[5:]}/state", "contains", "faulty", timeout=60)
    record("stack: target kill -> iSCSI leg faulty", faulty["at"] - killed)
    done = g.wait_proc("writer", timeout=60)
    assert done["rc"] == 0
    assert g.read(f"/sys/block/{md}/md/degraded").strip() == "1"
    assert bed.md_legs(md)[local[5:]] == "in_sync"
    assert "write_error" in bed.md_legs(md)[sd[5:]]
    assert g.read(f"/sys/block/{sd[5:]}/device/state").strip() == "transport-offline"
    save_capture(bed, "stack_leg_faulty", tmp_path, keep=False)

    # The target comes back: open-iscsi logs in again by itself; md keeps the leg faulty.
    bed.start_target()
    g.wait_for(session + "/state", "equals", "LOGGED_IN", timeout=60)
    assert "faulty" in bed.md_legs(md)[sd[5:]]

    g.run(["mdadm", "--stop", "/dev/md/stack"])
    # md deletes the node from a workqueue after STOP_ARRAY returns.
    g.wait_for(f"/sys/block/{md}", "absent", timeout=10)
    g.run(["iscsiadm", "-m", "node", "-T", IQN, "--logout"])
    assert bed.session(IQN) is None
