"""Fast (no qemu): core's HostSnapshot on the states the real-kernel scenarios captured with the project's
own hotplug (tests/fixtures/kernel-6.1-hotplug): two arrays and a plain LUN on one session, one array
left after removals, single-leg arrays from MISSING. Each capture holds the kernel's sysfs/procfs and
iscsimple's registry as the hotplug wrote it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixturetree import materialize

from iscsimple.core.paths import HostPaths
from iscsimple.core.snapshot import HostSnapshot

CAPTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kernel-6.1-hotplug"


def snapshot(state: str, tmp_path: Path) -> HostSnapshot:
    src = CAPTURES / state
    if not src.is_dir():
        pytest.fail(f"capture {src} is missing; regenerate with ISCSIMPLE_SAVE_CAPTURES=1 pytest tests/vm")
    root = materialize(src, tmp_path / "root")
    paths = HostPaths(
        procfs=root / "proc",
        sysfs=root / "sys",
        devfs=root / "dev",
        state=src / "run_iscsimple",
        records=src / "var_lib_iscsimple",
    )
    snap = HostSnapshot.read(paths)
    assert snap.ok, snap.sources
    return snap


def legs(view) -> dict[str, tuple[str | None, str, bool]]:
    return {leg.role: (leg.device, leg.state, leg.write_mostly) for leg in (view.iscsi, view.local)}


def test_two_arrays_and_a_plain_lun_on_one_session(tmp_path):
    snap = snapshot("01_two_arrays_and_plain_lun_in_sync", tmp_path)
    assert sorted(a.label for a in snap.arrays) == ["shared-a", "shared-b"]
    assert len(snap.iscsi.sessions) == 1
    session = snap.iscsi.sessions[0]
    assert session.state == "LOGGED_IN"
    assert sorted(lun.lun for lun in session.luns if lun.block) == [1, 2, 3]
    for view in snap.arrays:
        assert view.md is not None and view.md.degraded == 0
        assert legs(view)["iscsi"][1:] == ("in_sync", True)
        assert legs(view)["local"][1:] == ("in_sync", False)
        assert view.session_up and not view.local_only and not view.unprotected
    plain = [a for a in snap.attachments if a.label is None]
    assert [(a.lun, a.iscsi_device) for a in plain] == [(3, session.lun(3).block)]


def test_one_array_left_keeps_the_session(tmp_path):
    snap = snapshot("02_one_array_left", tmp_path)
    assert [a.label for a in snap.arrays] == ["shared-b"]
    assert [a.label for a in snap.attachments] == ["shared-b"]
    assert [s.state for s in snap.iscsi.sessions] == ["LOGGED_IN"]


def test_missing_legs_are_left_out_on_purpose_not_failed(tmp_path):
    snap = snapshot("03_missing_local_leg_and_missing_iscsi_leg", tmp_path)
    no_local, no_iscsi = snap.array("no-local"), snap.array("no-iscsi")
    assert no_local is not None and no_iscsi is not None
    assert not no_local.local.configured and no_local.iscsi.configured
    assert legs(no_local)["iscsi"][1:] == ("in_sync", True)
    assert not no_iscsi.iscsi.configured and no_iscsi.local.configured
    assert legs(no_iscsi)["local"][1:] == ("in_sync", False)
    assert no_iscsi.attachment.target is None
    # A leg left out on purpose is not an outage: the local-only array is not "local_only".
    assert not no_iscsi.local_only
    assert [s.target for s in snap.iscsi.sessions] == ["iqn.2026-11.test.local:missing"]


def test_outage_with_the_iscsi_leg_faulty_is_local_only(tmp_path):
    snap = snapshot("04_outage_iscsi_leg_faulty_local_only", tmp_path)
    view = snap.array("stale-disk")
    assert view is not None and view.md is not None and view.md.degraded == 1
    assert legs(view)["iscsi"][1:] == ("faulty", True)
    assert legs(view)["local"][1:] == ("in_sync", False)
    assert [s.state for s in snap.iscsi.sessions] == ["FREE"]
    assert view.local_only and not view.session_up
