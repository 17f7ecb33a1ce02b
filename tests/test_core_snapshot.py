"""The derived view every consumer renders from, checked against every real captured state."""

import pytest
from fixturetree import register_capture_array

from iscsimple.core.paths import HostPaths
from iscsimple.core.snapshot import HostSnapshot, leg_state
from iscsimple.core.stale import StaleRecord, StaleRecords

TARGET = "iqn.2026-11.test.local:disk1"

# state → (iscsi leg, local leg, session, lun state, local_only, unprotected, sync ratio)
EXPECTED = {
    "01": ("in_sync", "missing", "LOGGED_IN", "running", False, True, 0.0),
    "02": ("in_sync", "recovering", "LOGGED_IN", "running", False, True, 8320 / 131072),
    "03": ("in_sync", "recovering", "LOGGED_IN", "running", False, True, 49920 / 131072),
    "04": ("in_sync", "in_sync", "LOGGED_IN", "running", False, False, 1.0),
    "05a": ("in_sync", "in_sync", "FAILED", "blocked", True, False, 1.0),
    "05b": ("in_sync", "in_sync", "FAILED", "blocked", True, False, 1.0),
    "06": ("faulty", "in_sync", "FREE", "transport-offline", True, False, 0.0),
    "07": ("faulty", "in_sync", "LOGGED_IN", "running", True, False, 0.0),
    "08": ("missing", "in_sync", "LOGGED_IN", "running", True, False, 0.0),
    "09": ("recovering", "in_sync", "LOGGED_IN", "running", True, False, 8320 / 131072),
    "10": ("in_sync", "in_sync", "LOGGED_IN", "running", False, False, 1.0),
}


def _register(root, **overrides):
    return register_capture_array(root, **overrides)


@pytest.mark.parametrize("state", sorted(EXPECTED))
def test_captured_states(kernel_state, state):
    iscsi, local, session, lun, local_only, unprotected, ratio = EXPECTED[state]
    snap = HostSnapshot.read(_register(kernel_state(state)))
    assert snap.ok, snap.sources
    (view,) = snap.arrays
    assert (view.iscsi.state, view.local.state) == (iscsi, local)
    assert view.session.state == session
    assert view.lun.state == lun
    assert (view.local_only, view.unprotected) == (local_only, unprotected)
    assert view.sync_completed_ratio == pytest.approx(ratio)
    assert view.domain == "web1"
    # The kernel marks the iSCSI leg write-mostly in every state where it is present.
    assert view.iscsi.write_mostly == (view.iscsi.member is not None)
    assert view.local.write_mostly is False
    assert view.write_mostly_wrong is False
    (sv,) = snap.sessions
    assert (sv.target, sv.portal, sv.state) == (TARGET, "127.0.0.1:3260", session)


def test_recovery_speed_and_eta_from_sysfs(kernel_state):
    view = HostSnapshot.read(_register(kernel_state("02"))).arrays[0]
    assert view.sync_action == "recover"
    assert view.sync_speed_bytes == 2645 * 1024
    assert view.sync_remaining_seconds == pytest.approx((131072 - 8320) * 512 / (2645 * 1024))
    assert view.size_bytes == 65536 * 1024


def test_idle_array_has_no_eta(kernel_state):
    view = HostSnapshot.read(_register(kernel_state("04"))).arrays[0]
    assert (view.sync_speed_bytes, view.sync_remaining_seconds) == (0.0, 0.0)


def test_stopped_array_is_neither_local_only_nor_unprotected(kernel_state):
    view = HostSnapshot.read(_register(kernel_state("11"))).arrays[0]
    assert view.md is None
    assert (view.local_only, view.unprotected, view.no_good_leg) == (False, False, False)


def test_expected_session_that_is_gone_is_reported(kernel_state):
    snap = HostSnapshot.read(_register(kernel_state("12")))
    (sv,) = snap.sessions
    assert sv.session is None and sv.up is False and sv.portal == "127.0.0.1:3260"


def test_iscsi_leg_missing_on_purpose_is_not_local_only(kernel_state):
    # Built from the local device alone: no iSCSI copy exists to go stale.
    paths = _register(kernel_state("08"), target=None, iscsi_device=None, spec="lun0@MISSING+test")
    view = HostSnapshot.read(paths).arrays[0]
    assert view.iscsi.configured is False and view.iscsi.state == "missing"
    assert view.local_only is False


def test_write_mostly_on_the_local_leg_is_wrong(kernel_state):
    # Pretend the registry swapped the legs' identities: the write-mostly member is then "local".
    paths = _register(
        kernel_state("04"), iscsi_device="loop1", local_kernel_name="sda", local_device="/dev/sda"
    )
    assert HostSnapshot.read(paths).arrays[0].write_mostly_wrong is True


def test_local_leg_found_without_its_kernel_name(kernel_state):
    paths = _register(kernel_state("04"), local_kernel_name=None, local_device="/dev/vg0/test")
    view = HostSnapshot.read(paths).arrays[0]
    assert view.local.device == "loop1" and view.local.state == "in_sync"


def test_md_found_through_dev_md_link_when_registry_lacks_it(kernel_state):
    root = kernel_state("04")
    paths = _register(root, md_device=None)
    (paths.devfs / "md").mkdir(parents=True, exist_ok=True)
    link = paths.devfs / "md" / "test"
    if not link.is_symlink():
        link.symlink_to("../md127")
    assert HostSnapshot.read(paths).arrays[0].md.name == "md127"


def test_stale_record_is_joined(kernel_state):
    paths = _register(kernel_state("07"))
    StaleRecords(paths).put(
        StaleRecord("test", 1.0, "md127", "web1", 1, TARGET, 1, "sda", "/dev/loop1", "iSCSI leg faulty")
    )
    assert HostSnapshot.read(paths).arrays[0].stale.reason == "iSCSI leg faulty"


def test_unlabelled_attachments_have_sessions_but_no_arrays(kernel_state):
    paths = _register(
        kernel_state("04"), label=None, md_device=None, local_device=None, local_kernel_name=None
    )
    snap = HostSnapshot.read(paths)
    assert snap.arrays == ()
    assert [s.state for s in snap.sessions] == ["LOGGED_IN"]


def test_a_broken_source_is_recorded_not_raised(tmp_path):
    paths = HostPaths(
        procfs=tmp_path / "proc", sysfs=tmp_path / "sys", state=tmp_path / "run", records=tmp_path / "lib"
    )
    (tmp_path / "lib").write_text("not a directory")
    snap = HostSnapshot.read(paths)
    assert snap.arrays == ()
    assert snap.sources["registry"].ok
    assert not snap.sources["stale"].ok


def test_leg_state_of_no_member():
    assert leg_state(None) == "missing"
