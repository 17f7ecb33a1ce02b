"""A failed add undoes exactly what it did and tells the operator, in hotplug-error, what to do.

Failures are injected into the fake tools (a command fails at step N, hangs, or does
its work and then hangs) or set up on the fake host (a dead target, a mounted local
device, a stale iSCSI copy...). After each: exit 1, hotplug-status=error, an
actionable hotplug-error, and nothing left behind: no array, no session this add
opened, no registry entry, no physical-device for libxl to pick up.
"""

from __future__ import annotations

import os
import time

import pytest

from iscsimple.core.stale import StaleRecord, StaleRecords
from tests.fakes.harness import IQN, PORTAL, make_hotplug

NODE = f"iscsiadm -m node -T {IQN}"
LOGOUT = f"{NODE} -p {PORTAL} --logout"
SPEC = f"lun1@{IQN}+vm1"


@pytest.fixture
def hotplug(tmp_path):
    return make_hotplug(tmp_path)


def assert_failed_cleanly(hotplug, vbd, result, message: str, sessions: tuple[str, ...] = ()):
    error = (hotplug.xs(vbd, "hotplug-error") or "").replace(str(hotplug.host.root), "")
    assert result.returncode == 1, result.stderr
    assert hotplug.xs(vbd, "hotplug-status") == "error"
    assert message in error, error
    assert hotplug.xs(vbd, "physical-device") is None
    assert hotplug.xs(vbd, "iscsimple-id") is None
    assert hotplug.host.md_arrays() == {}
    assert tuple(hotplug.host.session_targets()) == sessions
    assert hotplug.registry().get(vbd.attachment_id) is None
    assert hotplug.registry().read_stats().totals["add"]["failure"] >= 1
    return error


# Steps of a mirrored add of a target the node DB does not know, and what undoing it runs.
STEPS = [
    ("node DB query", "iscsiadm failed for target", []),
    ("discovery", "discovery did not find it", []),
    ("set replacement timeout", "iscsiadm failed for target", []),
    ("set login timeout", "iscsiadm failed for target", []),
    ("set login retries", "iscsiadm failed for target", []),
    ("login", "iscsiadm failed for target", [LOGOUT]),  # iscsid may go on logging in: log out
    ("mdadm --build", "building /dev/md/vm1 failed", [LOGOUT]),
    ("mdadm --add", "adding", ["mdadm --stop /dev/md/vm1", LOGOUT]),
]


@pytest.mark.parametrize("step", range(len(STEPS)), ids=[s[0] for s in STEPS])
def test_failure_at_each_step_is_undone_exactly(hotplug, step):
    _, message, undo = STEPS[step]
    hotplug.host.add_target(IQN, in_node_db=False)
    hotplug.mirror("vm1")
    hotplug.host.add_fault("*", skip=step, rc=1, stderr="iscsimple-test: injected failure")
    vbd = hotplug.vbd(SPEC)

    result = hotplug.run("add", vbd)

    error = assert_failed_cleanly(hotplug, vbd, result, message)
    assert error.startswith(f"cannot attach {SPEC}: ")
    assert "injected failure" in error or step == 1  # discovery's reason is in its own words
    commands = hotplug.command_lines()
    assert len(commands) == step + 1 + len(undo)
    assert commands[step + 1 :] == undo


def test_failure_with_a_shared_session_leaves_the_session_and_the_other_disk(hotplug):
    hotplug.host.add_target(IQN, luns={1: 64 << 20, 2: 64 << 20})
    hotplug.mirror("vm1")
    hotplug.mirror("vm2")
    first = hotplug.vbd(SPEC)
    hotplug.add(first)
    hotplug.host.add_fault("mdadm", match=("--build",), stderr="mdadm: injected failure")
    second = hotplug.vbd(f"lun2@{IQN}+vm2", domid=2)

    result = hotplug.run("add", second)

    assert result.returncode == 1
    assert "injected failure" in hotplug.xs(second, "hotplug-error")
    assert not any("--logout" in line for line in hotplug.command_lines())
    assert hotplug.host.session_targets() == [IQN]
    assert list(hotplug.host.md_arrays()) == ["md127"]
    assert hotplug.registry().get(first.attachment_id).state == "attached"
    assert hotplug.registry().get(second.attachment_id) is None


