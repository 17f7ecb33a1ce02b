"""core/bitmapstore.py in-process: /proc/mounts as the kernel escapes it, and an undo that runs even when
the attach's deadline ran out in the middle (the fake-host tests in test_hotplug_bitmap.py cover the rest)."""

from __future__ import annotations

import os

import pytest

from iscsimple.core import bitmapstore
from iscsimple.core.paths import HostPaths
from iscsimple.core.run import CommandError, Deadline, DeadlineExceeded


def host(tmp_path) -> HostPaths:
    paths = HostPaths(
        procfs=tmp_path / "proc", sysfs=tmp_path / "sys", devfs=tmp_path / "dev",
        state=tmp_path / "run", records=tmp_path / "var lib", locks=tmp_path / "locks",
    )  # fmt: skip
    paths.procfs.mkdir()
    return paths


def test_the_visible_mount_is_the_last_one_at_the_directory_or_above_it(tmp_path):
    paths = host(tmp_path)
    (paths.procfs / "self").mkdir()
    target = bitmapstore.bitmap_dir(paths)
    records = str(paths.records).replace(" ", "\\040")
    info = paths.procfs / "self" / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw\n"
        f"40 22 252:3 / {records}/bitmaps rw,noatime shared:5 - ext4 /dev/zram3 rw\n"
        f"41 22 8:2 / {records}/bitmapsx rw - xfs /dev/sda2 rw\n"
    )
    assert bitmapstore.mount_at(paths, target) == bitmapstore.Mount(str(target), "ext4", "/dev/zram3")
    # A filesystem mounted later at the records directory hides the store below it (still listed).
    info.write_text(info.read_text() + f"42 22 7:0 / {records} rw - ext4 /dev/loop0 rw\n")
    assert bitmapstore.mount_at(paths, target) is None
    assert bitmapstore.visible_mount(paths, target) == bitmapstore.Mount(
        str(paths.records), "ext4", "/dev/loop0"
    )
    info.write_text("garbage\n- - -\n1 2 3 4 5 6 - onlytype\n")  # never an error: no mount known
    assert bitmapstore.visible_mount(paths, target) is None


def zram_host(tmp_path) -> HostPaths:
    paths = host(tmp_path)
    control = paths.sysfs / "class" / "zram-control"
    control.mkdir(parents=True)
    (control / "hot_add").write_text("5\n")
    (control / "hot_remove").write_text("")
    block = paths.sysfs / "block" / "zram5"
    block.mkdir(parents=True)
    (block / "disksize").write_text("0\n")
    (block / "reset").write_text("0\n")
    paths.devfs.mkdir()
    os.mknod(paths.devfs / "zram5", 0o600 | 0o060000, os.makedev(242, 5))
    return paths


def test_a_deadline_spent_at_the_mount_still_unmounts_and_hands_the_device_back(tmp_path):
    paths = zram_host(tmp_path)
    calls = []

    def command(argv, timeout, deadline=None):
        calls.append(argv[0])
        if argv[0] == "mount":  # mounted, then the budget was gone before the mode was set
            raise DeadlineExceeded("gave up on chmod: 35 s have passed")
        if argv[0] == "umount":
            assert deadline is None, "the undo must not be bound by the spent deadline"

    with pytest.raises(DeadlineExceeded):
        bitmapstore.make_ram_store(paths, bitmapstore.bitmap_dir(paths), Deadline(30), command)
    assert calls == ["mkfs.ext4", "mount"], "a mount that raised is not known to have happened"
    assert (paths.sysfs / "block" / "zram5" / "reset").read_text().strip() == "1"
    assert (paths.sysfs / "class" / "zram-control" / "hot_remove").read_text().strip() == "5"


def test_a_device_that_will_not_unmount_is_not_reset_under_its_filesystem(tmp_path, monkeypatch):
    paths = zram_host(tmp_path)

    def command(argv, timeout, deadline=None):
        if argv[0] == "umount":
            raise CommandError(argv, 32, "umount: target is busy.")

    monkeypatch.setattr(
        bitmapstore.os, "chmod", lambda *a: (_ for _ in ()).throw(PermissionError(1, "denied"))
    )
    with pytest.raises(bitmapstore.StoreError, match="cannot restrict"):
        bitmapstore.make_ram_store(paths, bitmapstore.bitmap_dir(paths), Deadline(30), command)
    assert (paths.sysfs / "block" / "zram5" / "reset").read_text().strip() == "0"
    assert (paths.sysfs / "class" / "zram-control" / "hot_remove").read_text() == ""


def test_hot_add_that_names_no_device_is_a_clear_error(tmp_path):
    paths = zram_host(tmp_path)
    (paths.sysfs / "class" / "zram-control" / "hot_add").write_text("-ENOMEM\n")
    with pytest.raises(bitmapstore.StoreError, match="not a device number"):
        bitmapstore.make_ram_store(paths, bitmapstore.bitmap_dir(paths), Deadline(30), lambda *a, **k: None)
