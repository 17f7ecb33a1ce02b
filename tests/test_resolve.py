"""`iscsimple resolve LABEL --keep local|iscsi` on a generated host with a fake mdadm.

The hotplug helpers it reuses (session, LUN and local-device checks) open real
device nodes under the injected devfs, so the --keep local build needs root to
create block device nodes (like the hotplug's own harness); the rest runs anywhere.
"""

from __future__ import annotations

import os

import pytest
from fixturetree import FakeLun
from safetybed import LABEL, TARGET, FakeMdadm, SafetyBed

from iscsimple.cli import main as cli
from iscsimple.cli.resolve import Resolver, resolve_attachment_id
from iscsimple.core.config import Config
from iscsimple.core.errors import InputError, OperationError
from iscsimple.core.registry import Registry
from iscsimple.core.safety import stale_record
from iscsimple.core.stale import StaleRecords
from iscsimple.hotplug import iscsiadm
from iscsimple.hotplug import mdadm as hotplug_mdadm

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="block device nodes under a test devfs need root")


class Host:
    def __init__(self, tmp_path, monkeypatch):
        self.bed = SafetyBed(tmp_path)
        self.mdadm = FakeMdadm(self.bed)
        self.iscsiadm_calls: list[list[str]] = []
        self.output: list[str] = []
        self.records = StaleRecords(self.bed.paths)
        monkeypatch.setattr(hotplug_mdadm, "run", self.mdadm)
        monkeypatch.setattr(iscsiadm, "run", self._iscsiadm)

    def _iscsiadm(self, argv, **kwargs):
        assert "timeout" in kwargs
        self.iscsiadm_calls.append([str(a) for a in argv])
        from iscsimple.core.run import Result

        return Result(tuple(argv), 0, "", "", 0.0)

    def outage_recorded(self) -> None:
        """The VM ran through an outage: the iSCSI leg failed, the agent wrote the record."""
        self.bed.fail_iscsi()
        self.records.put(stale_record(self.bed.view()))

    def vm_stopped(self) -> None:
        """The VM was shut down (its remove stopped the array and dropped the registry entry)."""
        self.bed.stop()
        self.bed.write()
        Registry(self.bed.paths).remove(self.bed.attachment.id)

    def resolver(self, on_sleep=None) -> Resolver:
        return Resolver(
            self.bed.paths,
            Config(attach_budget=20, device_wait=2),
            out=self.output.append,
            runner=self.mdadm,
            sleep=on_sleep or (lambda s: None),
        )

    @property
    def text(self) -> str:
        return "\n".join(self.output)


@pytest.fixture
def host(tmp_path, monkeypatch) -> Host:
    return Host(tmp_path, monkeypatch)


# --- --keep iscsi ---------------------------------------------------------------------------------


def test_keep_iscsi_without_confirmation_does_nothing_but_say_what_it_would(host):
    host.outage_recorded()
    host.vm_stopped()
    with pytest.raises(InputError, match="--yes-discard-local-writes"):
        host.resolver().keep_iscsi(LABEL, confirmed=False, dry_run=False)
    assert host.records.get(LABEL) is not None
    assert "will: discard those writes" in host.text
    assert host.bed.local_path in host.text and "overwriting it" in host.text


def test_keep_iscsi_with_confirmation_clears_the_record(host):
    host.outage_recorded()
    host.vm_stopped()
    assert host.resolver().keep_iscsi(LABEL, confirmed=True, dry_run=False) == 0
    assert host.records.get(LABEL) is None
    assert host.mdadm.calls == []  # nothing touches a disk: the next attach rebuilds from iSCSI
    assert Registry(host.bed.paths).read_stats().totals["resolve"] == {"success": 1}


def test_keep_iscsi_dry_run_and_running_array(host):
    host.outage_recorded()
    with pytest.raises(OperationError, match="stop the VM first"):
        host.resolver().keep_iscsi(LABEL, confirmed=True, dry_run=False)
    host.vm_stopped()
    assert host.resolver().keep_iscsi(LABEL, confirmed=True, dry_run=True) == 0
    assert host.records.get(LABEL) is not None and "dry run: nothing done" in host.text


def test_cli_exit_codes_and_confirmation_flag(host, capsys):
    host.outage_recorded()
    host.vm_stopped()
    paths = host.bed.paths
    common = ["--records", str(paths.records), "--state", str(paths.state), "--config", str(paths.config)]
    common += ["--path.sysfs", str(paths.sysfs), "--path.devfs", str(paths.devfs), "--tab", str(paths.tab)]
    assert cli.main(["resolve", LABEL, "--keep", "iscsi", *common]) == 2
    assert "--yes-discard-local-writes" in capsys.readouterr().err
    assert cli.main(["resolve", LABEL, "--keep", "local", "--yes-discard-local-writes", *common]) == 2
    assert cli.main(["resolve", "bad/label", "--keep", "iscsi", *common]) == 2
    assert host.records.get(LABEL) is not None
    assert cli.main(["resolve", LABEL, "--keep", "iscsi", "--yes-discard-local-writes", *common]) == 0
    assert host.records.get(LABEL) is None


# --- --keep local, the array stopped ----------------------------------------------------------------


