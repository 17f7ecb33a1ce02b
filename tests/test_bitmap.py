"""Write-intent bitmaps (core/bitmap.py): the file md keeps, host support, and the proof a partial
heal needs. Every obligation that fails must mean the full copy."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from iscsimple.core import bitmap
from iscsimple.core.paths import HostPaths
from iscsimple.core.safety import HealPlan

LABEL = "vm1"
MD = "md127"
CHUNK = 64 << 10
SECTORS = 131072  # 64 MiB
WWID = "naa.60000000000000000e00000000010001"


def header(sync_sectors=SECTORS, chunk=CHUNK, state=0, magic=bitmap.BITMAP_MAGIC, version=4) -> bytes:
    """The superblock mdadm's CreateBitmap writes (bitmap.h, bitmap_super_t), 256 bytes."""
    sb = bytearray(256)
    struct.pack_into("<II", sb, 0, magic, version)
    struct.pack_into("<Q", sb, 40, sync_sectors)
    struct.pack_into("<IIII", sb, 48, state, chunk, 5, 0)
    return bytes(sb)


def bits(dirty: set[int], chunks: int = SECTORS * 512 // CHUNK, pad_ones: bool = True) -> bytes:
    out = bytearray(b"\xff" * 512 if pad_ones else bytes(512))
    for i in range(len(out) * 8):
        if i < chunks:
            out[i >> 3] = (out[i >> 3] & ~(1 << (i & 7))) | ((i in dirty) << (i & 7))
    return bytes(out)


def test_dirty_chunks_counted_in_mds_bit_order_and_padding_ignored():
    f = bitmap.parse_bitmap(header() + bits({0, 9, 1023}))
    assert (f.chunks, f.dirty, f.chunk_bytes) == (1024, 3, CHUNK)
    assert f.dirty_bytes == 3 * CHUNK
    # A recovery at sector 9 * 128 still has chunks 9 and 1023 to copy.
    assert f.dirty_bytes_after(9 * CHUNK // 512) == 2 * CHUNK
    assert f.dirty_bytes_after(SECTORS) == 0


@pytest.mark.parametrize(
    "data, words",
    [
        (b"short", "shorter than a bitmap header"),
        (header(magic=0x12345678) + bits(set()), "not an md bitmap"),
        (header(version=9) + bits(set()), "unknown bitmap version"),
        (header(chunk=3000) + bits(set()), "not a power of two"),
        (header(sync_sectors=1 << 30), "truncated"),
    ],
)
def test_corrupt_bitmap_files_are_one_line_errors(data, words):
    with pytest.raises(bitmap.BitmapFileError, match=words):
        bitmap.parse_bitmap(data)


def test_read_refuses_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(header() + bits({1}))
    assert bitmap.read_bitmap_file(real).dirty == 1
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(bitmap.BitmapFileError, match="cannot read"):
        bitmap.read_bitmap_file(tmp_path / "link")


# -- support ------------------------------------------------------------------------------------


def host(tmp_path: Path, *, release="6.1.0-28-amd64", fs="ext4") -> HostPaths:
    paths = HostPaths(
        procfs=tmp_path / "proc",
        sysfs=tmp_path / "sys",
        devfs=tmp_path / "dev",
        state=tmp_path / "run",
        records=tmp_path / "var",
        locks=tmp_path / "locks",
    )
    (paths.procfs / "sys" / "kernel" / "random").mkdir(parents=True)
    (paths.procfs / "sys" / "kernel" / "osrelease").write_text(release + "\n")
    (paths.procfs / "sys" / "kernel" / "random" / "boot_id").write_text("boot-1\n")
    (paths.procfs / "self").mkdir(parents=True)
    (paths.procfs / "self" / "mountinfo").write_text(
        f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n30 22 254:1 / {paths.records} rw - {fs} /dev/x rw\n"
    )
    paths.records.mkdir()
    paths.devfs.mkdir()
    return paths


def test_supported_with_mdadm_4_2_kernel_6_1_and_ext4(tmp_path):
    s = bitmap.detect_support(host(tmp_path), lambda: "mdadm - v4.2 - 2021-12-30 - Debian 4.2-5")
    assert s.supported, s.reason


@pytest.mark.parametrize(
    "kw, version, words",
    [
        ({}, "mdadm - v4.4 - 2024-12-10", "removed in 4.4"),
        ({}, None, "cannot tell mdadm's version"),
        ({"fs": "tmpfs"}, "mdadm - v4.2", "is on tmpfs"),
        ({"release": "6.8.0-1-amd64"}, "mdadm - v4.2", "CONFIG_MD_BITMAP_FILE"),
    ],
)
def test_hosts_without_support_say_why(tmp_path, kw, version, words):
    s = bitmap.detect_support(host(tmp_path, **kw), lambda: version)
    assert not s.supported and words in s.reason


def test_mdadm_is_not_asked_when_the_kernel_or_filesystem_rules_it_out(tmp_path):
    def boom():
        raise AssertionError("mdadm --version was run")

    assert not bitmap.detect_support(host(tmp_path, fs="tmpfs"), boom).supported


def test_support_is_detected_once_per_boot(tmp_path):
    paths = host(tmp_path)
    calls = []
    probe = lambda: calls.append(1) or bitmap.BitmapSupport(True, "probed")  # noqa: E731
    assert bitmap.cached_support(paths, probe).reason == "probed"
    assert bitmap.cached_support(paths, probe).reason == "probed"
    assert calls == [1]
    (paths.procfs / "sys" / "kernel" / "random" / "boot_id").write_text("boot-2\n")
    bitmap.cached_support(paths, probe)
    assert calls == [1, 1]


# -- the proof ------------------------------------------------------------------------------------


class Bed:
    """One running mirror built with a bitmap: what /proc, /sys, /dev and the records show."""

    def __init__(self, tmp_path: Path):
        self.paths = paths = host(tmp_path)
        self.md = paths.sysfs / "block" / MD / "md"
        (self.md / "dev-loop0").mkdir(parents=True)
        self.lun("sda", WWID, SECTORS)
        self.kmsg(["6,100,1000,-;md/raid1:md127: active with 1 out of 2 mirrors"])
        file = bitmap.prepare_file(paths, LABEL)
        file.write_bytes(header() + bits({3, 5}))
        self.mdstat(f"bitmap: 1/1 pages [4KB], 64KB chunk, file: {file}")
        bitmap.note_built(paths, LABEL, MD, CHUNK, 100, "loop0", "sda")
        self.file = file

    def lun(self, name, wwid, sectors):
        (self.paths.sysfs / "block" / name / "device").mkdir(parents=True, exist_ok=True)
        (self.paths.sysfs / "block" / name / "device" / "wwid").write_text(wwid + "\n")
        (self.paths.sysfs / "block" / name / "size").write_text(f"{sectors}\n")
        (self.paths.sysfs / "block" / name / "device" / "rescan").write_text("")

    def kmsg(self, lines):
        (self.paths.devfs / "kmsg").write_text("".join(line + "\n" for line in lines))

    def mdstat(self, bitmap_line: str | None):
        extra = f"      {bitmap_line}\n" if bitmap_line else ""
        (self.paths.procfs / "mdstat").write_text(
            "Personalities : [raid1]\n"
            f"{MD} : active raid1 loop0[2] sda[1](W)(F)\n"
            f"      65536 blocks super non-persistent [2/1] [U_]\n{extra}\nunused devices: <none>\n"
        )

    def rewrite(self, data: bytes):
        """New contents as md would write them: the file's identity (ctime) as recorded."""
        self.file.write_bytes(data)
        path = bitmap.instance_path(self.paths, LABEL)
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "file_ctime_ns": os.stat(self.file).st_ctime_ns}))

    def prove(self, device="sda"):
        return bitmap.prove_partial(self.paths, MD, LABEL, device)


