"""Refuse at attach: `block-iscsimple add` of a LABEL with a stale-copy record fails with a
hotplug-error naming the record and the resolve command, and touches nothing."""

from __future__ import annotations

import json

import pytest
from safetybed import LABEL, TARGET, SafetyBed

from iscsimple.core.registry import Registry
from iscsimple.core.run import CommandError
from iscsimple.core.safety import stale_record
from iscsimple.core.stale import StaleRecords
from iscsimple.core.xenstore import FileXenStore
from iscsimple.hotplug import iscsiadm
from iscsimple.hotplug import main as block_script
from iscsimple.hotplug import mdadm as hotplug_mdadm

XENBUS_PATH = "backend/vbd/9/51712"


@pytest.fixture
def stale_host(tmp_path, monkeypatch):
    bed = SafetyBed(tmp_path)
    bed.fail_iscsi()
    StaleRecords(bed.paths).put(stale_record(bed.view()))
    bed.stop()  # the VM was shut down during the outage
    bed.session_back()
    bed.write()
    Registry(bed.paths).remove(bed.attachment.id)

    calls: list[list[str]] = []

    def failing_command(argv, **kwargs):
        calls.append(list(argv))
        raise CommandError(argv, 1, "simulated: no real tools in this test\n")

    monkeypatch.setattr(hotplug_mdadm, "run", failing_command)
    monkeypatch.setattr(iscsiadm, "run", failing_command)
    store = tmp_path / "xenstore.json"
    for var, value in {
        "XENBUS_PATH": XENBUS_PATH,
        "ISCSIMPLE_XENSTORE_FILE": str(store),
        "ISCSIMPLE_RECORDS": str(bed.paths.records),
        "ISCSIMPLE_STATE": str(bed.paths.state),
        "ISCSIMPLE_TAB": str(bed.paths.tab),
        "ISCSIMPLE_CONFIG": str(bed.paths.config),
        "ISCSIMPLE_LOCKS": str(tmp_path / "locks"),
        "ISCSIMPLE_SYSFS": str(bed.paths.sysfs),
        "ISCSIMPLE_DEVFS": str(bed.paths.devfs),
        "ISCSIMPLE_PROCFS": str(bed.paths.procfs),
        "ISCSIMPLE_NO_SYSLOG": "1",
    }.items():
        monkeypatch.setenv(var, value)
    xs = FileXenStore(store)
    xs.write(f"{XENBUS_PATH}/params", f"lun1@{TARGET}+{LABEL}")
    return bed, xs, calls


def test_add_with_a_stale_record_fails_with_a_hotplug_error_and_does_nothing(stale_host):
    bed, xs, calls = stale_host
    assert block_script.main(["add"]) == 1
    assert calls == []  # refused before any login or mdadm
    error = xs.read(f"{XENBUS_PATH}/hotplug-error")
    assert xs.read(f"{XENBUS_PATH}/hotplug-status") == "error"
    assert error.startswith(f"refusing to attach {LABEL}")
    assert str(StaleRecords(bed.paths).path(LABEL)) in error  # names the record
    assert f"iscsimple resolve {LABEL} --keep local" in error  # and the command to resolve it
    assert "vm1" in error  # which VM's writes are at stake
    assert not bed.running and Registry(bed.paths).list() == []
    assert StaleRecords(bed.paths).get(LABEL) is not None
    stats = json.loads((bed.paths.state / "hotplug-stats.json").read_text())
    assert stats["totals"]["add"] == {"failure": 1}


def test_add_after_resolve_keep_iscsi_is_no_longer_refused_for_staleness(stale_host):
    bed, xs, _calls = stale_host
    StaleRecords(bed.paths).clear(LABEL)  # what resolve --keep iscsi --yes-discard-local-writes does
    assert block_script.main(["add"]) == 1  # it now proceeds to the host (and the fake tools fail it)
    error = xs.read(f"{XENBUS_PATH}/hotplug-error") or ""
    assert error and "refusing to attach" not in error and "stale" not in error