def test_failing_xenstore_write_is_undone(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    hotplug.host.add_fault("xenstore-write", match=("physical-device",), stderr="xenstore-write: injected")
    vbd = hotplug.vbd(SPEC)

    result = hotplug.run("add", vbd)

    assert_failed_cleanly(hotplug, vbd, result, "xenstore-write")
    assert hotplug.command_lines()[-2:] == ["mdadm --stop /dev/md/vm1", LOGOUT]


@pytest.mark.slow
def test_build_that_hangs_after_building_is_killed_and_its_array_stopped_within_the_budget(hotplug):
    hotplug.set_config(f'[iscsi]\nportals = ["{PORTAL}"]\n[attach]\nbudget = 8\ndevice_wait = 3\n')
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    hotplug.host.add_fault("mdadm", match=("--build",), action="effect_then_hang")
    vbd = hotplug.vbd(SPEC)

    result = hotplug.run("add", vbd)

    assert result.seconds < 8 + 3  # the budget, plus starting Python twice on a busy machine
    assert_failed_cleanly(hotplug, vbd, result, "building /dev/md/vm1: mdadm did not finish in the")
    assert hotplug.command_lines()[-2:] == ["mdadm --stop /dev/md/vm1", LOGOUT]


@pytest.mark.slow
def test_hanging_login_is_bounded_and_logged_out(hotplug):
    hotplug.set_config(f'[iscsi]\nportals = ["{PORTAL}"]\nlogin_timeout = 2\n')
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    hotplug.host.add_fault("iscsiadm", match=("--login",), action="hang")
    vbd = hotplug.vbd(SPEC)

    result = hotplug.run("add", vbd)

    assert result.seconds < 2 + 5
    error = assert_failed_cleanly(hotplug, vbd, result, "did not answer within 2 s")
    assert "check that the filer is up" in error
    assert hotplug.command_lines()[-1] == LOGOUT


# -- refusals and their sentences -------------------------------------------------------------


def test_unreachable_target(hotplug):
    hotplug.host.add_target(IQN, reachable=False)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)

    error = assert_failed_cleanly(
        hotplug, vbd, hotplug.run("add", vbd), f"cannot reach iSCSI target {IQN} at {PORTAL}"
    )
    assert "check the network and the filer" in error


def test_unknown_target_without_portals(hotplug):
    hotplug.set_config("[iscsi]\n")
    hotplug.host.add_target(IQN, in_node_db=False)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)

    error = assert_failed_cleanly(
        hotplug, vbd, hotplug.run("add", vbd), "no discovery portals are configured"
    )
    assert str(hotplug.paths.config) in error
    assert hotplug.command_lines() == [NODE]


def test_target_no_portal_offers(hotplug):
    hotplug.host.add_target(IQN, in_node_db=False, portal="192.0.2.99:3260")
    hotplug.host.add_target("iqn.2001-04.com.example:other", in_node_db=False)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)

    error = assert_failed_cleanly(hotplug, vbd, hotplug.run("add", vbd), "discovery did not find it")
    assert f"{PORTAL} does not offer it" in error


def test_dead_session_is_not_built_upon(hotplug):
    hotplug.host.add_target(IQN, luns={1: 64 << 20, 2: 64 << 20})
    hotplug.mirror("vm1")
    hotplug.mirror("vm2")
    hotplug.add(hotplug.vbd(SPEC))
    hotplug.host.kill_target(IQN)
    vbd = hotplug.vbd(f"lun2@{IQN}+vm2", domid=2)

    result = hotplug.run("add", vbd)

    assert result.returncode == 1
    error = hotplug.xs(vbd, "hotplug-error")
    assert "is not logged in (session 1 FAILED)" in error and "attach again once it is back" in error
    assert list(hotplug.host.md_arrays()) == ["md127"]  # the first disk untouched