@pytest.fixture
def bed(tmp_path):
    return Bed(tmp_path)


def test_all_obligations_hold_partial_proven(bed):
    proof = bed.prove()
    assert proof.ok, proof.reason
    assert proof.bitmap.dirty_bytes == 2 * CHUNK


def test_agent_restart_needs_no_memory_the_proof_is_in_the_kernel_and_files(bed):
    # Nothing of the agent's is consulted: a new process proves the same from the same state.
    assert bed.prove().ok
    assert bitmap.prove_partial(HostPaths(**vars(bed.paths)), MD, LABEL, "sda").ok


@pytest.mark.parametrize(
    "change, words",
    [
        (
            lambda b: b.kmsg(["6,100,1,-;x", f"2,150,9,-;{MD}: kicking failed bitmap file /x from array!"]),
            "dropped the bitmap",
        ),
        (lambda b: b.kmsg(["6,180,1,-;newer than the build"]), "no longer reaches back"),
        (lambda b: (b.paths.devfs / "kmsg").unlink(), "cannot read the kernel log"),
        (lambda b: b.mdstat(None), "shows no bitmap file"),
        (lambda b: b.lun("sda", "naa.60000000000000000e00000000020001", SECTORS), "is not the LUN"),
        (lambda b: b.lun("sda", WWID, SECTORS * 2), "changed size"),
        (lambda b: (b.paths.sysfs / "block/sda/device/rescan").unlink(), "cannot rescan"),
        (lambda b: (b.paths.procfs / "sys/kernel/random/boot_id").write_text("boot-2\n"), "another boot"),
        (lambda b: b.file.unlink() or b.file.write_bytes(header() + bits(set())), "not the one"),
        (lambda b: b.rewrite(header(state=2) + bits({1})), "stale"),
        (lambda b: bitmap.instance_path(b.paths, LABEL).unlink(), "not built with a bitmap"),
        (lambda b: bitmap.instance_path(b.paths, LABEL).write_text("{garbage"), "bitmap record"),
    ],
    ids=[
        "bitmap-kicked",
        "kernel-log-wrapped",
        "kernel-log-unreadable",
        "no-bitmap-in-mdstat",
        "different-lun-same-name",
        "lun-resized",
        "rescan-impossible",
        "rebooted",
        "bitmap-file-replaced",
        "bitmap-marked-stale",
        "host-without-support",
        "corrupt-record",
    ],
)
def test_every_unproven_obligation_means_full(bed, change, words):
    change(bed)
    proof = bed.prove()
    assert not proof.ok
    if words:
        assert words in proof.reason, proof.reason


