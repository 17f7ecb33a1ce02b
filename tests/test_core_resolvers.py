"""One resolver per fact, in core: who a disk belongs to, which array is LABEL's, whether a plain
LUN is usable, what holds a block device and how big it is."""

from __future__ import annotations

import os

import pytest
from fixturetree import FakeLun, FakeMember, register_capture_array, write_iscsi_session, write_md_array

from iscsimple.core.md import md_kernel_names, md_names_for
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import vm_name
from iscsimple.core.snapshot import HostSnapshot
from iscsimple.core.sysfs import block_holders, block_size_bytes
from iscsimple.hotplug.devices import DeviceError, holders

TARGET = "iqn.2026-11.test.local:disk1"


def test_vm_name_in_words_and_as_a_metric_label():
    assert vm_name("web1", 7) == "web1"
    assert vm_name(None, 7) == "domain 7"
    assert vm_name(None, 7, numbered="{}") == "7"
    assert vm_name(None, None) == ""
    assert vm_name("", None, unknown="cli-web1") == "cli-web1"


def paths_at(root) -> HostPaths:
    return HostPaths(
        procfs=root / "proc", sysfs=root / "sys", devfs=root / "dev", state=root / "run", records=root / "lib"
    )


def test_an_array_named_md_label_is_found_without_registry_or_link(tmp_path):
    """mdadm with names=yes makes md_LABEL; the snapshot knows it as the hotplug does."""
    paths = paths_at(tmp_path)
    write_md_array(paths.sysfs, "md_test", [FakeMember("sda", slot=1, dev="8:0")])
    register_capture_array(tmp_path, md_device=None)
    assert md_names_for(paths, "test") == ["md_test"]
    assert md_kernel_names(paths, "test") == ["md_test"]
    assert HostSnapshot.read(paths).arrays[0].md.name == "md_test"


def test_dev_md_link_comes_first(tmp_path):
    paths = paths_at(tmp_path)
    write_md_array(paths.sysfs, "md127", [])
    (paths.devfs / "md").mkdir(parents=True)
    (paths.devfs / "md" / "test").symlink_to("../md127")
    assert md_names_for(paths, "test") == ["md127", "md_test"]
    assert md_kernel_names(paths, "test") == ["md127"]


@pytest.mark.parametrize(
    ("session_state", "block", "state", "present"),
    [
        ("LOGGED_IN", "sdb", "in_sync", True),
        ("FAILED", "sdb", "missing", True),
        ("LOGGED_IN", None, "missing", False),
    ],
)
def test_plain_lun_health_is_derived_in_the_snapshot(tmp_path, session_state, block, state, present):
    paths = paths_at(tmp_path)
    write_iscsi_session(paths.sysfs, 1, TARGET, [FakeLun(1, block, "8:16")], state=session_state)
    register_capture_array(
        tmp_path, label=None, md_device=None, local_device=None, local_kernel_name=None, iscsi_device="sdb"
    )
    snap = HostSnapshot.read(paths)
    (plain,) = snap.plain
    assert (plain.state, plain.present, plain.device) == (state, present, "sdb")
    assert snap.arrays == ()


def test_holders_and_size_of_a_block_device(tmp_path):
    sysfs = tmp_path / "sys"
    write_iscsi_session(sysfs, 1, TARGET, [FakeLun(1, "sdb", "8:16")])
    disk = os.path.realpath(sysfs / "class" / "block" / "sdb")
    os.mkdir(os.path.join(disk, "holders"))
    os.mkdir(os.path.join(disk, "holders", "md127"))
    with open(os.path.join(disk, "size"), "w") as f:
        f.write("131072\n")
    assert block_holders(sysfs, "sdb") == ["md127"]
    assert block_size_bytes(sysfs, "sdb") == 131072 * 512
    assert block_holders(sysfs, "gone") == [] and block_size_bytes(sysfs, "gone") is None


def test_unreadable_holders_are_never_taken_for_free(tmp_path):
    sysfs = tmp_path / "sys"
    write_iscsi_session(sysfs, 1, TARGET, [FakeLun(1, "sdb", "8:16")])
    with open(os.path.join(os.path.realpath(sysfs / "class" / "block" / "sdb"), "holders"), "w") as f:
        f.write("not a directory\n")
    with pytest.raises(OSError):
        block_holders(sysfs, "sdb")
    with pytest.raises(DeviceError, match="cannot tell whether sdb is in use"):
        holders(paths_at(tmp_path), "sdb")
