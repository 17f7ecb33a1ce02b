"""Refuse at attach: `block-iscsimple add` of a LABEL with a stale-copy record fails with a
hotplug-error naming the record and the resolve command, and touches nothing."""

from __future__ import annotations

import json

import pytest
from safetybed import LABEL, TARGET, SafetyBed, as_block_script_host

from iscsimple.core.registry import Registry
from iscsimple.core.run import CommandError
from iscsimple.core.safety import stale_record
from iscsimple.core.stale import StaleRecords
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
    xs = as_block_script_host(bed, monkeypatch, XENBUS_PATH, f"lun1@{TARGET}+{LABEL}")
    return bed, xs, calls


def test_add_with_a_stale_record_fails_with_a_hotplug_error_and_does_nothing(stale_host):
    bed, xs, calls = stale_host
    assert block_script.main(["add"]) == 1
    assert calls == []  # refused before any login or mdadm
    error = xs.read(f"{XENBUS_PATH}/hotplug-error")
    assert xs.read(f"{XENBUS_PATH}/hotplug-status") == "error"
    assert f"refusing to attach {LABEL}" in error
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


# --- with the hotplug's fake-tools host: real block-iscsimple processes, fake iscsiadm/mdadm --------


def _md_member_states(host, md: str, states: dict[str, tuple[str, str]], degraded: int) -> None:
    """What md does to sysfs when a recovery ends or a leg fails (the fake tools do not play I/O)."""
    md_dir = host.sys / "block" / md / "md"
    for member, (state, slot) in states.items():
        (md_dir / f"dev-{member}" / "state").write_text(state + "\n")
        (md_dir / f"dev-{member}" / "slot").write_text(slot + "\n")
    (md_dir / "degraded").write_text(f"{degraded}\n")
    (md_dir / "sync_action").write_text("idle\n")


def test_remove_records_the_stale_copy_and_the_next_add_refuses(tmp_path):
    from tests.fakes.harness import IQN, make_hotplug

    hotplug = make_hotplug(tmp_path)
    host = hotplug.host
    host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1", name="web1")
    hotplug.add(vbd)
    ((md, info),) = host.md_arrays().items()
    iscsi, local = sorted(info["members"], key=lambda m: not m.startswith("sd"))
    _md_member_states(host, md, {local: ("in_sync", "0")}, degraded=0)  # the local leg caught up
    host.kill_target(IQN)  # then the filer died under a write: md failed the iSCSI leg
    _md_member_states(host, md, {iscsi: ("faulty,write_mostly,write_error", "none")}, degraded=1)

    removed = hotplug.run("remove", vbd)  # the VM is shut down; no agent runs on this host

    assert removed.returncode == 0, removed.stderr
    records = StaleRecords(hotplug.paths)
    record = records.get("vm1")
    assert record is not None and f"md marked the iSCSI leg {iscsi} faulty" in record.reason
    assert record.domain_name == "web1"
    assert host.md_arrays() == {}  # stopped after the record was written
    commands = hotplug.command_lines()
    host.revive_target(IQN)

    refused = hotplug.run("add", vbd)

    assert refused.returncode == 1
    error = hotplug.xs(vbd, "hotplug-error")
    assert "refusing to attach vm1" in error and "iscsimple resolve vm1 --keep local" in error
    assert str(records.path("vm1")) in error
    assert hotplug.command_lines() == commands  # nothing ran: no login, no mdadm --build
    assert host.md_arrays() == {}


def test_remove_during_the_initial_recovery_records_nothing(tmp_path):
    """pygrub's dom0 attach is removed while the local leg still recovers from iSCSI."""
    from tests.fakes.harness import IQN, make_hotplug

    hotplug = make_hotplug(tmp_path)
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1")
    hotplug.add(vbd)  # the fake's --add leaves the local leg recovering
    assert hotplug.run("remove", vbd).returncode == 0
    assert StaleRecords(hotplug.paths).list() == []
    again = hotplug.vbd(f"lun1@{IQN}+vm1")
    hotplug.add(again)  # the guest's own add right after: builds from iSCSI again
    assert hotplug.run("remove", again).returncode == 0
