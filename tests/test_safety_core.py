"""core/safety.py: when the iSCSI copy is stale, when a heal may run and onto what, when it is done.

First on every real captured kernel state (the outage and the hand-made heal of
../shared/fixtures/kernel-6.1-raid1-iscsi/06..10), then on generated trees for
what the captures do not show (a renamed LUN, another target's LUN, a busy device).
"""

from __future__ import annotations

import pytest
from fixturetree import FakeLun, register_capture_array
from safetybed import LABEL, OTHER_TARGET, TARGET, SafetyBed, Session, make_node

from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import Attachment, Registry
from iscsimple.core.safety import HealBlocked, HealPlan, plan_heal, recovery_complete, stale_record
from iscsimple.core.snapshot import HostSnapshot

CAPTURED_TARGET = "iqn.2026-11.test.local:disk1"

# state → (stale reason starts with, heal plan or blocked reason, recovery complete)
EXPECTED = {
    "01": (None, "local_not_in_sync", False),  # built from iSCSI, local leg not added yet
    "02": (None, "local_not_in_sync", False),  # the local leg recovers from iSCSI (pygrub may detach here)
    "03": (None, "local_not_in_sync", False),
    "04": (None, "not_stale", True),
    "05a": (None, "not_stale", True),  # session FAILED but no I/O: md still has both copies equal
    "05b": (None, "not_stale", True),  # a write is stalled, not yet completed anywhere
    "06": ("md marked the iSCSI leg sda faulty", "session_down", False),
    "07": ("md marked the iSCSI leg sda faulty", "plan", False),
    "08": ("the iSCSI leg is gone", "plan", False),
    "09": ("the iSCSI leg sda of md127 is being rewritten", "in_progress", False),
    "10": (None, "not_stale", True),
    "11": (None, "not_running", False),
    "12": (None, "not_running", False),
}


def _captured(root) -> HostPaths:
    paths = register_capture_array(root)
    (paths.devfs).mkdir(exist_ok=True)
    if not (paths.devfs / "sda").exists():
        make_node(paths.devfs / "sda", "8:0")
    return paths


@pytest.mark.parametrize("state", sorted(EXPECTED))
def test_captured_states(kernel_state, state):
    reason, heal, complete = EXPECTED[state]
    paths = _captured(kernel_state(state))
    view = HostSnapshot.read(paths).array("test")
    record = stale_record(view, now=1000.0)
    if reason is None:
        assert record is None
    else:
        assert record is not None and record.reason.startswith(reason), record
        assert (record.label, record.md_device, record.domain_name, record.target, record.lun) == (
            "test",
            "md127",
            "web1",
            CAPTURED_TARGET,
            1,
        )
        assert record.local_device == "/dev/loop1" and record.since == 1000.0
    plan = plan_heal(view, paths.sysfs, paths.devfs)
    if heal == "plan":
        assert isinstance(plan, HealPlan), plan
    else:
        assert isinstance(plan, HealBlocked) and plan.reason == heal, plan
    assert recovery_complete(view) is complete


def test_heal_of_a_faulty_leg_fails_removes_then_adds_write_mostly(kernel_state):
    """07: the target is back, sda still listed faulty. Exactly what vm-recipe.md found to work."""
    paths = _captured(kernel_state("07"))
    plan = plan_heal(HostSnapshot.read(paths).array("test"), paths.sysfs, paths.devfs)
    assert isinstance(plan, HealPlan)
    assert plan.commands() == [
        ["mdadm", "/dev/md/test", "--fail", "sda"],
        ["mdadm", "/dev/md/test", "--remove", "sda"],
        ["mdadm", "/dev/md/test", "--add", "--write-mostly", str(paths.devfs / "sda")],
    ]
    assert (plan.add_dev, plan.session, plan.renamed) == ("8:0", "session1", False)


