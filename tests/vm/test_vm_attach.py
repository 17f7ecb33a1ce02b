"""Scenario 1: attach with LABEL on the real stack, with the project's commands unchanged.

`block-iscsimple add` logs in, builds the array exactly as specified (iSCSI leg write-mostly in slot 1, the
local leg added and recovering *from* iSCSI into slot 0), `iscsimple status --json` and the agent agree
with sysfs while recovering and in sync, and `remove` stops the array and logs out.
"""

from __future__ import annotations

import pytest
from conftest import record
from xldriver import Vbd, Xl, metric

pytestmark = pytest.mark.vm

IQN = "iqn.2026-11.test.local:attach"
LABEL = "vm1-disk"
MIB = 8


def physical_device(g, md: str) -> str:
    major, minor = (int(x) for x in g.read(f"/sys/block/{md}/dev").strip().split(":"))
    return f"{major:x}:{minor:x}"


def status_disk(status: dict, label: str) -> dict:
    disks = [d for d in status["disks"] if d["label"] == label]
    assert len(disks) == 1, status
    assert status["errors"] == []
    return disks[0]


def test_attach_with_label_recovers_local_leg_from_iscsi_then_remove(bed):
    g, xl = bed.guest, Xl(bed)
    backing = bed.make_disk("attach-iscsi", MIB)
    local = bed.make_disk("attach-local", MIB)
    iscsi_sum = g.call("fill", path=backing, seed="attach-iscsi", length=MIB << 20)["sha256"]
    old_local = g.call("fill", path=local, seed="attach-old-local", length=MIB << 20)["sha256"]
    bed.export(IQN, {1: backing})
    xl.configure({LABEL: local})
    # Slow recovery down so the test sees it in progress, then let it finish.
    bed.resync_speed(max_kib=100)

    vbd = Vbd(1, 51712)
    added = xl.add(vbd, f"lun1@{IQN}+{LABEL}")
    record("attach: block-iscsimple add (login + build + add)", added.seconds)
    assert added.rc == 0, str(added)
    assert added.seconds < 30

    # One session, LOGGED_IN; LUN 1's disk is the iSCSI leg.
    assert list(bed.sessions()) == [IQN]
    session = bed.session(IQN)
    assert g.read(session + "/state").strip() == "LOGGED_IN"
    sd = bed.lun_device(IQN, 1)[5:]
    loop = local[5:]

    # The array as specified: RAID1 without metadata, iSCSI write-mostly, local recovering from it.
    md = bed.md_name(LABEL)
    assert md is not None, g.run(["ls", "-l", "/dev/md"], check=False).stdout
    md_dir = f"/sys/block/{md}/md"
    files = g.read_many([f"{md_dir}/{n}" for n in ("level", "metadata_version", "raid_disks", "sync_action")])
    assert [v.strip() for v in files.values()] == ["raid1", "none", "2", "recover"]
    iscsi_leg = g.read_many([f"{md_dir}/dev-{sd}/{n}" for n in ("state", "slot")])
    local_leg = g.read_many([f"{md_dir}/dev-{loop}/{n}" for n in ("state", "slot")])
    assert [v.strip() for v in iscsi_leg.values()] == ["in_sync,write_mostly", "1"]
    assert [v.strip() for v in local_leg.values()] == ["spare", "0"]

    keys = xl.keys(vbd)
    assert keys["hotplug-status"] == "connected"
    assert keys["physical-device"] == physical_device(g, md)
    assert g.call("readlink", path=keys["physical-device-path"])["real"] == f"/dev/{md}"
    assert "hotplug-error" not in keys

    # While recovering: status and the agent say so, like sysfs.
    status = status_disk(xl.status(), LABEL)
    assert_status_matches_sysfs(status, bed, md, sd, loop)
    samples = xl.metrics()
    assert metric(samples, "iscsimple_array_local_only", label=LABEL) == [0.0]
    assert metric(samples, "iscsimple_array_unprotected", label=LABEL) == [1.0]  # local not in sync yet
    assert_metrics_match_sysfs(samples, bed, md, sd, loop)

    bed.resync_speed(max_kib=1_000_000)
    bed.wait_in_sync(md)
    assert bed.md_legs(md) == {sd: "in_sync,write_mostly", loop: "in_sync"}
    # Both legs hold the iSCSI copy; the local leg's old content is gone.
    assert g.call("sha256", path=local)["sha256"] == iscsi_sum != old_local
    assert g.call("sha256", path=f"/dev/{sd}")["sha256"] == iscsi_sum

    status = status_disk(xl.status(), LABEL)
    assert_status_matches_sysfs(status, bed, md, sd, loop)
    samples = xl.metrics()
    assert metric(samples, "iscsimple_array_local_only", label=LABEL) == [0.0]
    assert metric(samples, "iscsimple_array_unprotected", label=LABEL) == [0.0]
    assert_metrics_match_sysfs(samples, bed, md, sd, loop)

    removed = xl.remove(vbd)
    record("attach: block-iscsimple remove (stop + logout)", removed.seconds)
    assert removed.rc == 0, str(removed)
    assert g.glob(f"/sys/block/{md}") == []
    assert bed.sessions() == {}
    assert xl.status()["disks"] == []
    assert metric(xl.metrics(), "iscsimple_array_local_only", label=LABEL) == []


def assert_status_matches_sysfs(status: dict, bed, md: str, sd: str, loop: str) -> None:
    legs = bed.md_legs(md)
    sync_action = bed.guest.read(f"/sys/block/{md}/md/sync_action").strip()
    assert status["md_device"] == md
    assert status["running"] is True
    assert status["state"] == "attached"
    assert (status["iscsi"]["device"], status["local"]["device"]) == (sd, loop)
    assert (status["iscsi"]["write_mostly"], status["local"]["write_mostly"]) == (True, False)
    assert status["iscsi"]["state"] == ("in_sync" if "in_sync" in legs[sd] else "?")
    assert status["local"]["state"] == ("in_sync" if legs[loop] == "in_sync" else "recovering")
    assert status["sync_action"] == sync_action
    assert status["session"]["state"] == "LOGGED_IN"
    assert status["session"]["target"] == IQN
    # The session's replacement timeout as the kernel has it (recovery_tmo).
    recovery_tmo = int(bed.guest.read(bed.session(IQN) + "/recovery_tmo"))
    assert status["session"]["replacement_timeout"] == recovery_tmo
    assert status["local_only"] is False
    assert status["unprotected"] is (legs[loop] != "in_sync")


def assert_metrics_match_sysfs(samples: dict, bed, md: str, sd: str, loop: str) -> None:
    legs = bed.md_legs(md)
    local_state = "in_sync" if legs[loop] == "in_sync" else "recovering"
    assert metric(samples, "iscsimple_leg_state", label=LABEL, leg="local", state=local_state) == [1.0]
    assert metric(samples, "iscsimple_leg_state", label=LABEL, leg="iscsi", state="in_sync") == [1.0]
    assert metric(samples, "iscsimple_leg_write_mostly", label=LABEL, leg="iscsi") == [1.0]
    assert metric(samples, "iscsimple_iscsi_session_up", target=IQN) == [1.0]
    assert metric(samples, "iscsimple_iscsi_session_state", target=IQN, state="LOGGED_IN") == [1.0]