def test_new_array_instance_is_caught_by_the_local_legs_sysfs_inode(bed):
    before = os.stat(bed.md / "dev-loop0").st_ino
    (bed.md / "dev-loop0").rename(bed.md / "old")
    (bed.md / "dev-loop0").mkdir()
    assert os.stat(bed.md / "dev-loop0").st_ino != before
    assert "not the array instance" in bed.prove().reason


def test_device_back_under_a_new_name_is_the_same_lun_by_wwid(bed):
    bed.lun("sdb", WWID, SECTORS)
    assert bed.prove("sdb").ok
    bed.lun("sdc", "naa.other", SECTORS)
    assert not bed.prove("sdc").ok


def test_array_built_without_the_iscsi_leg_in_sync_is_never_partial(bed):
    inst = bitmap.read_instance(bed.paths, LABEL)
    data = {**vars(inst), "iscsi_source": False}
    bitmap.instance_path(bed.paths, LABEL).write_text(json.dumps(data))
    assert "never in sync" in bed.prove().reason


def test_forget_removes_file_and_record(bed):
    bitmap.forget(bed.paths, LABEL)
    assert not bed.file.exists() and not bitmap.instance_path(bed.paths, LABEL).exists()


# -- the commands of each route ---------------------------------------------------------------


def plan(**kw) -> HealPlan:
    base = dict(
        label=LABEL,
        md_path="/dev/md/vm1",
        md_device=MD,
        remove="sda",
        add="sda",
        add_dev="8:0",
        add_path="/dev/sda",
        target="iqn.x",
        lun=1,
        session="session1",
        renamed=False,
    )
    return HealPlan(**{**base, **kw})


def test_partial_same_device_is_one_re_add_keeping_the_member():
    assert plan(mode="partial").commands() == [
        ["mdadm", "/dev/md/vm1", "--re-add", "--write-mostly", "/dev/sda"]
    ]


def test_partial_renamed_removes_the_old_member_then_re_adds_the_new_name():
    p = plan(mode="partial", add="sdb", add_path="/dev/sdb", renamed=True)
    assert p.commands() == [
        ["mdadm", "/dev/md/vm1", "--fail", "sda"],
        ["mdadm", "/dev/md/vm1", "--remove", "sda"],
        ["mdadm", "/dev/md/vm1", "--re-add", "--write-mostly", "/dev/sdb"],
    ]


def test_full_route_is_unchanged():
    assert plan().commands()[-1] == ["mdadm", "/dev/md/vm1", "--add", "--write-mostly", "/dev/sda"]
    assert plan(remove=None, mode="partial").commands() == [
        ["mdadm", "/dev/md/vm1", "--re-add", "--write-mostly", "/dev/sda"]
    ]


# -- what the agent exports -------------------------------------------------------------------


def view(degraded=1, iscsi="faulty", done=None, speed=0.0):
    from types import SimpleNamespace

    md = SimpleNamespace(
        name=MD, degraded=degraded, sync_completed=(done, SECTORS) if done is not None else None
    )
    return SimpleNamespace(label=LABEL, md=md, iscsi=SimpleNamespace(state=iscsi), sync_speed_bytes=speed)


