"""The agent's detector and healer on a generated host with a fake mdadm and a fake clock.

Every path of the agent's heal (docs/data-safety.md): record on the faulty transition (logged once),
heal success and record cleared only when the recovery completes, a renamed
LUN, never another target's or LUN's device, backoff on failures and aborts,
a crash between --remove and --add, heal disabled, a hotplug holding the label.
"""

from __future__ import annotations

import errno
import logging
import os

import pytest
from fixturetree import FakeLun
from prometheus_client import generate_latest
from safetybed import LABEL, OTHER_TARGET, TARGET, FakeMdadm, SafetyBed, Session

from iscsimple.core.config import ConfigError, load_config
from iscsimple.core.locking import hotplug_lock, label_lock_name
from iscsimple.core.registry import Registry
from iscsimple.core.stale import StaleRecords
from iscsimple.exporter.collectors import SafetyCollector
from iscsimple.exporter.safety import Healer, Safety, StaleDetector

MD = f"/dev/md/{LABEL}"


def heal_commands(bed: SafetyBed, old: str = "sda", new: str = "sda") -> list[list[str]]:
    return [
        ["mdadm", MD, "--fail", old],
        ["mdadm", MD, "--remove", old],
        ["mdadm", MD, "--add", "--write-mostly", str(bed.paths.devfs / new)],
    ]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Host:
    """The bed plus an agent-side Safety wired exactly as the agent wires it."""

    def __init__(self, tmp_path, *, enabled: bool = True, fail_on: str | None = None):
        self.bed = SafetyBed(tmp_path)
        self.clock = Clock()
        self.mdadm = FakeMdadm(self.bed, fail_on=fail_on)
        self.records = StaleRecords(self.bed.paths)
        self.lock_dir = tmp_path / "locks"
        self.safety = self.new_agent(enabled)

    def new_agent(self, enabled: bool = True) -> Safety:
        """A fresh agent process: nothing remembered but what is on disk and in the kernel."""
        self.safety = Safety(
            StaleDetector(self.records, clock=lambda: 1.7e9),
            Healer(
                self.bed.paths,
                self.records,
                enabled=enabled,
                stable_seconds=30,
                backoff_max_seconds=200,
                runner=self.mdadm,
                lock_dir=self.lock_dir,
                lock_wait=0.2,
                clock=self.clock,
            ),
        )
        return self.safety

    def refresh(self, after: float = 0.0):
        self.clock.now += after
        snapshot = self.bed.snapshot()
        self.safety.observe(snapshot)
        return snapshot

    def exposition(self) -> str:
        snapshot = self.refresh()
        return generate_latest(_Once(SafetyCollector(lambda: snapshot, self.safety))).decode()

    @property
    def results(self) -> dict[str, int]:
        return self.safety.healer.results


class _Once:
    def __init__(self, collector):
        self.collector = collector

    def collect(self):
        return self.collector.collect()


@pytest.fixture
def host(tmp_path) -> Host:
    return Host(tmp_path)


def test_record_written_on_the_faulty_transition_and_logged_once(host, caplog):
    caplog.set_level(logging.WARNING, logger="iscsimple.agent.safety")
    host.refresh()
    assert host.records.get(LABEL) is None
    host.bed.fail_iscsi()
    host.refresh()
    record = host.records.get(LABEL)
    assert record is not None
    assert (record.md_device, record.domain_name, record.target, record.lun, record.iscsi_device) == (
        "md127",
        "vm1",
        TARGET,
        1,
        "sda",
    )
    assert record.since == 1.7e9 and "faulty" in record.reason
    for _ in range(3):
        host.refresh(after=5)
    assert host.records.get(LABEL) == record  # write-once: the first sighting stands
    warnings = [r for r in caplog.records if "STALE iSCSI COPY" in r.getMessage()]
    assert len(warnings) == 1
    assert "vm1" in warnings[0].getMessage()