def test_lun_that_never_appears_is_given_up_on_within_device_wait(hotplug):
    hotplug.set_config(f'[iscsi]\nportals = ["{PORTAL}"]\n[attach]\ndevice_wait = 1\n')
    hotplug.host.add_target(IQN, luns={1: 64 << 20})
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(f"lun9@{IQN}+vm1")

    result = hotplug.run("add", vbd)

    error = assert_failed_cleanly(hotplug, vbd, result, f"LUN 9 of {IQN} did not show up within 1 s")
    assert "mapped to this host's initiator name" in error
    assert hotplug.command_lines()[-1] == LOGOUT


def test_label_without_tab_entry(hotplug):
    hotplug.host.add_target(IQN)
    vbd = hotplug.vbd(SPEC)

    error = assert_failed_cleanly(hotplug, vbd, hotplug.run("add", vbd), "no entry for LABEL 'vm1'")
    assert error.startswith(f"cannot attach {SPEC}: ")
    assert "add a line 'vm1 /dev/VG/LV'" in error
    assert hotplug.command_lines() == []


def test_bad_spec(hotplug):
    vbd = hotplug.vbd("lunX@iqn.2001-04.com.example:storage")

    result = hotplug.run("add", vbd)

    assert result.returncode == 1
    assert "bad disk spec" in hotplug.xs(vbd, "hotplug-error")
    assert "lunX" in hotplug.xs(vbd, "hotplug-error")
    assert hotplug.registry().read_stats().totals == {"add": {"failure": 1}}


def test_missing_params(hotplug):
    vbd = hotplug.vbd("x")
    hotplug.host.xenstore_write(f"{vbd.xenbus_path}/params", "")

    result = hotplug.run("add", vbd)

    assert result.returncode == 1
    assert "params is empty or missing" in hotplug.xs(vbd, "hotplug-error")


@pytest.mark.parametrize("problem", ["missing", "regular file", "mounted", "held", "too small"])
def test_local_device_that_must_not_be_overwritten(hotplug, problem):
    hotplug.host.add_target(IQN, luns={1: 64 << 20})
    if problem == "missing":
        device, message = str(hotplug.host.dev / "vg0" / "nope"), "does not exist"
    elif problem == "regular file":
        device = str(hotplug.host.base / "disk.img")
        open(device, "w").close()
        message = "is not a block device"
    elif problem == "mounted":
        device = hotplug.host.add_local_device("vg0/vm1")
        hotplug.host.mount(device, "/srv/data")
        message = "is mounted on /srv/data"
    elif problem == "held":
        device = hotplug.host.add_local_device("vg0/vm1")
        hotplug.host.build_array("someone-else", [device, None])
        message = "is in use by md127"
    else:
        device = hotplug.host.add_local_device("vg0/vm1", size=32 << 20)
        message = f"has {32 << 20} bytes, less than the iSCSI LUN's {64 << 20}"
    hotplug.add_tab("vm1", device)
    arrays_before = hotplug.host.md_arrays()
    vbd = hotplug.vbd(SPEC)

    result = hotplug.run("add", vbd)

    assert result.returncode == 1
    assert message in hotplug.xs(vbd, "hotplug-error")
    assert hotplug.host.md_arrays() == arrays_before
    assert hotplug.host.session_targets() == []
    if problem == "too small":  # known only once the LUN is there: logged in, then out again
        assert hotplug.command_lines()[-1] == LOGOUT
    else:  # refused before anything ran
        assert hotplug.command_lines() == []