def test_after_a_crash_between_remove_and_add_only_the_add_is_left(kernel_state):
    """08: the faulty leg was removed and the agent died; the next run adds it back."""
    paths = _captured(kernel_state("08"))
    plan = plan_heal(HostSnapshot.read(paths).array("test"), paths.sysfs, paths.devfs)
    assert isinstance(plan, HealPlan)
    assert plan.commands() == [["mdadm", "/dev/md/test", "--add", "--write-mostly", str(paths.devfs / "sda")]]


def test_disabled_heal_is_blocked_before_anything_else(kernel_state):
    paths = _captured(kernel_state("07"))
    plan = plan_heal(HostSnapshot.read(paths).array("test"), paths.sysfs, paths.devfs, enabled=False)
    assert isinstance(plan, HealBlocked) and plan.reason == "disabled"


# --- generated trees ----------------------------------------------------------------------------


@pytest.fixture
def bed(tmp_path) -> SafetyBed:
    return SafetyBed(tmp_path)


def test_renamed_lun_is_found_by_target_and_lun(bed):
    bed.fail_iscsi("sda")
    bed.session_back(block="sdb", dev="8:16")  # logged out and in again: the LUN is sdb now
    plan = plan_heal(bed.view(), bed.paths.sysfs, bed.paths.devfs)
    assert isinstance(plan, HealPlan), plan
    assert plan.commands() == [
        ["mdadm", f"/dev/md/{LABEL}", "--fail", "sda"],
        ["mdadm", f"/dev/md/{LABEL}", "--remove", "sda"],
        ["mdadm", f"/dev/md/{LABEL}", "--add", "--write-mostly", str(bed.paths.devfs / "sdb")],
    ]
    assert plan.renamed and plan.add_dev == "8:16"
    assert "came back under a new name" in plan.describe()


def test_never_heals_onto_another_targets_lun(bed):
    """Our target's session is up but has no LUN 1; another target's LUN 1 (sdc) must not be used."""
    bed.fail_iscsi("sda")
    bed.session_back(block="sda")
    for s in bed.sessions:
        s.luns = [FakeLun(0, None, None)]  # only the controller LUN, no disk
    bed.sessions.append(Session(2, OTHER_TARGET, luns=[FakeLun(1, "sdc", "8:32")]))
    plan = plan_heal(bed.view(), bed.paths.sysfs, bed.paths.devfs)
    assert isinstance(plan, HealBlocked) and plan.reason == "session_down", plan
    assert "sdc" not in plan.detail


def test_never_heals_onto_another_lun_of_the_same_target(bed):
    bed.fail_iscsi("sda")
    bed.session_back(block="sda")
    bed.sessions[0].luns = [FakeLun(2, "sdd", "8:48")]  # LUN 2 of our target, not our LUN 1
    plan = plan_heal(bed.view(), bed.paths.sysfs, bed.paths.devfs)
    assert isinstance(plan, HealBlocked) and plan.reason == "session_down", plan


def test_session_logged_in_but_device_not_running_waits(bed):
    bed.fail_iscsi("sda")
    bed.session_back(block="sda")
    bed.sessions[0].luns = [FakeLun(1, "sda", "8:0", state="blocked")]
    plan = plan_heal(bed.view(), bed.paths.sysfs, bed.paths.devfs)
    assert isinstance(plan, HealBlocked) and plan.reason == "device_not_ready"


def test_device_held_by_something_else_is_refused(bed):
    bed.fail_iscsi("sda")
    bed.session_back(block="sdb", dev="8:16")
    bed.holders["sdb"] = ["dm-9"]  # e.g. LVM activated a VG found on the LUN
    plan = plan_heal(bed.view(), bed.paths.sysfs, bed.paths.devfs)
    assert isinstance(plan, HealBlocked) and plan.reason == "device_unusable"
    assert "dm-9" in plan.detail