def test_heal_success_and_record_cleared_only_when_recovery_completes(host):
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()  # the session looks healthy from now on
    host.refresh(after=29)
    assert host.mdadm.calls == []  # not stable long enough yet
    host.refresh(after=2)
    assert host.mdadm.calls == heal_commands(host.bed)
    assert host.results["success"] == 1
    view = host.bed.view()
    assert view.iscsi.state == "recovering" and view.iscsi.write_mostly
    for _ in range(3):  # recovering: the record stands, nothing else is run
        host.refresh(after=60)
        assert host.records.get(LABEL) is not None
    assert len(host.mdadm.calls) == 3
    assert 'iscsimple_array_iscsi_stale{domain="vm1",label="vm1-disk"} 1.0' in host.exposition()
    host.bed.finish_recovery()
    host.refresh()
    assert host.records.get(LABEL) is None
    text = host.exposition()
    assert 'iscsimple_array_iscsi_stale{domain="vm1",label="vm1-disk"} 0.0' in text
    assert 'iscsimple_heal_operations_total{mode="full",result="success"} 1.0' in text
    assert 'iscsimple_heal_operations_total{mode="full",result="failure"} 0.0' in text
    assert "iscsimple_heal_enabled 1.0" in text


def test_heal_with_the_lun_renamed(host):
    host.bed.fail_iscsi("sda")
    host.refresh()
    host.bed.session_back(block="sdb", dev="8:16")
    host.refresh()
    host.refresh(after=31)
    assert host.mdadm.calls == heal_commands(host.bed, "sda", "sdb")
    assert Registry(host.bed.paths).by_label(LABEL).iscsi_device == "sdb"
    host.bed.finish_recovery()
    host.refresh()
    assert host.records.get(LABEL) is None
    assert host.bed.view().iscsi.device == "sdb"


def test_never_heals_onto_a_device_of_another_target_or_lun(host):
    host.bed.fail_iscsi("sda")
    host.refresh()
    host.bed.session_back()
    host.bed.sessions[0].luns = [FakeLun(2, "sdd", "8:48")]  # our target, but LUN 2
    host.bed.sessions.append(Session(2, OTHER_TARGET, luns=[FakeLun(1, "sdc", "8:32")]))  # LUN 1 elsewhere
    for _ in range(5):
        host.refresh(after=100)
    assert host.mdadm.calls == []
    assert host.results["skipped_session_down"] == 1  # counted once, not on every refresh
    assert host.records.get(LABEL) is not None


def test_backoff_doubles_after_each_failure_and_resets_with_a_flap(tmp_path):
    host = Host(tmp_path, fail_on="--add")
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()
    host.refresh(after=31)
    assert host.results["failure"] == 1
    assert host.safety.healer.wait_for(LABEL) == 60
    attempts = len(host.mdadm.calls)
    host.refresh()  # the window restarts after a failure
    host.refresh(after=59)
    assert len(host.mdadm.calls) == attempts
    assert host.results["skipped_backoff"] == 1
    host.bed.session_down()  # a flap restarts the window too
    host.refresh(after=2)
    host.bed.session_back()
    host.refresh()
    host.refresh(after=59)
    assert len(host.mdadm.calls) == attempts
    host.refresh(after=2)
    assert host.results["failure"] == 2
    assert host.safety.healer.wait_for(LABEL) == 120
    for _ in range(3):
        host.refresh()
        host.refresh(after=1000)
    assert host.safety.healer.wait_for(LABEL) == 200  # capped


def test_an_os_error_while_healing_is_counted_and_logged_as_a_failure(host, caplog):
    def read_only(argv, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    host.safety.healer.runner = read_only
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()
    host.refresh(after=31)
    assert host.results["failure"] == 1 and host.results["success"] == 0
    assert "Read-only file system" in caplog.text
    assert host.safety.healer.wait_for(LABEL) == 60  # backs off like any failed heal
    assert host.records.get(LABEL) is not None


def _read_only_lock(lock_dir, name, deadline=None):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(lock_dir / name))


