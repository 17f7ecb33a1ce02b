"""The full read resolves links without realpath in the common cases; whatever the layout,
it must name the same device and the same session directory realpath would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixturetree import STATES, FakeLun, write_iscsi_session

from iscsimple.core import iscsi as iscsi_module
from iscsimple.core import snapshot as snapshot_module
from iscsimple.core.iscsi import read_iscsi_sessions
from iscsimple.core.paths import HostPaths


def _by_realpath(device: str, devfs: Path) -> str | None:
    """What _kernel_name answered before it avoided realpath: the reference."""
    real = os.path.realpath(devfs / device[len("/dev/") :])
    name = os.path.basename(real)
    return name if Path(real).parent == Path(os.path.realpath(devfs)) else None


def _devfs(root: Path) -> Path:
    dev = root / "dev"
    for d in ("vg0", "mapper", "disk/by-id", "deep/er", "elsewhere"):
        (dev / d).mkdir(parents=True)
    for node in ("dm-3", "sdb", "mapper/vg1-lv", "elsewhere/node"):
        (dev / node).touch()
    links = {
        "vg0/lv": "../dm-3",  # what udev makes for LVM
        "vg0/abs": str(dev / "dm-3"),  # absolute target
        "vg0/chain": "../mapper/vg0-chain",  # a link to a link
        "mapper/vg0-chain": "../dm-3",
        "vg0/dangling": "../dm-9",  # the node is gone
        "vg0/sub": "../mapper/vg1-lv",  # a node in a subdirectory
        "vg0/outside": "../../outside-devfs",
        "vg0/dotted": "../elsewhere/../dm-3",
        "vg0/self": "lv",  # a link within its own directory, to a link
        "disk/by-id/wwn-1": "../../sdb",
        "deep/er/x": "../../dm-3",
        "short": "dm-3",  # a link in devfs itself
        "linkdir": "elsewhere",  # a directory that is a link
        "vg2": "vg0",
        "vg3": "deep/er",  # a directory link one level deeper: ".." means deep/, not devfs
        "deep/er/z": "../sdb",
    }
    for name, target in links.items():
        (dev / name).symlink_to(target)
    (dev / "elsewhere" / "lv").symlink_to("../dm-3")  # reached through the linked directory
    return dev


DEVICES = [
    "/dev/vg0/lv",
    "/dev/vg0/abs",
    "/dev/vg0/chain",
    "/dev/vg0/dangling",
    "/dev/vg0/sub",
    "/dev/vg0/outside",
    "/dev/vg0/dotted",
    "/dev/vg0/self",
    "/dev/vg0/missing",
    "/dev/disk/by-id/wwn-1",
    "/dev/deep/er/x",
    "/dev/short",
    "/dev/sdb",
    "/dev/dm-3",
    "/dev/nothing",
    "/dev/linkdir/lv",
    "/dev/vg2/lv",
    "/dev/vg3/z",
    "/dev/mapper/vg1-lv",
    "/dev/missingdir/lv",
    "/dev/vg0/../sdb",
    "/dev/./sdb",
    "/dev/vg0//lv",
    "/dev/sdb/child",
]


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_name_is_what_realpath_says(tmp_path, device):
    devfs = _devfs(tmp_path)
    paths = HostPaths(devfs=devfs)
    assert snapshot_module._kernel_name(device, paths) == _by_realpath(device, devfs)


def test_kernel_name_with_the_directories_of_one_read_remembered(tmp_path):
    """A full read remembers which of devfs's directories are links (one lstat per directory,
    not per array): every device, in any order, resolves as realpath says."""
    devfs = _devfs(tmp_path)
    paths = HostPaths(devfs=devfs)
    plain_dirs: dict[str, bool] = {}
    for device in [*DEVICES, *reversed(DEVICES)]:
        assert snapshot_module._kernel_name(device, paths, plain_dirs) == _by_realpath(device, devfs), device
    assert plain_dirs[str(devfs / "vg0")] is True and plain_dirs[str(devfs / "linkdir")] is False


def test_kernel_name_through_a_linked_devfs(tmp_path):
    real = _devfs(tmp_path / "real")
    linked = tmp_path / "linked"
    linked.symlink_to(real)
    paths = HostPaths(devfs=linked)
    for device in DEVICES:
        assert snapshot_module._kernel_name(device, paths) == _by_realpath(device, linked), device


def test_common_cases_decided_without_realpath(tmp_path, monkeypatch):
    devfs = _devfs(tmp_path)

    def refuse(*_):
        raise AssertionError("realpath called")

    monkeypatch.setattr(snapshot_module.os.path, "realpath", refuse)
    paths = HostPaths(devfs=devfs)
    assert snapshot_module._kernel_name("/dev/vg0/lv", paths) == "dm-3"
    assert snapshot_module._kernel_name("/dev/disk/by-id/wwn-1", paths) == "sdb"
    assert snapshot_module._kernel_name("/dev/sdb", paths) == "sdb"
    assert snapshot_module._kernel_name("/dev/vg0/missing", paths) is None
    assert snapshot_module._kernel_name("/dev/vg0/dangling", paths) == "dm-9"


def _sessions_by_realpath(sysfs: Path, monkeypatch) -> list:
    with monkeypatch.context() as m:
        m.setattr(iscsi_module, "_session_attrs_dir", lambda d, n, *_: os.path.realpath(os.path.join(d, n)))
        return read_iscsi_sessions(sysfs).sessions


@pytest.mark.parametrize("state", STATES)
def test_sessions_of_captures_same_as_through_realpath(kernel_state_readonly, state, monkeypatch):
    sysfs = kernel_state_readonly(state) / "sys"
    assert read_iscsi_sessions(sysfs).sessions == _sessions_by_realpath(sysfs, monkeypatch)


def _two_sessions(sysfs: Path) -> None:
    write_iscsi_session(sysfs, 1, "iqn.2026-11.test:a", [FakeLun(1, "sdb", "8:16")], host=3)
    write_iscsi_session(sysfs, 2, "iqn.2026-11.test:b", [FakeLun(2, "sdc", "8:32")], host=4)


def test_relative_class_link_needs_no_realpath(tmp_path, monkeypatch):
    sysfs = tmp_path / "sys"
    _two_sessions(sysfs)
    link = os.readlink(sysfs / "class" / "iscsi_session" / "session1")
    assert link.startswith("../../devices/")
    expected = _sessions_by_realpath(sysfs, monkeypatch)
    monkeypatch.setattr(iscsi_module.os.path, "realpath", lambda *_: pytest.fail("realpath called"))
    sessions = read_iscsi_sessions(sysfs).sessions
    assert sessions == expected
    assert [(s.host, s.luns[0].block) for s in sessions] == [("host3", "sdb"), ("host4", "sdc")]


def test_unusual_class_links_fall_back_to_realpath(tmp_path, monkeypatch):
    sysfs = tmp_path / "sys"
    _two_sessions(sysfs)
    class_dir = sysfs / "class" / "iscsi_session"
    expected = _sessions_by_realpath(sysfs, monkeypatch)
    # An absolute link, and one through a directory that is a link.
    (class_dir / "session1").unlink()
    (class_dir / "session1").symlink_to(sysfs / "devices/platform/host3/session1/iscsi_session/session1")
    os.rename(sysfs / "devices" / "platform", sysfs / "devices" / "real-platform")
    (sysfs / "devices" / "platform").symlink_to("real-platform")
    assert read_iscsi_sessions(sysfs).sessions == expected
    # The class directory itself a link (a tree assembled elsewhere).
    os.rename(class_dir, sysfs / "class" / "moved")
    (sysfs / "class" / "iscsi_session").symlink_to("moved")
    assert read_iscsi_sessions(sysfs).sessions == expected
