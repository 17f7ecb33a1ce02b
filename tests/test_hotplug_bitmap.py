"""block-iscsimple builds mirrors with a write-intent bitmap where the host supports it (fake mdadm 4.2,
kernel 6.1, records on ext4), falls back to the plain build when mdadm or the kernel refuses it, and
keeps today's command exactly on a host without support."""

from __future__ import annotations

import json

import pytest

from iscsimple.core import bitmap, bitmapstore
from tests.fakes.harness import IQN, make_mirror_host

SPEC = f"lun1@{IQN}+vm1"


@pytest.fixture
def hotplug(tmp_path):
    return make_mirror_host(tmp_path)


def builds(hotplug) -> list[str]:
    return [c for c in hotplug.command_lines() if c.startswith("mdadm --build")]


def test_supported_host_builds_with_a_fresh_bitmap_file_and_forgets_it_at_remove(hotplug):
    hotplug.host.enable_bitmaps(hotplug.paths.records)
    file = bitmap.bitmap_path(hotplug.paths, "vm1")
    file.parent.mkdir(parents=True)
    file.write_bytes(b"old bits of an earlier instance")  # mdadm would reuse it: removed first
    vbd = hotplug.vbd(SPEC)
    hotplug.add(vbd)
    [build] = builds(hotplug)
    assert build.endswith(f"missing --write-mostly /dev/sda --bitmap={file} --bitmap-chunk=64K")
    assert bitmap.read_bitmap_file(file).chunk_bytes == 64 << 10
    assert oct(file.stat().st_mode & 0o777) == "0o600"
    record = json.loads(bitmap.instance_path(hotplug.paths, "vm1").read_text())
    assert record["iscsi_source"] is True and record["local_device"] and record["md_device"]
    assert hotplug.command_lines().count("mdadm --version") == 1

    assert hotplug.run("remove", vbd).returncode == 0
    assert not file.exists() and not bitmap.instance_path(hotplug.paths, "vm1").exists()
    hotplug.add(hotplug.vbd(SPEC, domid=2))
    assert hotplug.command_lines().count("mdadm --version") == 1, "support is detected once per boot"
    assert len(builds(hotplug)) == 2 and "--bitmap=" in builds(hotplug)[1]


def test_bitmap_refused_by_the_kernel_builds_without_and_remembers(hotplug):
    hotplug.host.enable_bitmaps(hotplug.paths.records)
    hotplug.host.refuse_bitmaps()
    hotplug.add(hotplug.vbd(SPEC))
    first, second = builds(hotplug)
    assert "--bitmap=" in first and "--bitmap" not in second
    support = json.loads((hotplug.paths.state / "bitmap-support.json").read_text())
    assert support["supported"] is False and "Cannot set bitmap file" in support["reason"]
    assert not bitmap.instance_path(hotplug.paths, "vm1").exists()


def test_host_without_support_keeps_the_exact_command(hotplug):
    hotplug.add(hotplug.vbd(SPEC))
    assert builds(hotplug) == [
        "mdadm --build /dev/md/vm1 --level=1 --raid-devices=2 missing --write-mostly /dev/sda"
    ]
    assert "mdadm --version" not in hotplug.command_lines()  # the kernel/filesystem check ruled it out
    support = json.loads((hotplug.paths.state / "bitmap-support.json").read_text())
    assert support["supported"] is False


def test_mdadm_without_bitmap_files_keeps_the_exact_command(hotplug):
    hotplug.host.enable_bitmaps(hotplug.paths.records, mdadm_version="mdadm - v4.4 - 2024-12-10")
    hotplug.add(hotplug.vbd(SPEC))
    assert "--bitmap" not in builds(hotplug)[0]
    assert "removed in 4.4" in (hotplug.paths.state / "bitmap-support.json").read_text()


# -- the RAM store (core/bitmapstore.py) ------------------------------------------------------------

STORE_TOOLS = ("modprobe", "mkfs.ext4", "mount", "umount")


def store_calls(hotplug) -> list[list[str]]:
    return hotplug.host.calls(STORE_TOOLS)


def mount_of(hotplug, directory) -> list[str] | None:
    found = [m for m in hotplug.host.mounts() if m[1] == str(directory)]
    return found[-1] if found else None


def test_first_build_of_a_boot_puts_the_bitmaps_on_a_zram_ext4_and_later_builds_reuse_it(hotplug):
    hotplug.host.enable_bitmaps(hotplug.paths.records)
    hotplug.host.enable_zram()
    directory = bitmapstore.bitmap_dir(hotplug.paths)
    vbd = hotplug.vbd(SPEC)
    hotplug.add(vbd)
    zram = str(hotplug.paths.devfs / "zram0")
    assert store_calls(hotplug) == [
        ["modprobe", "zram", "num_devices=0"],
        [*bitmapstore.MKFS_ARGV, zram],
        ["mount", "-t", "ext4", "-o", bitmapstore.MOUNT_OPTIONS, zram, str(directory)],
    ]
    assert (hotplug.host.block_dir("zram0") / "disksize").read_text().strip() == str(
        bitmapstore.RAM_STORE_BYTES
    )
    assert mount_of(hotplug, directory)[:3] == [zram, str(directory), "ext4"]
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    [build] = builds(hotplug)
    assert f"--bitmap={directory}/vm1 " in build + " "
    support = json.loads((hotplug.paths.state / "bitmap-support.json").read_text())
    assert support["supported"] is True and f"ext4 on {zram}" in support["reason"]

    assert hotplug.run("remove", vbd).returncode == 0
    hotplug.add(hotplug.vbd(SPEC, domid=2))
    assert len(store_calls(hotplug)) == 3, "made once per boot, then found mounted"
    assert "--bitmap=" in builds(hotplug)[1]