@pytest.mark.parametrize("broken", ["lock_dir_is_a_file", "lock_dir_read_only"])
def test_a_heal_that_cannot_take_its_lock_counts_as_a_failure(tmp_path, monkeypatch, caplog, broken):
    """The installed unit once left Xen's lock directory read-only (EROFS): the heal must be
    counted as `failure` (IscsimpleHealFailing) and logged, never vanish into the refresh loop."""
    host = Host(tmp_path)
    if broken == "lock_dir_is_a_file":
        host.lock_dir.write_text("")
        host.new_agent()
    else:
        monkeypatch.setattr("iscsimple.core.heal.hotplug_lock", _read_only_lock)
    caplog.set_level(logging.ERROR, logger="iscsimple.agent.safety")
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()
    host.refresh(after=31)
    assert host.mdadm.calls == []
    assert host.results["failure"] == 1
    assert host.results["success"] == 0
    assert 'iscsimple_heal_operations_total{mode="full",result="failure"} 1.0' in host.exposition()
    assert f"heal of {LABEL} (full) failed: cannot take the lock of {LABEL}" in caplog.text
    assert host.safety.healer.wait_for(LABEL) == 60  # backs off like any failed heal
    assert host.records.get(LABEL) is not None


def test_a_heal_aborted_by_the_session_failing_again_backs_off(host):
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()
    host.refresh(after=31)
    assert host.results["success"] == 1
    host.bed.fail_iscsi("sda")  # the target dies again during the recovery
    host.refresh()
    assert host.results["aborted"] == 1
    assert host.records.get(LABEL) is not None
    assert host.safety.healer.wait_for(LABEL) == 60
    host.bed.session_back()
    host.refresh()
    host.refresh(after=31)
    assert len(host.mdadm.calls) == 3  # still backing off
    host.refresh(after=30)
    assert len(host.mdadm.calls) == 6 and host.results["success"] == 2


def test_crash_between_remove_and_add_is_healed_by_the_next_agent(host):
    class Died(BaseException):
        pass

    def dies_after_remove(argv, **kwargs):
        result = FakeMdadm.__call__(host.mdadm, argv, **kwargs)
        if "--remove" in argv:
            raise Died
        return result

    host.safety.healer.runner = dies_after_remove
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()
    with pytest.raises(Died):
        host.refresh(after=31)
    view = host.bed.view()
    assert view.iscsi.state == "missing" and view.local.state == "in_sync"
    assert host.records.get(LABEL) is not None

    host.new_agent()  # restarted by systemd: no memory
    host.refresh()
    host.refresh(after=31)
    assert host.mdadm.calls[-1] == heal_commands(host.bed)[-1]
    assert len(host.mdadm.calls) == 3
    host.bed.finish_recovery()
    host.refresh()
    assert host.records.get(LABEL) is None


def test_agent_restarted_during_the_recovery_clears_the_record_when_done(host):
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()
    host.refresh(after=31)
    host.new_agent()
    host.refresh(after=500)
    assert len(host.mdadm.calls) == 3  # it does not heal twice
    host.bed.finish_recovery()
    host.refresh()
    assert host.records.get(LABEL) is None


def test_heal_disabled_only_detects_and_clears(tmp_path):
    host = Host(tmp_path, enabled=False)
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    for _ in range(3):
        host.refresh(after=100)
    assert host.mdadm.calls == []
    assert host.results["skipped_disabled"] == 1
    assert "iscsimple_heal_enabled 0.0" in host.exposition()
    # An operator heals by hand (or `iscsimple resolve`): the agent still clears the record.
    for argv in heal_commands(host.bed):
        host.mdadm(argv, timeout=10)
    host.bed.finish_recovery()
    host.refresh()
    assert host.records.get(LABEL) is None


def test_a_hotplug_holding_the_label_defers_the_heal(host):
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()
    with hotplug_lock(host.lock_dir, label_lock_name(LABEL)):
        host.refresh(after=31)
    assert host.mdadm.calls == []
    assert host.results["skipped_busy"] == 1
    host.refresh(after=1)
    assert host.mdadm.calls == heal_commands(host.bed)


