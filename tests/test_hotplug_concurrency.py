"""Concurrent hotplugs (real processes) and the lock they share with Xen's own scripts."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from iscsimple.core.locking import LockTimeout, hotplug_lock
from iscsimple.core.run import Deadline
from tests.fakes.harness import IQN, make_hotplug

XEN_LOCKING_SH = Path(
    "/etc/xen/scripts/locking.sh"
)  # Debian package xen-utils-4.17 (scripts/debian-packages.txt)


@pytest.fixture
def hotplug(tmp_path):
    return make_hotplug(tmp_path)


def run_all(hotplug, command, vbds):
    procs = [hotplug.start(command, vbd) for vbd in vbds]
    results = [proc.communicate(timeout=180) for proc in procs]
    for proc, vbd, (_, err) in zip(procs, vbds, results, strict=True):
        assert proc.returncode == 0, f"{command} {vbd}: {hotplug.xs(vbd, 'hotplug-error')}\n{err}"


@pytest.mark.slow
def test_16_concurrent_adds_on_one_target_log_in_once_and_the_last_remove_logs_out_once(hotplug):
    hotplug.host.add_target(IQN, luns={lun: 16 << 20 for lun in range(1, 17)})
    vbds = []
    for lun in range(1, 17):
        hotplug.mirror(f"vm{lun}", size=16 << 20)
        vbds.append(hotplug.vbd(f"lun{lun}@{IQN}+vm{lun}", domid=lun))

    run_all(hotplug, "add", vbds)

    commands = hotplug.command_lines()
    assert sum(line.endswith("--login") for line in commands) == 1
    assert sum(line.startswith("mdadm --build") for line in commands) == 16
    assert len(hotplug.host.md_arrays()) == 16
    assert hotplug.host.session_targets() == [IQN]
    entries = hotplug.registry().list()
    assert sorted(e.label for e in entries) == sorted(f"vm{n}" for n in range(1, 17))
    assert all(e.state == "attached" for e in entries)
    assert sum(e.we_logged_in for e in entries) == 1
    # Every disk got its own LUN's device, none twice.
    assert len({e.iscsi_device for e in entries}) == 16

    run_all(hotplug, "remove", vbds)

    commands = hotplug.command_lines()
    assert sum(line.endswith("--logout") for line in commands) == 1
    assert commands[-1].endswith("--logout")  # after every array was stopped
    assert hotplug.host.md_arrays() == {}
    assert hotplug.host.session_targets() == []
    assert hotplug.registry().list() == []


@pytest.mark.slow
def test_concurrent_plain_luns_and_mirrors_share_one_login(hotplug):
    hotplug.host.add_target(IQN, luns={lun: 16 << 20 for lun in range(0, 8)})
    vbds = [hotplug.vbd(f"lun{lun}@{IQN}", domid=lun + 1) for lun in range(0, 4)]
    for lun in range(4, 8):
        hotplug.mirror(f"m{lun}", size=16 << 20)
        vbds.append(hotplug.vbd(f"lun{lun}@{IQN}+m{lun}", domid=lun + 1))

    run_all(hotplug, "add", vbds)

    assert sum(line.endswith("--login") for line in hotplug.command_lines()) == 1
    # Mixed target: the long timeout, whoever came first.
    recovery_tmo = hotplug.host.sys / "class" / "iscsi_session" / "session1" / "recovery_tmo"
    assert recovery_tmo.read_text().strip() == "120"

    run_all(hotplug, "remove", vbds)
    assert sum(line.endswith("--logout") for line in hotplug.command_lines()) == 1
    assert hotplug.host.session_targets() == []


# -- the lock itself -----------------------------------------------------------------------------


def test_lock_excludes_a_second_holder_until_released_and_removes_its_file(tmp_path):
    with hotplug_lock(tmp_path, "iscsimple-target-x"):
        assert (tmp_path / "iscsimple-target-x").exists()
        started = time.monotonic()
        with (
            pytest.raises(LockTimeout, match=r"held the lock .* for the whole 0 s budget"),
            hotplug_lock(tmp_path, "iscsimple-target-x", Deadline(0.3)),
        ):
            pass
        assert time.monotonic() - started >= 0.25
        with hotplug_lock(tmp_path, "iscsimple-target-y", Deadline(0.3)):  # other names are free
            pass
    assert not (tmp_path / "iscsimple-target-x").exists()  # released like release_lock: unlinked
    with hotplug_lock(tmp_path, "iscsimple-target-x", Deadline(0.3)):
        pass


def _xen_claim(lock_dir: Path, name: str, hold: float) -> subprocess.Popen:
    script = f"source {XEN_LOCKING_SH}\nLOCK_BASEDIR={lock_dir}\nclaim_lock {name}\necho claimed\nsleep {hold}\nrelease_lock {name}\n"
    return subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(not XEN_LOCKING_SH.exists(), reason="Xen's locking.sh not installed (xen-utils-4.17)")
def test_lock_is_the_same_lock_as_xens_claim_lock(tmp_path):
    # Xen holds it: we wait until its release_lock.
    xen = _xen_claim(tmp_path, "iscsimple-target-x", 1.0)
    assert xen.stdout.readline().strip() == "claimed"
    started = time.monotonic()
    with hotplug_lock(tmp_path, "iscsimple-target-x", Deadline(20)):
        waited = time.monotonic() - started
    xen.wait(timeout=20)
    assert waited > 0.5

    # We hold it: Xen's claim_lock waits until we let go.
    with hotplug_lock(tmp_path, "iscsimple-target-x"):
        xen = _xen_claim(tmp_path, "iscsimple-target-x", 0)
        time.sleep(0.5)
        assert xen.poll() is None  # still waiting in flock
        released = time.monotonic()
    out, _ = xen.communicate(timeout=20)
    assert out.strip() == "claimed"
    assert time.monotonic() - released < 10
    assert os.listdir(tmp_path) == []
