"""Defense in depth at `remove`: record a stale iSCSI copy before the array is stopped.

The agent normally records it; these check the hotplug's own check (core.safety.
record_if_stale via hotplug.detach.record_stale_copy), including the pygrub case:
a detach while the local leg still recovers from iSCSI must record nothing.
"""

from __future__ import annotations

import logging

from fixturetree import FakeMember
from safetybed import LABEL, SafetyBed

from iscsimple.core.registry import Registry
from iscsimple.core.stale import StaleRecords
from iscsimple.hotplug.detach import record_stale_copy


def _attachment(bed: SafetyBed):
    return Registry(bed.paths).by_label(LABEL)


def test_remove_of_an_array_with_a_faulty_iscsi_leg_records_it(tmp_path, caplog):
    bed = SafetyBed(tmp_path)
    bed.fail_iscsi()
    bed.write()
    with caplog.at_level(logging.WARNING):
        record_stale_copy(bed.paths, _attachment(bed))
    record = StaleRecords(bed.paths).get(LABEL)
    assert record is not None and "faulty" in record.reason
    assert (record.domain_name, record.md_device, record.iscsi_device) == ("vm1", "md127", "sda")
    assert "next attach of vm1-disk is refused" in caplog.text


def test_remove_after_a_crash_between_remove_and_add_records_the_missing_leg(tmp_path):
    bed = SafetyBed(tmp_path)
    bed.fail_iscsi()
    bed.members = [m for m in bed.members if m.name != "sda"]
    bed.write()
    record_stale_copy(bed.paths, _attachment(bed))
    record = StaleRecords(bed.paths).get(LABEL)
    assert record is not None and "gone" in record.reason


def test_remove_of_a_healthy_mirror_records_nothing(tmp_path):
    bed = SafetyBed(tmp_path)
    bed.write()
    record_stale_copy(bed.paths, _attachment(bed))
    assert StaleRecords(bed.paths).list() == []


def test_pygrub_detach_during_the_initial_local_recovery_records_nothing(tmp_path):
    """libxl's bootloader attach in dom0 builds the array (local leg recovering from iSCSI)
    and detaches it before the guest's add: the iSCSI copy is the good one."""
    bed = SafetyBed(tmp_path)
    bed.members = [
        FakeMember("sda", slot=1, state="in_sync,write_mostly", dev="8:0"),
        FakeMember("dm-3", slot=0, state="spare", dev="253:3", recovery_start=1024),
    ]
    bed.sync_action = "recover"
    bed.write()
    record_stale_copy(bed.paths, _attachment(bed))
    assert StaleRecords(bed.paths).list() == []


def test_remove_keeps_an_existing_record_and_tolerates_a_stopped_array(tmp_path):
    bed = SafetyBed(tmp_path)
    bed.fail_iscsi()
    bed.write()
    record_stale_copy(bed.paths, _attachment(bed))
    first = StaleRecords(bed.paths).get(LABEL)
    bed.stop()
    bed.write()
    record_stale_copy(bed.paths, _attachment(bed))  # the array is gone: no error, record kept
    assert StaleRecords(bed.paths).get(LABEL) == first