def test_too_small_device_is_refused(bed):
    bed.fail_iscsi("sda")
    bed.session_back(block="sdb", dev="8:16")
    bed.sizes["sdb"] = 1024
    plan = plan_heal(bed.view(), bed.paths.sysfs, bed.paths.devfs)
    assert isinstance(plan, HealBlocked) and plan.reason == "device_unusable"
    assert "bytes" in plan.detail


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="creating block device nodes needs root")
def test_device_node_of_another_device_is_refused(bed):
    bed.fail_iscsi("sda")
    bed.session_back(block="sdb", dev="8:16")
    bed.write()
    (bed.paths.devfs / "sdb").unlink()
    make_node(bed.paths.devfs / "sdb", "8:32")  # udev lags: /dev/sdb is still another disk
    view = HostSnapshot.read(bed.paths).array(LABEL)
    plan = plan_heal(view, bed.paths.sysfs, bed.paths.devfs)
    assert isinstance(plan, HealBlocked) and plan.reason == "device_unusable"
    assert "8:32" in plan.detail


def test_two_devices_for_the_lun_and_none_known_is_ambiguous(bed):
    bed.fail_iscsi("sda")
    bed.session_back(block="sdb", dev="8:16")
    bed.sessions.append(Session(2, TARGET, luns=[FakeLun(1, "sdc", "8:32")]))
    bed.attachment = Registry(bed.paths).put(bed.attachment)
    plan = plan_heal(bed.view(), bed.paths.sysfs, bed.paths.devfs)
    assert isinstance(plan, HealBlocked) and plan.reason == "ambiguous_device", plan


def test_local_leg_recovering_means_the_iscsi_copy_is_the_good_one(bed):
    """The initial copy iSCSI → local at attach (and a pygrub detach during it): never stale."""
    bed.set_member("dm-3", state="spare", slot=0)
    bed.sync_action = "recover"
    bed.fail_iscsi("sda")  # even if iSCSI then fails, the local leg never had the data
    assert stale_record(bed.view()) is None


def test_an_iscsi_leg_left_out_by_configuration_is_never_stale(bed):
    bed.members = [m for m in bed.members if m.name != "sda"]
    bed.attachment = Registry(bed.paths).put(
        Attachment(**{**bed.attachment.__dict__, "target": None, "iscsi_device": None})
    )
    assert stale_record(bed.view()) is None


def test_a_healthy_mirror_with_an_unknown_iscsi_name_is_not_stale(bed):
    """The registry lost track of the iSCSI device and the session is gone: md says degraded 0."""
    bed.attachment = Registry(bed.paths).put(
        Attachment(**{**bed.attachment.__dict__, "iscsi_device": None, "local_kernel_name": None})
    )
    bed.sessions = []
    view = bed.view()
    assert view.md.degraded == 0
    assert stale_record(view) is None


def test_recovery_is_complete_only_when_idle_and_not_degraded(bed):
    bed.fail_iscsi("sda")
    bed.session_back(block="sdb", dev="8:16")
    bed.members = [m for m in bed.members if m.name != "sda"]
    from fixturetree import FakeMember

    bed.members.append(FakeMember("sdb", slot=1, state="write_mostly,spare", dev="8:16"))
    bed.sync_action = "recover"
    assert not recovery_complete(bed.view())
    bed.finish_recovery()
    view = bed.view()
    assert view.iscsi.device == "sdb" and view.iscsi.state == "in_sync"
    assert recovery_complete(view)
    assert TARGET in view.attachment.spec


@pytest.mark.parametrize(("state", "stale"), [("06", True), ("08", True), ("04", False), ("02", False)])
def test_an_array_state_that_cannot_be_read_hides_no_stale_copy(kernel_state, state, stale):
    """md/array_state unreadable (garbage here): stale_reason took the array for stopped and
    wrote no record, though md listed the iSCSI leg faulty or gone beside an in-sync local leg.
    The members and md's degraded count decide; only a readable clear/inactive means stopped."""
    root = kernel_state(state)
    (root / "sys" / "devices" / "virtual" / "block" / "md127" / "md" / "array_state").write_bytes(b"\xff\x00")
    view = HostSnapshot.read(_captured(root)).array("test")
    assert view.md is not None and view.md.array_state is None
    assert (stale_record(view, now=1000.0) is not None) is stale