@needs_root
def test_keep_local_builds_from_the_local_leg_and_clears_when_in_sync(host):
    host.outage_recorded()
    host.vm_stopped()
    host.bed.session_back()  # the target is back; the VM is off
    host.bed.write()

    def recovery_progresses(_seconds):
        host.bed.finish_recovery()
        host.bed.write()

    assert host.resolver(on_sleep=recovery_progresses).keep_local(LABEL, dry_run=False, wait=30) == 0
    md = str(host.bed.paths.devfs / "md" / LABEL)
    assert host.mdadm.calls == [
        ["mdadm", "--build", md, "--level=1", "--raid-devices=2", host.bed.local_path, "missing"],
        ["mdadm", md, "--add", "--write-mostly", str(host.bed.paths.devfs / "sda")],
        ["mdadm", "--stop", md],
    ]
    assert host.records.get(LABEL) is None
    assert Registry(host.bed.paths).list() == []  # the array resolve built is gone again
    assert "in sync; record cleared" in host.text and "start the VM now" in host.text
    assert not any("--login" in c for c in host.iscsiadm_calls)  # the session was shared, not logged in


@needs_root
def test_keep_local_without_wait_leaves_the_recovery_running_and_the_record_standing(host):
    host.outage_recorded()
    host.vm_stopped()
    host.bed.session_back()
    host.bed.write()
    assert host.resolver().keep_local(LABEL, dry_run=False, wait=0) == 0
    view = host.bed.view()
    assert view.attachment.id == resolve_attachment_id(LABEL)
    assert (view.local.state, view.iscsi.state, view.iscsi.write_mostly) == ("in_sync", "recovering", True)
    assert host.records.get(LABEL) is not None
    assert "do not start the VM anywhere before" in host.text
    # Later: the recovery completed; resolve again clears the record and stops the array.
    host.bed.finish_recovery()
    host.bed.write()
    host.output.clear()
    assert host.resolver().keep_local(LABEL, dry_run=False, wait=0) == 0
    assert host.records.get(LABEL) is None
    assert host.mdadm.calls[-1][:2] == ["mdadm", "--stop"]


@needs_root
def test_keep_local_never_uses_another_luns_device_and_rolls_back(host):
    host.outage_recorded()
    host.vm_stopped()
    host.bed.session_back()
    host.bed.sessions[0].luns = [FakeLun(2, "sdd", "8:48")]  # our LUN 1 is not there, LUN 2 is
    host.bed.write()
    with pytest.raises(OperationError, match="LUN 1"):
        host.resolver().keep_local(LABEL, dry_run=False, wait=0)
    assert host.mdadm.calls == []  # failed before anything was built
    assert Registry(host.bed.paths).list() == [] and not host.bed.running
    assert host.records.get(LABEL) is not None


def test_keep_local_dry_run_prints_the_commands(host):
    host.outage_recorded()
    host.vm_stopped()
    assert host.resolver().keep_local(LABEL, dry_run=True, wait=0) == 0
    assert host.mdadm.calls == [] and host.records.get(LABEL) is not None
    assert f"--raid-devices=2 {host.bed.local_path} missing" in host.text
    assert "--add --write-mostly ISCSI_DEV" in host.text and "dry run" in host.text


# --- --keep local while the VM runs: a heal now -------------------------------------------------------


def test_keep_local_on_a_running_array_heals_it_now(host):
    host.outage_recorded()
    host.bed.session_back(block="sdb", dev="8:16")
    host.bed.write()
    assert host.resolver().keep_local(LABEL, dry_run=False, wait=0) == 0
    md = f"/dev/md/{LABEL}"
    assert host.mdadm.calls == [
        ["mdadm", md, "--fail", "sda"],
        ["mdadm", md, "--remove", "sda"],
        ["mdadm", md, "--add", "--write-mostly", str(host.bed.paths.devfs / "sdb")],
    ]
    assert host.records.get(LABEL) is not None  # until the recovery completes
    host.bed.finish_recovery()
    host.bed.write()
    assert host.resolver().keep_local(LABEL, dry_run=False, wait=0) == 0
    assert host.records.get(LABEL) is None
    assert host.bed.running  # the VM's own array is never stopped
    assert TARGET in host.bed.attachment.spec


def test_keep_local_on_a_running_array_follows_a_renamed_lun_in_the_registry(host):
    host.outage_recorded()
    host.bed.session_back(block="sdb", dev="8:16")
    host.bed.write()
    host.resolver().keep_local(LABEL, dry_run=False, wait=0)
    assert Registry(host.bed.paths).by_label(LABEL).iscsi_device == "sdb"  # as the agent's healer does


def test_keep_local_on_a_running_array_reports_a_failing_mdadm(host):
    host.outage_recorded()
    host.bed.session_back()
    host.bed.write()
    host.mdadm.fail_on = "--add"
    with pytest.raises(OperationError, match=r"cannot heal .*simulated failure of --add"):
        host.resolver().keep_local(LABEL, dry_run=False, wait=0)
    assert host.records.get(LABEL) is not None


def test_keep_local_on_a_running_array_with_the_session_down_refuses(host):
    host.outage_recorded()
    with pytest.raises(OperationError, match="cannot heal"):
        host.resolver().keep_local(LABEL, dry_run=False, wait=0)
    assert host.mdadm.calls == []