def test_an_array_stopped_while_stale_keeps_its_record_and_metric(host):
    """VM shut down during the outage: no array, the record stands and is still exported."""
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.stop()
    Registry(host.bed.paths).remove(host.bed.attachment.id)
    text = host.exposition()
    assert 'iscsimple_array_iscsi_stale{domain="vm1",label="vm1-disk"} 1.0' in text
    host.bed.session_back()
    host.refresh(after=100)
    assert host.mdadm.calls == []


def test_pygrub_attach_and_detach_during_the_initial_recovery_leaves_no_record(host):
    """libxl attaches the disk to dom0 for pygrub, then detaches it while the local leg still
    recovers from iSCSI: the iSCSI copy is the good one, nothing may be recorded."""
    from fixturetree import FakeMember

    bed = host.bed
    bed.members = [FakeMember("sda", slot=1, state="in_sync,write_mostly", dev="8:0")]  # --build
    host.refresh()
    bed.members.append(FakeMember("dm-3", slot=0, state="spare", dev="253:3"))  # --add LOCAL
    bed.sync_action = "recover"
    host.refresh()
    bed.fail_iscsi()  # even an outage now: the local leg never held the data
    host.refresh()
    bed.stop()  # remove: mdadm --stop
    host.refresh()
    assert host.records.list() == []
    assert host.mdadm.calls == []


def test_unreadable_config_disables_heal_but_not_detection(tmp_path, caplog):
    bed = SafetyBed(tmp_path)
    bed.paths.config.write_text("[heal]\nenabled = 'yes'\n")
    safety = Safety.for_host(bed.paths, runner=FakeMdadm(bed), lock_dir=tmp_path / "locks")
    assert safety.healer.enabled is False
    bed.fail_iscsi()
    safety.observe(bed.snapshot())
    assert StaleRecords(bed.paths).get(LABEL) is not None
    assert "automatic heal is off" in caplog.text


def test_the_agent_runs_the_detector_and_exports_the_safety_metrics(tmp_path):
    from iscsimple.exporter.agent import Agent, AgentOptions

    bed = SafetyBed(tmp_path)
    agent = Agent(AgentOptions(paths=bed.paths, udev=False, mdstat_events=False, heal=False))
    bed.write()
    text = agent.refresher.refresh_now().text.decode()
    assert 'iscsimple_array_iscsi_stale{domain="vm1",label="vm1-disk"} 0.0' in text
    bed.fail_iscsi()
    bed.write()
    text = agent.refresher.refresh_now().text.decode()
    # Exported in the same refresh that wrote the record, not one refresh later.
    assert 'iscsimple_array_iscsi_stale{domain="vm1",label="vm1-disk"} 1.0' in text
    assert StaleRecords(bed.paths).get(LABEL) is not None
    assert "iscsimple_heal_enabled 0.0" in text
    assert 'iscsimple_heal_operations_total{mode="full",result="failure"} 0.0' in text


def test_heal_timing_comes_from_the_config(tmp_path):
    bed = SafetyBed(tmp_path)
    bed.paths.config.write_text("[heal]\nstable_seconds = 5\nbackoff_max_seconds = 40\n")
    safety = Safety.for_host(bed.paths, runner=FakeMdadm(bed))
    assert (safety.healer.enabled, safety.healer.stable_seconds, safety.healer.backoff_max_seconds) == (
        True,
        5,
        40,
    )
    assert Safety.for_host(bed.paths, heal=False).healer.enabled is False
    bed.paths.config.write_text("[heal]\nmax_parallel = 2\n")
    assert Safety.for_host(bed.paths).healer.max_parallel == 2
    bed.paths.config.write_text("[heal]\nmax_parallel = 0\n")
    with pytest.raises(ConfigError, match=r"iscsimple.toml:2: \[heal\] max_parallel must be positive"):
        load_config(bed.paths.config)
    assert Safety.for_host(bed.paths).healer.enabled is False  # a broken config never heals