@pytest.mark.parametrize("failing", ["mkfs.ext4", "mount"])
def test_a_failed_step_undoes_the_store_and_builds_with_the_bitmap_on_disk(hotplug, failing):
    hotplug.host.enable_bitmaps(hotplug.paths.records)
    hotplug.host.enable_zram()
    hotplug.host.add_fault(failing, stderr=f"{failing}: injected: device busy")
    directory = bitmapstore.bitmap_dir(hotplug.paths)
    vbd = hotplug.vbd(SPEC)
    result = hotplug.add(vbd)
    assert "no RAM store for bitmap files" in result.stderr and "injected: device busy" in result.stderr
    assert mount_of(hotplug, directory) is None
    control = hotplug.paths.sysfs / "class" / "zram-control"
    assert (control / "hot_remove").read_text().strip() == "0", "the zram device was handed back"
    assert (hotplug.host.block_dir("zram0") / "reset").read_text().strip() == "1"
    [build] = builds(hotplug)
    assert f"--bitmap={directory}/vm1 " in build + " ", "the files stay on the records' ext4"
    # Not retried this boot: no second attempt, no second warning.
    assert hotplug.run("remove", vbd).returncode == 0
    second = hotplug.add(hotplug.vbd(SPEC, domid=2))
    assert [c[0] for c in store_calls(hotplug)].count("modprobe") == 1
    assert "no RAM store" not in second.stderr


def test_host_without_zram_keeps_the_bitmaps_on_the_records_filesystem(hotplug):
    hotplug.host.enable_bitmaps(hotplug.paths.records)
    hotplug.add(hotplug.vbd(SPEC))
    assert store_calls(hotplug) == [["modprobe", "zram", "num_devices=0"]]
    assert "--bitmap=" in builds(hotplug)[0]
    reason = json.loads((hotplug.paths.state / bitmapstore.FAILURE_FILE).read_text())["reason"]
    assert "cannot load the zram module" in reason and "Module zram not found" in reason


def test_a_filesystem_already_mounted_there_is_used_as_it_is(hotplug):
    hotplug.host.enable_bitmaps(hotplug.paths.records)
    hotplug.host.enable_zram()
    directory = bitmapstore.bitmap_dir(hotplug.paths)
    directory.mkdir(parents=True)
    with open(hotplug.paths.procfs / "self" / "mountinfo", "a") as f:
        f.write(f"50 30 254:7 / {directory} rw,relatime - xfs /dev/mapper/vg0-bitmaps rw\n")
    hotplug.add(hotplug.vbd(SPEC))
    assert store_calls(hotplug) == []
    assert "--bitmap=" in builds(hotplug)[0]
    assert "xfs on /dev/mapper/vg0-bitmaps" in (hotplug.paths.state / "bitmap-support.json").read_text()


def a_file_in_the_bitmaps_directory(hotplug, name: str, content: bytes, mdstat: str):
    """A zram host whose bitmaps directory (not yet a mount point) holds `name`; /proc/mdstat says `mdstat`."""
    hotplug.host.enable_bitmaps(hotplug.paths.records)
    hotplug.host.enable_zram()
    directory = bitmapstore.bitmap_dir(hotplug.paths)
    directory.mkdir(parents=True)
    (directory / name).write_bytes(content)
    (hotplug.paths.procfs / "mdstat").write_text(mdstat)
    return directory


def test_files_of_an_earlier_boot_go_before_the_mount(hotplug):
    directory = a_file_in_the_bitmaps_directory(
        hotplug,
        "old-vm",
        b"bits of a mirror of the last boot",
        "Personalities : [raid1]\nunused devices: <none>\n",
    )
    hotplug.add(hotplug.vbd(SPEC))
    assert not (directory / "old-vm").exists()
    assert mount_of(hotplug, directory)[2] == "ext4"


def test_a_running_arrays_bitmap_file_in_the_directory_keeps_the_store_off(hotplug):
    directory = bitmapstore.bitmap_dir(hotplug.paths)
    a_file_in_the_bitmaps_directory(
        hotplug,
        "other",
        b"in use",
        "Personalities : [raid1]\nmd127 : active raid1 sdb[1](W) dm-0[0]\n      1048576 blocks super non-persistent [2/2] [UU]\n"
        f"      bitmap: 0/1 pages [0KB], 64KB chunk, file: {directory}/other\n\nunused devices: <none>\n",
    )
    result = hotplug.add(hotplug.vbd(SPEC))
    assert (directory / "other").read_bytes() == b"in use"
    assert mount_of(hotplug, directory) is None
    assert "running arrays keep their bitmap files" in result.stderr
    assert (hotplug.paths.sysfs / "class" / "zram-control" / "hot_remove").read_text().strip() == "0"
