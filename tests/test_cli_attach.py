"""`iscsimple attach/detach/status` as real processes against the fake-tools host
(fake iscsiadm, mdadm and xenstore keeping a fake sysfs and /dev)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.harness import IQN, PORTAL, make_hotplug

NODE = f"iscsiadm -m node -T {IQN}"


@pytest.fixture
def hp(tmp_path):
    return make_hotplug(tmp_path)


def iscsimple(hp, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "iscsimple"
    argv = [str(script)] if script.exists() else [shutil.which("iscsimple") or "iscsimple"]
    return subprocess.run([*argv, *args], env=hp.env, capture_output=True, text=True, timeout=timeout)


def test_attach_status_detach_a_mirror(hp):
    hp.host.add_target(IQN, luns={1: 64 << 20})
    local = hp.mirror("vm1")
    spec = f"lun1@{IQN}+vm1"

    result = iscsimple(hp, "attach", spec)
    assert result.returncode == 0, result.stderr
    md = hp.host.dev / "md" / "vm1"  # /dev/md/vm1 under the fake host's devfs
    assert result.stdout == f"{md}\n"
    assert hp.command_lines()[-2:] == [
        "mdadm --build /dev/md/vm1 --level=1 --raid-devices=2 missing --write-mostly /dev/sda",
        f"mdadm /dev/md/vm1 --add {local.replace(str(hp.host.root), '')}",
    ]

    status = iscsimple(hp, "status", "--json")
    assert status.returncode == 0, status.stderr
    (disk,) = json.loads(status.stdout)["disks"]
    assert (disk["id"], disk["label"], disk["md_device"], disk["running"]) == (
        "cli-vm1",
        "vm1",
        "md127",
        True,
    )
    assert (
        disk["iscsi"]["device"] == "sda"
        and disk["iscsi"]["state"] == "in_sync"
        and disk["iscsi"]["write_mostly"]
    )
    assert disk["local"]["device"] == "dm-0" and disk["local"]["state"] != "in_sync"
    assert disk["session"]["state"] == "LOGGED_IN" and disk["session"]["replacement_timeout"] == 5
    assert disk["session"]["replacement_timeout_configured"] == 5
    assert disk["unprotected"] is True and disk["local_only"] is False

    table = iscsimple(hp, "status")
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:4] == ["VM", "VBD", "LABEL", "MD"]
    assert "vm1" in row and "md127" in row and "sda in_sync wm" in row and "UNPROTECTED" in row

    result = iscsimple(hp, "detach", spec)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{md}\n"
    assert hp.command_lines()[-2:] == ["mdadm --stop /dev/md/vm1", f"{NODE} -p {PORTAL} --logout"]
    assert iscsimple(hp, "status").stdout == "no iscsimple disks are attached on this host\n"


def test_attach_a_plain_lun_prints_its_device(hp):
    hp.host.add_target(IQN, luns={0: 64 << 20})
    result = iscsimple(hp, "attach", IQN)
    assert (result.returncode, result.stdout) == (0, "/dev/sda\n"), result.stderr
    assert not [c for c in hp.command_lines() if c.startswith("mdadm")]
    assert iscsimple(hp, "detach", f"lun0@{IQN}").returncode == 0
    assert hp.host.session_targets() == []


def test_status_shows_the_vm_xl_started(hp):
    hp.host.add_target(IQN, luns={1: 64 << 20})
    hp.mirror("web1-root")
    vbd = hp.vbd(f"lun1@{IQN}+web1-root", domid=7, name="web1")
    hp.add(vbd)
    row = iscsimple(hp, "status").stdout.splitlines()[1]
    assert row.startswith("web1 ") and "web1-root" in row and "md127" in row


def test_label_without_tab_line_is_exit_2(hp):
    hp.host.add_target(IQN, luns={1: 64 << 20})
    result = iscsimple(hp, "attach", f"lun1@{IQN}+nolabel")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("iscsimple attach: ") and "no entry for LABEL 'nolabel'" in line
    assert hp.command_lines() == []


def test_unreachable_target_is_exit_1_and_leaves_nothing(hp):
    hp.host.add_target(IQN, luns={1: 64 << 20}, reachable=False)
    hp.mirror("vm1")
    result = iscsimple(hp, "attach", f"lun1@{IQN}+vm1")
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("iscsimple attach: ") and "Traceback" not in result.stderr
    assert hp.host.md_arrays() == {} and hp.host.session_targets() == []
    assert iscsimple(hp, "status").stdout == "no iscsimple disks are attached on this host\n"


def test_bitmap_store_makes_the_ram_store_reports_it_and_retries_a_failure_when_asked(hp):
    directory = hp.paths.records / "bitmaps"
    failed = iscsimple(hp, "bitmap-store")  # this host has no zram module yet
    assert failed.returncode == 1
    assert "no RAM store for bitmap files (cannot load the zram module" in failed.stdout, failed
    hp.host.enable_zram()
    made = iscsimple(hp, "bitmap-store")  # an operator's run tries again despite this boot's failure
    zram = hp.host.dev / "zram0"
    assert made.returncode == 0, made.stderr
    assert made.stdout == f"{directory}: ext4 on {zram}\n"
    assert [m[:3] for m in hp.host.mounts() if m[1] == str(directory)] == [
        [str(zram), str(directory), "ext4"]
    ]
    again = iscsimple(hp, "bitmap-store")
    assert again.returncode == 0 and again.stdout == made.stdout
    assert [c[0] for c in hp.host.calls(("mkfs.ext4",))] == ["mkfs.ext4"], "made once"