def test_a_returning_filer_heals_a_few_legs_at_a_time(tmp_path):
    """With [heal] max_parallel legs already recovering, the next heal waits its turn."""
    from dataclasses import replace

    host = Host(tmp_path)
    host.safety.healer.max_parallel = 1
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()
    host.clock.now += 31
    snapshot = host.bed.snapshot()
    (view,) = snapshot.arrays
    other = replace(  # another VM's mirror on the same filer, its heal running
        view,
        attachment=replace(view.attachment, id="vbd-8-51712", label="vm2-disk"),
        iscsi=replace(view.iscsi, state="recovering"),
    )
    crowded = replace(snapshot, arrays=(view, other))
    standing = {
        LABEL: host.records.get(LABEL),
        "vm2-disk": replace(host.records.get(LABEL), label="vm2-disk"),
    }
    host.safety.healer.observe(crowded, standing)
    assert host.mdadm.calls == []
    assert host.results["skipped_queued"] == 1
    host.refresh(after=1)  # the other heal finished: our turn
    assert host.mdadm.calls == heal_commands(host.bed)


def test_a_record_found_at_start_up_is_logged_once(tmp_path, caplog):
    host = Host(tmp_path)
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.stop()  # the host rebooted: no array, the record on disk
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="iscsimple.agent.safety")
    host.new_agent()
    for _ in range(3):
        host.refresh(after=10)
    warnings = [r.getMessage() for r in caplog.records if "STALE iSCSI COPY" in r.getMessage()]
    assert len(warnings) == 1 and "vm1-disk (vm1)" in warnings[0]


# -- a local leg's recovery from iSCSI that an outage stopped -----------------------------------


def resume_commands(bed: SafetyBed) -> list[list[str]]:
    return [["mdadm", MD, "--remove", "dm-3"], ["mdadm", MD, "--add", str(bed.paths.devfs / "dm-3")]]


def test_recovery_cut_by_an_outage_is_resumed_from_iscsi_once_the_session_is_stable(host):
    bed = host.bed
    bed.session_down()
    bed.cut_local_recovery()
    snapshot = host.refresh()
    view = snapshot.array(LABEL)
    assert view.recovery_stopped and view.unprotected and not view.local_only
    assert host.mdadm.calls == [] and host.records.get(LABEL) is None  # the iSCSI copy is the good one
    assert host.safety.healer.resumes.get("skipped_session_down") == 1
    bed.session_back()
    host.refresh()
    host.refresh(after=29)
    assert host.mdadm.calls == []  # the session must look healthy for stable_seconds first
    host.refresh(after=2)
    assert host.mdadm.calls == resume_commands(bed)
    assert host.safety.healer.resumes["success"] == 1 and host.results["success"] == 0
    view = host.refresh().array(LABEL)
    assert (view.local.state, view.recovery_stopped) == ("recovering", False)
    assert 'iscsimple_recovery_resumes_total{result="success"} 1.0' in host.exposition()
    bed.finish_recovery()
    assert not host.refresh(after=60).array(LABEL).unprotected
    assert len(host.mdadm.calls) == 2 and host.records.get(LABEL) is None


def test_resume_never_copies_from_an_incomplete_local_leg_or_a_replaced_lun(host):
    bed = host.bed
    bed.cut_local_recovery()
    bed.set_member("sda", state="faulty,write_mostly", slot=None)  # md failed the only complete copy
    host.refresh()
    host.refresh(after=100)
    assert host.mdadm.calls == [] and host.records.get(LABEL) is None
    assert host.safety.healer.resumes.get("skipped_source_not_in_sync") == 1
    bed.set_member("sda", state="in_sync,write_mostly", slot=1)
    bed.session_back(block="sdb", dev="8:16")  # the LUN came back under another name: md's leg is dead
    host.refresh()
    host.refresh(after=100)
    assert host.mdadm.calls == []
    assert host.safety.healer.resumes.get("skipped_iscsi_member_gone") == 1


