"""remove after a half-done add, after a crash, and with the target dead: always bounded, never stuck."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from iscsimple.core.registry import STATE_ATTACHING, STATE_DETACHING
from tests.fakes.harness import IQN, PORTAL, make_hotplug

NODE = f"iscsiadm -m node -T {IQN}"
LOGOUT = f"{NODE} -p {PORTAL} --logout"
SPEC = f"lun1@{IQN}+vm1"


@pytest.fixture
def hotplug(tmp_path):
    return make_hotplug(tmp_path)


def kill_add_while(hotplug, vbd, match: tuple[str, ...]) -> None:
    """Start an add, wait for the command matching `match` (made to hang), SIGKILL the script as libxl
    does at 40 s (libxl does not kill the script's children: the test then ends the hung fake)."""
    hotplug.host.add_fault("*", match=match, action="hang", seconds=120)
    proc = hotplug.start("add", vbd)
    deadline = time.monotonic() + 60
    while not any(r["fault"] == "hang" for r in hotplug.host.call_records()):
        assert time.monotonic() < deadline, "the add never reached the hanging command"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    for record in hotplug.host.call_records():
        if record["fault"] == "hang":
            os.kill(record["pid"], signal.SIGKILL)
    hotplug.host.clear_faults()


def test_remove_after_an_add_killed_between_build_and_add_undoes_it(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)
    kill_add_while(hotplug, vbd, ("--add",))
    entry = hotplug.registry().get(vbd.attachment_id)
    assert entry.state == STATE_ATTACHING and entry.md_device == "md127"
    assert list(hotplug.host.md_arrays()) == ["md127"]

    result = hotplug.run("remove", vbd)

    assert result.returncode == 0, result.stderr
    assert hotplug.command_lines()[-2:] == ["mdadm --stop /dev/md/vm1", LOGOUT]
    assert hotplug.host.md_arrays() == {}
    assert hotplug.host.session_targets() == []
    assert hotplug.registry().list() == []


def test_remove_after_an_add_killed_during_login_logs_out(hotplug):
    hotplug.set_config(f'[iscsi]\nportals = ["{PORTAL}"]\nlogin_timeout = 2\n[attach]\ndevice_wait = 3\n')
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)
    kill_add_while(hotplug, vbd, ("--login",))
    assert hotplug.registry().get(vbd.attachment_id).state == STATE_ATTACHING

    assert hotplug.run("remove", vbd).returncode == 0

    assert hotplug.registry().list() == []
    assert not any(line.startswith("mdadm --stop") for line in hotplug.command_lines())


def kill_add_once_called(hotplug, vbd, match: tuple[str, ...], until=lambda: True) -> None:
    """Start an add and SIGKILL the script (not its children, as libxl does) as soon as it has started
    the command matching `match` and `until()` holds; that command runs on."""
    proc = hotplug.start("add", vbd)
    deadline = time.monotonic() + 60
    while not any(all(m in " ".join(r["argv"]) for m in match) for r in hotplug.host.call_records()):
        assert time.monotonic() < deadline, "the add never ran the command"
        time.sleep(0.02)
    while not until():  # the fake records a call before its effect lands
        assert time.monotonic() < deadline, "the command never took effect"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def test_remove_after_an_add_killed_after_the_login_succeeded_logs_the_session_out(hotplug):
    """The login went through but iscsiadm had not returned when libxl killed the script: the session
    exists and nothing but the marker written before the login says iscsimple opened it."""
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)
    hotplug.host.add_fault("iscsiadm", match=("--login",), action="effect_then_hang", seconds=120)
    kill_add_once_called(hotplug, vbd, ("--login",), until=lambda: hotplug.host.session_targets() == [IQN])
    assert hotplug.host.session_targets() == [IQN]
    assert hotplug.registry().get(vbd.attachment_id).state == STATE_ATTACHING

    result = hotplug.run("remove", vbd)

    assert result.returncode == 0, result.stderr
    assert hotplug.command_lines()[-1] == LOGOUT
    assert hotplug.host.session_targets() == []
    assert hotplug.registry().list() == []
    assert not (hotplug.paths.state / "sessions" / f"{IQN}.json").exists()
    for record in hotplug.host.call_records():
        if record["fault"] == "effect_then_hang":
            with contextlib.suppress(ProcessLookupError):  # the fake may have ended already
                os.kill(record["pid"], signal.SIGKILL)


def test_remove_while_the_killed_adds_login_still_runs_waits_for_it_and_logs_out(hotplug):
    """Killed while `iscsiadm --login` was still logging in (a slow target): the session appears only
    after remove started. remove waits for the login's window and logs the session out."""
    hotplug.set_config(f'[iscsi]\nportals = ["{PORTAL}"]\nlogin_timeout = 6\n[attach]\ndevice_wait = 3\n')
    hotplug.host.add_target(IQN)
    hotplug.host.set_target(IQN, login_seconds=2)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)
    kill_add_once_called(hotplug, vbd, ("--login",))
    assert hotplug.host.session_targets() == []  # still logging in

    result = hotplug.run("remove", vbd)

    assert result.returncode == 0, result.stderr
    assert hotplug.command_lines()[-1] == LOGOUT
    assert hotplug.host.session_targets() == []
    assert hotplug.registry().list() == []