def test_running_array_of_the_label_is_refused(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    hotplug.host.build_array("vm1", [hotplug.host.add_local_device("vg1/other"), None])
    vbd = hotplug.vbd(SPEC)

    result = hotplug.run("add", vbd)

    assert result.returncode == 1
    assert "/dev/md/vm1 is already running (md127) but iscsimple did not attach it" in hotplug.xs(
        vbd, "hotplug-error"
    )
    assert hotplug.command_lines() == []
    assert list(hotplug.host.md_arrays()) == ["md127"]


def test_label_attached_to_another_vm_is_refused(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    hotplug.add(hotplug.vbd(SPEC, domid=5, name="db1"))
    before = hotplug.command_lines()
    vbd = hotplug.vbd(SPEC, domid=6)

    result = hotplug.run("add", vbd)

    assert result.returncode == 1
    error = hotplug.xs(vbd, "hotplug-error")
    assert "vm1 is already attached (db1, vbd-5-" in error and "detach it there first" in error
    assert hotplug.command_lines() == before


def test_stale_iscsi_copy_is_never_built_upon(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    records = StaleRecords(hotplug.paths)
    since = time.time() - 3600
    records.put(
        StaleRecord("vm1", since, "md127", "db1", 5, IQN, 1, "sda", "/dev/vg0/vm1", "md failed the iSCSI leg")
    )
    vbd = hotplug.vbd(SPEC)

    result = hotplug.run("add", vbd)

    error = assert_failed_cleanly(hotplug, vbd, result, "refusing to attach vm1")
    assert error.startswith(f"cannot attach {SPEC}: refusing to attach vm1: since ")
    assert "the local leg of vm1 (db1) holds writes its iSCSI copy lacks" in error
    assert str(records.path("vm1")) in error
    assert "iscsimple resolve vm1 --keep local" in error and "--keep iscsi" in error
    assert hotplug.command_lines() == []  # not even a login
    assert os.path.exists(records.path("vm1"))  # the record stands


def test_stale_record_does_not_stop_a_mirror_built_from_the_local_leg(hotplug):
    hotplug.mirror("vm1")
    StaleRecords(hotplug.paths).put(
        StaleRecord("vm1", time.time(), "md127", None, None, IQN, 1, "sda", None, "md failed the iSCSI leg")
    )
    vbd = hotplug.vbd("MISSING+vm1")

    hotplug.add(vbd)

    assert hotplug.host.md_arrays()["md127"]["members"] == {"dm-0": "in_sync"}


def test_lun_attached_to_another_disk_is_refused(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    hotplug.add(hotplug.vbd(SPEC, domid=5, name="db1"))
    before = hotplug.command_lines()
    vbd = hotplug.vbd(f"lun1@{IQN}", domid=6)  # the same LUN, unmirrored, for another VM

    result = hotplug.run("add", vbd)

    assert result.returncode == 1
    error = hotplug.xs(vbd, "hotplug-error")
    assert f"LUN 1 of {IQN} is already attached (db1, vbd-5-" in error and "would corrupt it" in error
    assert hotplug.command_lines() == before
    assert hotplug.host.session_targets() == [IQN]


def test_lun_disk_held_by_something_else_is_refused(hotplug):
    hotplug.host.add_target(IQN, luns={1: 64 << 20, 2: 64 << 20})
    hotplug.mirror("vm1")
    hotplug.add(hotplug.vbd(SPEC))
    hotplug.host.build_array("not-ours", [str(hotplug.host.dev / "sdb"), None])  # someone used LUN 2's disk
    vbd = hotplug.vbd(f"lun2@{IQN}", domid=2)

    result = hotplug.run("add", vbd)

    assert result.returncode == 1
    assert "LUN 2's disk sdb is in use by md126" in hotplug.xs(vbd, "hotplug-error")
    assert hotplug.registry().get(vbd.attachment_id) is None
    assert hotplug.host.session_targets() == [IQN]  # vm1 still uses the session