def test_resume_follows_the_heal_policy_disabled_and_backoff(tmp_path):
    off = Host(tmp_path / "off", enabled=False)
    off.bed.cut_local_recovery()
    off.refresh()
    off.refresh(after=100)
    assert off.mdadm.calls == [] and off.safety.healer.resumes.get("skipped_disabled") == 1

    host = Host(tmp_path / "on", fail_on="--add")
    host.bed.cut_local_recovery()
    host.refresh()
    host.refresh(after=31)
    assert host.safety.healer.resumes["failure"] == 1
    assert host.refresh().array(LABEL).local.state == "missing"  # --remove ran, --add failed
    host.refresh(after=59)  # the wait doubled after the failure
    assert host.safety.healer.resumes["failure"] == 1
    host.mdadm.fail_on = None
    host.refresh(after=2)
    assert host.safety.healer.resumes["success"] == 1
    # The resume knows it removed the leg: it only adds it back.
    assert host.mdadm.calls[-2:] == [resume_commands(host.bed)[1], resume_commands(host.bed)[1]]
    assert host.refresh().array(LABEL).local.state == "recovering"


def test_status_and_metrics_say_a_stopped_recovery_is_not_catching_up(host):
    from iscsimple.cli.status import build_status, render_table
    from iscsimple.core.config import Config
    from iscsimple.exporter.collectors.arrays import ArraysCollector

    host.bed.session_back()
    host.bed.set_member("dm-3", state="spare", slot=0)  # recovering: catching up
    host.bed.sync_action = "recover"
    text = render_table(build_status(host.bed.snapshot(), Config()))
    assert "still recovering" in text and "RECOVERY-STOPPED" not in text
    host.bed.cut_local_recovery()
    snapshot = host.bed.snapshot()
    [row] = build_status(snapshot, Config()).disks
    assert {"UNPROTECTED", "RECOVERY-STOPPED"} <= set(row.flags)
    text = render_table(build_status(snapshot, Config()))
    assert "recovery from iSCSI stopped" in text and "still recovering" not in text
    exposition = generate_latest(_Once(ArraysCollector(lambda: snapshot))).decode()
    assert f'iscsimple_array_recovery_stopped{{domain="vm1",label="{LABEL}"}} 1.0' in exposition


# -- when a stale copy began ----------------------------------------------------------------------


def _kmsg(bed: SafetyBed, *lines: tuple[float, str]) -> None:
    """A /dev/kmsg stand-in: `seconds ago` and text per record, in the kernel's record format.
    Records are stamped on CLOCK_MONOTONIC (time since boot), so `ago` stays under a minute or
    two: a test machine may have booted minutes ago."""
    import time

    now = time.clock_gettime(time.CLOCK_MONOTONIC)
    text = "".join(
        f"3,{seq},{int((now - ago) * 1e6)},-;{line}\n" for seq, (ago, line) in enumerate(lines, start=100)
    )
    (bed.paths.devfs / "kmsg").write_text(text)


def test_a_stale_records_since_is_the_kernel_logs_time_of_the_fault_and_says_so(host):
    import time

    from iscsimple.core.safety import record_if_stale, stale_record

    bed = host.bed
    bed.fail_iscsi()
    bed.write()
    _kmsg(
        bed,
        (72, "md/raid1:md127: Disk failure on sda, disabling device."),  # an earlier outage, healed
        (37, " connection1:0: detected conn error (1020)"),
        (36, "md/raid1:md127: Disk failure on sda, disabling device."),
        (0.1, "loop1: detected capacity change"),
    )
    view = bed.snapshot().array(LABEL)
    record = stale_record(view, paths=bed.paths)
    assert abs(record.since - (time.time() - 36)) < 0.5
    assert record.since_source == "kernel log: md/raid1:md127: Disk failure on sda, disabling device."
    # The ring buffer lost md's line: the session's failure is the earliest evidence left.
    _kmsg(bed, (37, "connection1:0: detected conn error (1020)"), (0.05, "other"))
    record = stale_record(view, paths=bed.paths, seen_by="the hotplug remove")
    assert abs(record.since - (time.time() - 37)) < 0.5
    assert record.since_source == "kernel log: connection1:0: detected conn error (1020)"
    # Nothing in the kernel log: when it was seen, and by whom.
    (bed.paths.devfs / "kmsg").unlink()
    record = stale_record(view, now=123.0, paths=bed.paths, seen_by="the hotplug remove")
    assert (record.since, record.since_source) == (123.0, "first seen by the hotplug remove")
    # The hotplug remove and the agent both write it so.
    _kmsg(bed, (6, "md/raid1:md127: Disk failure on sda, disabling device."))
    written = record_if_stale(bed.paths, bed.attachment, "md127")
    assert written.since_source.startswith("kernel log: md/raid1:md127") and written.since < time.time() - 5.9
    assert "md/raid1:md127" in StaleRecords(bed.paths).get(LABEL).since_source


