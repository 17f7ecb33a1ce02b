"""core.heal.execute_heal, the one heal executor (the agent's healer and `iscsimple resolve` call it).

Every way it can end is an outcome, never an exception: started (and the
registry follows a renamed LUN), changed under the lock, busy lock, and a
failure of mdadm, of the lock directory or of the registry write (EROFS).
"""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest
from safetybed import LABEL, FakeMdadm, SafetyBed

from iscsimple.core import heal
from iscsimple.core.heal import BUSY, CHANGED, FAILED, STARTED, execute_heal
from iscsimple.core.locking import hotplug_lock, label_lock_name
from iscsimple.core.registry import Registry
from iscsimple.core.run import Deadline
from iscsimple.core.safety import HealPlan, plan_heal


@pytest.fixture
def bed(tmp_path) -> SafetyBed:
    bed = SafetyBed(tmp_path)
    bed.paths = replace(bed.paths, locks=tmp_path / "locks")  # never the host's Xen lock directory
    bed.fail_iscsi("sda")
    bed.session_back(block="sdb", dev="8:16")  # the LUN came back under a new name
    bed.write()
    return bed


def planned(bed: SafetyBed):
    view = bed.view()
    plan = plan_heal(view, bed.paths.sysfs, bed.paths.devfs)
    assert isinstance(plan, HealPlan) and plan.renamed
    return view, plan


def test_started_runs_the_plan_and_the_registry_follows_the_renamed_lun(bed):
    view, plan = planned(bed)
    mdadm = FakeMdadm(bed)
    outcome = execute_heal(bed.paths, view, plan, Deadline(2), runner=mdadm)
    assert outcome.result == STARTED and outcome.started
    assert mdadm.calls == [[str(a) for a in argv] for argv in plan.commands()]
    assert Registry(bed.paths).by_label(LABEL).iscsi_device == "sdb"
    assert bed.view().iscsi.state == "recovering"


def test_a_change_under_the_lock_runs_nothing(bed):
    view, plan = planned(bed)
    bed.session_down()
    bed.write()
    mdadm = FakeMdadm(bed)
    outcome = execute_heal(bed.paths, view, plan, Deadline(2), runner=mdadm)
    assert outcome.result == CHANGED and not outcome.started
    assert "session" in outcome.detail
    assert mdadm.calls == []


def test_a_held_label_lock_is_busy(bed):
    view, plan = planned(bed)
    mdadm = FakeMdadm(bed)
    with hotplug_lock(bed.paths.locks, label_lock_name(LABEL)):
        outcome = execute_heal(bed.paths, view, plan, Deadline(0.2), runner=mdadm)
    assert outcome.result == BUSY
    assert mdadm.calls == []


def test_a_failing_mdadm_call_is_a_failure(bed):
    view, plan = planned(bed)
    mdadm = FakeMdadm(bed, fail_on="--add")
    outcome = execute_heal(bed.paths, view, plan, Deadline(2), runner=mdadm)
    assert outcome.result == FAILED
    assert "simulated failure of --add" in outcome.detail
    assert Registry(bed.paths).by_label(LABEL).iscsi_device == "sda"  # not healed: unchanged


def test_an_os_error_from_the_runner_is_a_failure(bed):
    view, plan = planned(bed)

    def read_only(argv, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    outcome = execute_heal(bed.paths, view, plan, Deadline(2), runner=read_only)
    assert outcome.result == FAILED and "Read-only" in outcome.detail


def test_an_unusable_lock_directory_is_a_failure(bed, tmp_path):
    view, plan = planned(bed)
    not_a_dir = tmp_path / "locks-file"
    not_a_dir.write_text("")
    mdadm = FakeMdadm(bed)
    outcome = execute_heal(bed.paths, view, plan, Deadline(2), runner=mdadm, lock_dir=not_a_dir)
    assert outcome.result == FAILED and "cannot take the lock" in outcome.detail
    assert mdadm.calls == []


def test_a_read_only_registry_after_the_add_is_a_failure_that_says_the_leg_was_added(bed, monkeypatch):
    view, plan = planned(bed)

    def read_only(self, attachment):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(heal.Registry, "put", read_only)
    outcome = execute_heal(bed.paths, view, plan, Deadline(2), runner=FakeMdadm(bed))
    assert outcome.result == FAILED
    assert "was added" in outcome.detail and "Read-only" in outcome.detail
