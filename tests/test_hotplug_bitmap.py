"""block-iscsimple builds mirrors with a write-intent bitmap where the host supports it (fake mdadm 4.2,
kernel 6.1, records on ext4), falls back to the plain build when mdadm or the kernel refuses it, and
keeps today's command exactly on a host without support."""

from __future__ import annotations

import json

import pytest

from iscsimple.core import bitmap
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