def test_the_agent_started_late_dates_the_record_by_the_kernel_log(tmp_path):
    import time

    host = Host(tmp_path)
    host.safety = Safety.for_host(host.bed.paths, runner=host.mdadm, lock_dir=host.lock_dir)
    host.bed.fail_iscsi()
    host.bed.write()
    _kmsg(host.bed, (9, "md/raid1:md127: Disk failure on sda, disabling device."))
    host.refresh()
    record = host.records.get(LABEL)
    assert record is not None and abs(record.since - (time.time() - 9)) < 0.5
    assert record.since_source.startswith("kernel log:")


def _resume_cut_after_remove(tmp_path) -> Host:
    """A resume whose --remove ran and whose --add did not (the agent died, or mdadm failed)."""
    host = Host(tmp_path, fail_on="--add")
    host.bed.cut_local_recovery()
    host.refresh()
    host.refresh(after=31)
    assert host.mdadm.calls == resume_commands(host.bed)
    assert host.refresh().array(LABEL).local.state == "missing"
    host.mdadm.fail_on = None
    return host


def test_resume_interrupted_between_remove_and_add_is_finished_by_a_restarted_agent(tmp_path):
    host = _resume_cut_after_remove(tmp_path)
    note = host.bed.paths.state / "resumes" / f"{LABEL}.json"
    assert note.exists()
    host.new_agent()  # the agent restarted: nothing in memory
    host.refresh()
    host.refresh(after=31)
    assert host.mdadm.calls[2:] == [resume_commands(host.bed)[1]]  # only the --add
    assert host.safety.healer.resumes["success"] == 1
    assert host.refresh().array(LABEL).local.state == "recovering"
    assert not note.exists()


@pytest.mark.parametrize("content", ["{", "null", '{"label": "vm1-disk"}', '{"member": "-rf"}'])
def test_resume_note_unreadable_is_reported_and_the_leg_still_added_back(tmp_path, caplog, content):
    host = _resume_cut_after_remove(tmp_path)
    note = host.bed.paths.state / "resumes" / f"{LABEL}.json"
    note.write_text(content)
    caplog.set_level(logging.ERROR, logger="iscsimple.agent.safety")
    host.new_agent()
    assert any(str(note) in r.getMessage() and "added back" in r.getMessage() for r in caplog.records)
    host.refresh()
    host.refresh(after=31)
    assert host.mdadm.calls[2:] == [resume_commands(host.bed)[1]]  # the registry's local leg
    assert host.refresh().array(LABEL).local.state == "recovering" and not note.exists()


def test_resume_note_of_an_earlier_attachment_is_dropped(tmp_path):
    host = _resume_cut_after_remove(tmp_path)
    note = host.bed.paths.state / "resumes" / f"{LABEL}.json"
    import json

    data = json.loads(note.read_text())
    note.write_text(json.dumps({**data, "attachment_created": data["attachment_created"] - 100}))
    host.new_agent()
    host.refresh()
    host.refresh(after=100)
    assert len(host.mdadm.calls) == 2  # a leg missing for another reason is not added by the agent
    assert not note.exists()


def test_resume_not_started_when_it_cannot_be_noted(tmp_path):
    host = Host(tmp_path)
    host.bed.cut_local_recovery()
    (host.bed.paths.state / "resumes").write_text("")  # a file where the directory goes
    host.refresh()
    host.refresh(after=31)
    assert host.mdadm.calls == [] and host.safety.healer.resumes["failure"] == 1