def test_add_after_a_crashed_add_of_the_same_disk_cleans_up_first(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)
    kill_add_while(hotplug, vbd, ("--add",))

    result = hotplug.add(vbd)

    assert "undoing what an unfinished earlier attach" in result.stderr
    lines = hotplug.command_lines()
    # The leftover array was stopped (and the session it alone used logged out) before the new build.
    builds = [i for i, line in enumerate(lines) if line.startswith("mdadm --build")]
    assert len(builds) == 2
    assert builds[0] < lines.index("mdadm --stop /dev/md/vm1") < builds[1]
    assert list(hotplug.host.md_arrays()) == ["md127"]
    assert hotplug.host.session_targets() == [IQN]
    assert hotplug.registry().get(vbd.attachment_id).state == "attached"


def test_remove_with_the_target_dead_does_not_touch_the_disk_and_finishes(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)
    hotplug.add(vbd)
    hotplug.host.kill_target(IQN)

    result = hotplug.run("remove", vbd)

    assert result.returncode == 0, result.stderr
    assert hotplug.command_lines()[-2:] == ["mdadm --stop /dev/md/vm1", LOGOUT]
    assert hotplug.host.md_arrays() == {} and hotplug.host.session_targets() == []


@pytest.mark.slow
def test_remove_with_mdadm_stuck_is_bounded_keeps_the_entry_and_a_retry_finishes(hotplug):
    hotplug.set_config(f'[iscsi]\nportals = ["{PORTAL}"]\n[attach]\nbudget = 6\ndevice_wait = 3\n')
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)
    hotplug.add(vbd)
    hotplug.host.kill_target(IQN)
    hotplug.host.add_fault("mdadm", match=("--stop",), action="hang", seconds=60)

    result = hotplug.run("remove", vbd)

    assert result.returncode == 1
    assert result.seconds < 6 + 3
    error = hotplug.xs(vbd, "hotplug-error").replace(str(hotplug.host.root), "")
    assert "cannot stop the array of vm1 (md127)" in error and "retry remove" in error
    assert hotplug.registry().get(vbd.attachment_id).state == STATE_DETACHING
    assert hotplug.host.session_targets() == [IQN]  # the array still holds the LUN: no logout

    hotplug.host.clear_faults()
    assert hotplug.run("remove", vbd).returncode == 0
    assert hotplug.host.md_arrays() == {} and hotplug.host.session_targets() == []
    assert hotplug.registry().list() == []


@pytest.mark.slow
def test_remove_with_logout_stuck_is_bounded_and_says_how_to_finish(hotplug):
    hotplug.set_config(f'[iscsi]\nportals = ["{PORTAL}"]\n[attach]\nbudget = 6\ndevice_wait = 3\n')
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)
    hotplug.add(vbd)
    hotplug.host.add_fault("iscsiadm", match=("--logout",), action="hang", seconds=60)

    result = hotplug.run("remove", vbd)

    assert result.returncode == 1
    assert result.seconds < 6 + 3
    error = hotplug.xs(vbd, "hotplug-error")
    assert f"is detached, but logging out of {IQN} failed" in error
    assert f"iscsiadm -m node -T {IQN} --logout" in error
    assert hotplug.host.md_arrays() == {}
    assert hotplug.registry().list() == []


def test_remove_works_with_a_broken_config_and_add_refuses_it(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(SPEC)
    hotplug.add(vbd)
    hotplug.set_config("[iscsi]\nlogin_timout = 5\n")  # a typo

    removed = hotplug.run("remove", vbd)

    assert removed.returncode == 0, removed.stderr
    assert "removing with the default settings" in removed.stderr
    assert hotplug.host.md_arrays() == {} and hotplug.host.session_targets() == []
    added = hotplug.run("add", vbd)
    assert added.returncode == 1
    assert "login_timout" in hotplug.xs(vbd, "hotplug-error")


def test_remove_waits_for_the_kernel_to_delete_the_stopped_md_node(tmp_path, caplog):
    """md deletes /sys/block/mdN from a workqueue after STOP_ARRAY: remove returns once it is gone,
    and a node that lingers past the bound is logged, not an error (the array is stopped)."""
    import threading

    from iscsimple.core.paths import HostPaths
    from iscsimple.core.run import Deadline
    from iscsimple.hotplug.devices import wait_for_md_gone

    paths = HostPaths(sysfs=tmp_path / "sys")
    node = paths.sysfs / "block" / "md127"
    node.mkdir(parents=True)
    threading.Timer(0.3, node.rmdir).start()
    started = time.monotonic()
    wait_for_md_gone(paths, "md127", Deadline(30), wait=10)
    assert not node.exists()
    assert 0.25 <= time.monotonic() - started < 5

    node.mkdir()
    started = time.monotonic()
    with caplog.at_level("INFO"):
        wait_for_md_gone(paths, "md127", Deadline(30), wait=0.2)
    assert time.monotonic() - started < 5
    assert "md127 is stopped but its node is still listed" in caplog.text


@pytest.mark.parametrize("content", [b"\xff\x00", b""], ids=["garbage", "empty"])
def test_remove_stops_an_array_whose_state_cannot_be_read(hotplug, content):
    """md/array_state unreadable: remove took the array for gone, skipped mdadm --stop, dropped the
    registry entry and logged out under a running array (exit 0). Unknown is stopped like a running one."""
    hotplug.host.add_target(IQN, luns={1: 64 << 20})
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1")
    hotplug.add(vbd)
    (
        hotplug.host.root / "sys" / "devices" / "virtual" / "block" / "md127" / "md" / "array_state"
    ).write_bytes(content)
    result = hotplug.run("remove", vbd)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("mdadm --stop /dev/md/vm1") for line in hotplug.command_lines())
    assert hotplug.host.md_arrays() == {} and hotplug.host.session_targets() == []
    assert hotplug.registry().list() == []