def test_exported_while_degraded_dirty_bytes_and_eta(bed):
    [b] = bitmap.array_bitmaps(bed.paths, [view()])
    assert (b.active, b.out_of_sync_bytes, b.heal_eta_seconds) == (True, 2 * CHUNK, None)
    # Recovering past chunk 4 at 64 KiB/s: chunk 5 is left, one second.
    [b] = bitmap.array_bitmaps(bed.paths, [view(iscsi="recovering", done=4 * CHUNK // 512, speed=CHUNK)])
    assert b.heal_eta_seconds == 1.0
    [b] = bitmap.array_bitmaps(bed.paths, [view(degraded=0, iscsi="in_sync")])
    assert (b.active, b.out_of_sync_bytes) == (True, 0)


def test_exported_inactive_without_bitmap_line_and_error_on_corrupt_file(bed):
    bed.rewrite(b"garbage")
    [b] = bitmap.array_bitmaps(bed.paths, [view()])
    assert b.active and b.out_of_sync_bytes is None and "shorter than a bitmap header" in b.error
    bed.mdstat(None)
    [b] = bitmap.array_bitmaps(bed.paths, [view()])
    assert not b.active and b.out_of_sync_bytes is None


def test_choose_route_partial_when_proven_full_with_the_reason_otherwise(bed):
    routed = bitmap.choose_route(bed.paths, plan())
    assert routed.mode == "partial" and routed.commands()[-1][2] == "--re-add"
    assert "only the chunks its bitmap marks" in routed.describe()
    bed.kmsg(["2,150,9,-;md127: kicking failed bitmap file /x from array!", "6,100,1,-;x"])
    routed = bitmap.choose_route(bed.paths, plan())
    assert routed.mode == "full" and routed.commands()[-1][2] == "--add"
    assert "dropped the bitmap" in routed.route_reason and "a full copy" in routed.describe()
    # The executor re-plans with core.safety.plan_heal, which knows no route: compare without it.
    assert bitmap.full_route(routed) == plan()


# -- md dropping the bitmap: the kernel log says so, /proc/mdstat does not ------------------------

KICK_6_1 = f"{MD}: kicking failed bitmap file /var/lib/iscsimple/bitmaps/{LABEL} from array!"


@pytest.mark.parametrize(
    "message, array",
    [
        (KICK_6_1, MD),  # 6.1: the whole path
        (f"md_vm1: kicking failed bitmap file lib/iscsimple/bitmaps/{LABEL} from array!", "md_vm1"),  # %pD4
        ("md5: disabling internal bitmap due to errors", "md5"),
        ("mdX: kicking failed bitmap file  from array!", "mdX"),
        ("md/raid1:md127: Disk failure on sda, disabling device.", None),
        ("md127: bitmap file is out of date, doing full recovery", None),
    ],
)
def test_kicked_array_names_the_array_of_mds_own_words(message, array):
    assert bitmap.kicked_array(message) == array


def test_kicks_remember_the_last_record_per_array_and_say_what_is_news():
    kicks = bitmap.BitmapKicks()
    assert kicks.note_log([(150, KICK_6_1), (151, "md127: resync done")]) == {MD}
    assert kicks.note_log([(150, KICK_6_1)]) == set()  # the same record read twice
    assert kicks.last_seqs() == {MD: 150}
    assert kicks.since(0) == ({MD}, 1)
    assert kicks.since(1) == (set(), 1)


def test_a_kick_after_the_build_makes_the_bitmap_inactive_whatever_mdstat_shows(bed):
    [b] = bitmap.array_bitmaps(bed.paths, [view()], {MD: 150})  # recorded at seq 100
    assert not b.active and b.out_of_sync_bytes is None and "record 150" in b.error
    [b] = bitmap.array_bitmaps(bed.paths, [view(degraded=0, iscsi="in_sync")], {"mdX": 101})
    assert not b.active
    # A kick of an earlier array that had the same name, before this one's bitmap was set up.
    [b] = bitmap.array_bitmaps(bed.paths, [view()], {MD: 99, "md3": 500})
    assert b.active and b.out_of_sync_bytes == 2 * CHUNK


def test_a_bitmap_md_marked_stale_is_not_active(bed):
    bed.rewrite(header(state=bitmap.BITMAP_STALE) + bits({3, 5}))
    [b] = bitmap.array_bitmaps(bed.paths, [view()])
    assert not b.active and "stale" in b.error