@pytest.mark.parametrize("check_after", [False, True])
def test_check_after_the_heal_only_when_configured(host, check_after):
    """[heal] check_after: once the healed leg is in sync, md is asked to compare the legs
    (sync_action "check"); off, nothing is written."""
    host.safety.healer.check_after = check_after
    sync_action = host.bed.paths.sysfs / "block" / "md127" / "md" / "sync_action"
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()
    host.refresh(after=31)
    assert host.mdadm.calls == heal_commands(host.bed)
    host.refresh(after=60)  # recovering: no check yet
    assert sync_action.read_text().strip() == "recover"
    host.bed.finish_recovery()
    host.refresh()
    assert host.records.get(LABEL) is None
    assert sync_action.read_text().strip() == ("check" if check_after else "idle")
    text = host.exposition()
    assert f'iscsimple_heal_checks_total{{result="started"}} {float(check_after)}' in text
    assert 'iscsimple_heal_checks_total{result="failed"} 0.0' in text


def test_a_check_is_asked_for_only_on_an_idle_array_in_sync(host):
    from iscsimple.core.heal import start_check

    md = host.bed.paths.sysfs / "block" / "md127" / "md"
    host.refresh()
    (md / "sync_action").write_text("resync\n")
    assert "not idle and in sync" in start_check(host.bed.paths, "md127")
    assert (md / "sync_action").read_text() == "resync\n"
    assert "cannot start a check" in start_check(host.bed.paths, "md9")


def test_check_after_comes_from_the_config(tmp_path):
    bed = SafetyBed(tmp_path)
    assert Safety.for_host(bed.paths).healer.check_after is False
    bed.paths.config.write_text("[heal]\ncheck_after = true\n")
    assert Safety.for_host(bed.paths).healer.check_after is True


def test_many_arrays_found_stale_at_once_read_the_kernel_log_once_each_its_own_line(tmp_path, monkeypatch):
    import time

    from iscsimple.core.snapshot import HostSnapshot
    from iscsimple.exporter import safety as exporter_safety
    from iscsimple.exporter.agent import Agent, AgentOptions
    from iscsimple.exporter.simhost import SimulatedHost

    host = SimulatedHost(tmp_path)
    targets = [f"iqn.2026-11.test:lun-{i}" for i in range(5)]
    with host.batch():
        for i, target in enumerate(targets):
            host.add_target(target)
            host.attach(f"vm{i}-disk", f"vm{i}", target, 1)
            host.finish_resync(f"vm{i}-disk")
    for target in targets[:4]:
        host.expire_session(target)  # md fails the iSCSI leg: four stale copies, one healthy mirror
    views = [HostSnapshot.read(host.paths).array(f"vm{i}-disk") for i in range(5)]
    now = time.clock_gettime(time.CLOCK_MONOTONIC)
    lines = [(90, "usb 1-1: new device"), *((0.9 + i / 1000, f"noise {i}") for i in range(200))]
    for i, view in enumerate(views):
        lines.append((10 + i, f"md/raid1:{view.md.name}: Disk failure on {view.iscsi.device}, x."))
    lines.sort(key=lambda line: -line[0])
    (host.paths.devfs / "kmsg").write_text(
        "".join(f"3,{seq},{int((now - ago) * 1e6)},-;{text}\n" for seq, (ago, text) in enumerate(lines, 1))
    )
    reads = []
    real = exporter_safety.read_kernel_log
    monkeypatch.setattr(exporter_safety, "read_kernel_log", lambda paths: reads.append(paths) or real(paths))
    agent = Agent(
        AgentOptions(paths=host.paths, udev=False, mdstat_events=False, kernel_log_events=False, heal=False)
    )
    agent.refresher.refresh_now()
    assert len(reads) == 1
    records = StaleRecords(host.paths)
    for i, view in enumerate(views[:4]):
        record = records.get(f"vm{i}-disk")
        assert (
            record.since_source
            == f"kernel log: md/raid1:{view.md.name}: Disk failure on {view.iscsi.device}, x."
        )
        assert abs(record.since - (time.time() - 10 - i)) < 0.5
    assert records.get("vm4-disk") is None
    agent.refresher.refresh_now()  # nothing new is stale: the log is not read again
    assert len(reads) == 1
