"""Which heal route the real kernel gets when the partial heal's proof holds and when it does not.

Every scenario: a mirror attached by `block-iscsimple add`, an outage (tgtd killed) during which a
known set of blocks is written at seeded scattered places, the LUN back, then the heal through the
one executor (core.heal.execute_heal, as the agent and `resolve --keep local` call it; the agent
itself in the restart scenario). It asserts the route chosen, that a partial heal wrote at most the
bitmap's dirty chunks to the LUN and a full one the whole disk, and after every heal that both legs'
whole-device checksums are equal and every outage write is there.

Marker `healroutes` (also `vm`): deselected by default; run with
`flock /tmp/iscsimple-vm.lock .venv/bin/python -m pytest tests/vm/test_vm_heal_routes.py -m healroutes`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import record
from storagebed import PORTAL
from test_vm_outage import LISTEN, sample_line, wait_metric
from xldriver import AGENT, Vbd, Xl

pytestmark = [pytest.mark.vm, pytest.mark.healroutes]

IQN = "iqn.2026-11.test.local:routes"
LABEL = "routes-disk"
MIB = 16
WRITES, WRITE_KIB = 16, 64
HELPER = str(Path(__file__).resolve().parents[2] / "bench" / "heal.py")
RECORDS = "/var/lib/iscsimple"
BITMAP = f"{RECORDS}/bitmaps/{LABEL}"


@dataclass
class Mirror:
    md: str
    sd: str  # the LUN's kernel name at attach
    local: str
    vbd: Vbd


def helper(g, *argv: str, timeout: float = 300) -> dict:
    return json.loads(g.run([sys.executable, HELPER, "guest", *argv], timeout=timeout).stdout)


def mount_records(bed, device: str, at: str = RECORDS) -> None:
    g = bed.guest
    g.run(["mkfs.ext4", "-q", device])
    g.run(["mkdir", "-p", at])
    g.run(["mount", device, at])


def attach(bed, extra_toml: str = "[heal]\nenabled = false\n") -> Mirror:
    g, xl = bed.guest, Xl(bed)
    backing = bed.make_disk("routes-lun", MIB)
    local = bed.make_disk("routes-local", MIB)
    bed.export(IQN, {1: backing})
    xl.configure({LABEL: local}, "replacement_timeout_mirrored = 5\n" + extra_toml)
    vbd = Vbd(40, 51712)
    res = xl.add(vbd, f"lun1@{IQN}+{LABEL}")
    assert res.rc == 0, str(res)
    md, sd = bed.md_name(LABEL), bed.lun_device(IQN, 1)[5:]
    bed.wait_in_sync(md)
    g.run(["udevadm", "settle", "--timeout=30"], check=False, timeout=60)
    if "bitmap" in bed.mdstat().split(md, 1)[1].split("\n\n", 1)[0]:
        wait_bitmap_clean(g)
    return Mirror(md, sd, local, vbd)


def wait_bitmap_clean(g, timeout: float = 120) -> None:
    """Wait until md has cleared the build's bits in the bitmap file.

    mdadm --build writes a new bitmap file with every bit set; md loads those chunks with a counter of
    2 (not NEEDED, so no resync) and its bitmap daemon clears a chunk's bit in the file only after two
    to three passes (daemon_sleep, 5 s) once no write is pending there (md-bitmap.c,
    md_bitmap_daemon_work). Until then the file shows chunks md would not copy: an outage then reads
    as the whole disk dirty (the heal still copies only what md marked NEEDED), and writes to chunks
    whose bit is already set write nothing to the file (so md does not notice a failing bitmap device).
    On a host an outage seconds after the build is rare; here the test waits, so that the dirty chunks
    read afterwards are the outage's."""
    started = time.monotonic()
    first = None
    while True:
        dirty = helper(g, "bitmap", BITMAP)["dirty"]
        first = dirty if first is None else first
        if dirty == 0:
            print(
                f"bitmap file: {first} dirty chunks right after the build, clean {time.monotonic() - started:.1f} s later"
            )
            return
        assert time.monotonic() - started < timeout, f"{dirty} chunks still dirty {timeout} s after the build"
        time.sleep(2)


def outage_writes(bed, m: Mirror, seed: str) -> None:
    """Target killed, WRITES blocks written (the first stalls until md fails the iSCSI leg)."""
    bed.kill_target()
    helper(bed.guest, "write", f"/dev/md/{LABEL}", seed, str(WRITES), str(WRITE_KIB << 10))
    assert "faulty" in bed.md_legs(m.md)[m.sd], bed.md_legs(m.md)


def target_back(bed, sd: str | None = None) -> None:
    g = bed.guest
    bed.start_target()
    state = bed.session(IQN) + "/state"
    if not g.call("wait_for", wait=90, path=state, cond="equals", value="LOGGED_IN", timeout=60)["met"]:
        # iscsid gives up for good when a reconnect lands between tgtd listening and the target
        # being defined again ("target not found"); a login by hand is what an operator would do.
        print("session not back after 60 s; iscsid's log:", (g.read("/tmp/iscsid.log") or "")[-3000:])
        print("tgtd's log:", (g.read("/tmp/tgtd.log") or "")[-2000:])
        print(g.run(["iscsiadm", "-m", "node", "-T", IQN, "-p", PORTAL, "--login"], check=False, timeout=60))
    g.wait_for(state, "equals", "LOGGED_IN", timeout=120)
    if sd:
        g.wait_for(f"/sys/block/{sd}/device/state", "equals", "running", timeout=60)


def wait_lun_device(bed, timeout: float = 60) -> str:
    """The LUN's kernel name once it is there: iscsiadm's login returns with the session up, and the
    kernel scans its LUNs after that."""
    started = time.monotonic()
    while (dev := bed.lun_device(IQN, 1)) is None:
        assert time.monotonic() - started < timeout, (
            f"LUN 1 of {IQN} has no block device {timeout} s after the login"
        )
        time.sleep(1)
    return dev[5:]


def sectors_written(g, sd: str) -> int:
    return int(g.read(f"/sys/block/{sd}/stat").split()[6])


def dirty_bytes(g) -> int:
    found = helper(g, "bitmap", BITMAP)
    return found["dirty"] * found["chunk"]


def heal(bed, sd: str) -> tuple[dict, int]:
    """The executor's heal to in-sync; returns its result and the bytes written to `sd`."""
    before = sectors_written(bed.guest, sd)
    result = helper(bed.guest, "heal", LABEL, "auto", timeout=600)
    assert "error" not in result, result
    return result, (sectors_written(bed.guest, sd) - before) * 512


def assert_legs_equal_and_writes_present(
    bed, m: Mirror, sd: str, seed: str, length: int | None = None
) -> None:
    g = bed.guest
    bed.wait_in_sync(m.md)
    sums = {dev: g.call("sha256", path=dev, length=length)["sha256"] for dev in (f"/dev/{sd}", m.local)}
    assert len(set(sums.values())) == 1, f"the legs differ after the heal: {sums}"
    verdict = helper(g, "verify", f"/dev/md/{LABEL}", seed, str(WRITES), str(WRITE_KIB << 10))
    assert verdict["mismatched"] == [], verdict


def assert_partial(written: int, dirty: int) -> None:
    assert 0 < dirty < MIB << 19, dirty
    assert 0 < written <= dirty * 1.01, (written, dirty)


def assert_full(written: int) -> None:
    assert written >= MIB << 20, f"a full heal wrote only {written} bytes"


def test_agent_restarted_during_the_outage_still_heals_partially(bed):
    """Continuity is the kernel's, not the agent's: a new agent proves it from the running array,
    /proc/mdstat, the kernel log since the build and the build's record."""
    g = bed.guest
    mount_records(bed, bed.make_disk("routes-records", 16))
    try:
        m = attach(bed, "[heal]\nenabled = true\nstable_seconds = 1\ncheck_after = true\n")
        agent = [AGENT, "--web.listen-address", LISTEN, "--refresh.interval", "1s", "--log.level", "debug"]
        g.spawn("agent", agent, log="/tmp/agent-1.log")
        wait_metric(g, sample_line("iscsimple_array_bitmap", "1.0", label=LABEL), timeout=60)
        outage_writes(bed, m, "restart")
        g.kill("agent", "TERM")
        g.wait_proc("agent", timeout=30)
        dirty = dirty_bytes(g)
        before = sectors_written(g, m.sd)
        g.spawn("agent", agent, log="/tmp/agent-2.log")
        wait_metric(g, sample_line("iscsimple_array_bitmap", "1.0", label=LABEL), timeout=60)
        target_back(bed, m.sd)
        wait_metric(
            g,
            sample_line("iscsimple_heal_operations_total", "1.0", result="success", mode="partial"),
            timeout=120,
        )
        bed.wait_in_sync(m.md)
        written = (sectors_written(g, m.sd) - before) * 512
        record("routes: agent restarted in the outage, MiB written by its partial heal", written / (1 << 20))
        record("routes: agent restarted in the outage, MiB dirty in the bitmap before it", dirty / (1 << 20))
        assert_partial(written, dirty)
        # [heal] check_after: the agent has md compare the legs once the heal is done; they match.
        wait_metric(g, sample_line("iscsimple_heal_checks_total", "1.0", result="started"), timeout=60)
        g.wait_for(f"/sys/block/{m.md}/md/last_sync_action", "equals", "check", timeout=120)
        bed.wait_in_sync(m.md, timeout=300)
        assert (g.read(f"/sys/block/{m.md}/md/mismatch_cnt") or "").strip() == "0"
        wait_metric(g, sample_line("iscsimple_array_mismatch_sectors", "0.0", label=LABEL), timeout=60)
        assert_legs_equal_and_writes_present(bed, m, m.sd, "restart")
        g.kill("agent", "TERM")
        g.wait_proc("agent", timeout=30)
    finally:
        g.run(["umount", "-l", RECORDS], check=False)


def test_kicked_bitmap_means_a_full_heal(bed):
    """md kicks a bitmap file it cannot write (the records filesystem fails under it): the kernel
    log says so, the agent (following it) exports the bitmap as gone though /proc/mdstat still
    shows it, and the heal copies the whole disk."""
    g = bed.guest
    disk = bed.make_disk("routes-records", 16)
    sectors = int(g.run(["blockdev", "--getsz", disk]).stdout)
    g.run(["dmsetup", "create", "routes-records", "--table", f"0 {sectors} linear {disk} 0"])
    # Mounted at the bitmaps directory itself, which the build then uses as it is (no RAM store).
    bitmaps = f"{RECORDS}/bitmaps"
    g.run(["umount", bitmaps], check=False)  # the store the bed made at boot
    mount_records(bed, "/dev/mapper/routes-records", at=bitmaps)
    m = None
    try:
        m = attach(bed)
        agent = [AGENT, "--web.listen-address", LISTEN, "--refresh.interval", "1s"]
        g.spawn("agent", agent, log="/tmp/agent-kicked.log")
        wait_metric(g, sample_line("iscsimple_array_bitmap", "1.0", label=LABEL), timeout=60)
        swap_table(g, "routes-records", f"0 {sectors} error")  # the bitmap's writes fail in the outage
        outage_writes(bed, m, "kicked")
        swap_table(g, "routes-records", f"0 {sectors} linear {disk} 0")
        kernel_log = g.run(["dmesg"]).stdout
        assert "kicking failed bitmap file" in kernel_log, kernel_log[-3000:]
        assert f"file: {BITMAP}" in bed.mdstat(), bed.mdstat()  # md still shows it
        wait_metric(g, sample_line("iscsimple_array_bitmap", "0.0", label=LABEL), timeout=60)
        g.kill("agent", "TERM")
        g.wait_proc("agent", timeout=30)
        target_back(bed, m.sd)
        result, written = heal(bed, m.sd)
        record("routes: bitmap kicked, MiB written by the full heal", written / (1 << 20))
        record("routes: bitmap kicked, full heal to in sync (s)", result["seconds"])
        assert result["mode"] == "full", result
        assert "dropped the bitmap" in result["reason"], result
        assert_full(written)
        assert_legs_equal_and_writes_present(bed, m, m.sd, "kicked")
    finally:
        if m is not None:
            g.run(["mdadm", "--stop", f"/dev/md/{LABEL}"], check=False, timeout=60)
        g.run(["umount", "-l", bitmaps], check=False)
        g.run(["dmsetup", "remove", "--force", "routes-records"], check=False)


def swap_table(g, name: str, table: str) -> None:
    g.run(["dmsetup", "suspend", "--nolockfs", name])
    g.run(["dmsetup", "load", name, "--table", table])
    g.run(["dmsetup", "resume", name])


def test_lun_back_under_a_new_name_heals_partially_by_its_old_slot(bed):
    """The session is logged out during the outage and in again: the LUN comes back as another sdX
    while md still lists the old one faulty. Same WWID and size: md's old slot is given back (the
    faulty member removed, the new device re-added with ADD_NEW_DISK and MD_DISK_SYNC)."""
    g = bed.guest
    mount_records(bed, bed.make_disk("routes-records", 16))
    try:
        m = attach(bed)
        md_dir = f"/sys/block/{m.md}/md"
        slot = (g.read(f"{md_dir}/dev-{m.sd}/slot") or "").strip()
        outage_writes(bed, m, "renamed")
        node = ["iscsiadm", "-m", "node", "-T", IQN, "-p", PORTAL]
        g.run([*node, "--logout"], timeout=90)
        print(f"after the logout: {m.sd} in slot {slot}, md lists", bed.md_legs(m.md))
        dirty = dirty_bytes(g)
        bed.start_target()
        g.run([*node, "--login"], timeout=90)
        new = wait_lun_device(bed)
        assert new != m.sd, f"the LUN came back as {new} again: no rename to test"
        g.wait_for(f"/sys/block/{new}/device/state", "equals", "running", timeout=60)
        g.run(["udevadm", "settle", "--timeout=30"], check=False, timeout=60)
        result, written = heal(bed, new)
        record("routes: LUN renamed, MiB written by the partial heal", written / (1 << 20))
        record("routes: LUN renamed, MiB dirty in the bitmap before it", dirty / (1 << 20))
        record("routes: LUN renamed, partial heal to in sync (s)", result["seconds"])
        assert result["mode"] == "partial" and result["added"] == new, result
        assert_partial(written, dirty)
        # md's old slot was given back (ADD_NEW_DISK with MD_DISK_SYNC and that raid_disk): without it
        # saved_raid_disk is -1 and raid1_add_disk asks for a full sync.
        assert (g.read(f"{md_dir}/dev-{new}/slot") or "").strip() == slot, (slot, bed.md_legs(m.md))
        assert_legs_equal_and_writes_present(bed, m, new, "renamed")
    finally:
        g.run(["umount", "-l", RECORDS], check=False)


def test_another_lun_at_the_same_name_means_a_full_heal(bed):
    """While the target is down its LUN 1 is replaced by another logical unit (other backing file,
    serial and device id, larger): the session comes back with the same sdX. The proof rescans the
    device, sees another WWID or size, and the heal copies the whole disk onto it."""
    g = bed.guest
    mount_records(bed, bed.make_disk("routes-records", 16))
    try:
        m = attach(bed)
        old_wwid = (g.read(f"/sys/block/{m.sd}/device/wwid") or "").strip()
        other = bed.make_disk("routes-other", MIB * 2)
        outage_writes(bed, m, "other")
        bed.targets[IQN].luns[1] = other
        bed.start_target()
        lu = ["--mode", "logicalunit", "--tid", str(bed.targets[IQN].tid), "--lun", "1"]
        ids = "scsi_id=routes-other-lu,scsi_sn=routesother1"
        g.run(["tgtadm", "--lld", "iscsi", "--op", "update", *lu, "--params", ids])
        g.wait_for(bed.session(IQN) + "/state", "equals", "LOGGED_IN", timeout=120)
        g.wait_for(f"/sys/block/{m.sd}/device/state", "equals", "running", timeout=60)
        assert bed.lun_device(IQN, 1)[5:] == m.sd
        result, written = heal(bed, m.sd)
        new_wwid = (g.read(f"/sys/block/{m.sd}/device/wwid") or "").strip()
        record("routes: another LUN, MiB written by the full heal", written / (1 << 20))
        record("routes: another LUN, full heal to in sync (s)", result["seconds"])
        assert result["mode"] == "full", (result, old_wwid, new_wwid)
        assert "not the LUN" in result["reason"] or "changed size" in result["reason"], result
        assert_full(written)
        assert_legs_equal_and_writes_present(bed, m, m.sd, "other", length=MIB << 20)
    finally:
        g.run(["umount", "-l", RECORDS], check=False)


def test_host_without_bitmap_support_builds_and_heals_as_before(bed):
    """No zram (its control directory hidden under an empty one) and /var/lib/iscsimple on the guest's
    overlay (md cannot map a file there): the RAM store is not made and undone, no bitmap, said once,
    and the heal is the full copy it always was."""
    g = bed.guest
    g.run(["umount", f"{RECORDS}/bitmaps"], check=False)  # the store the bed made at boot
    g.run(["mkdir", "-p", "/tmp/no-zram"])
    g.run(["mount", "--bind", "/tmp/no-zram", "/sys/class/zram-control"])
    try:
        m = attach(bed)
    finally:
        g.run(["umount", "/sys/class/zram-control"], check=False)
    assert f" {RECORDS}/bitmaps " not in g.read("/proc/mounts"), "no store may be left half made"
    store = json.loads(g.read("/run/iscsimple/bitmap-store.json") or "{}")
    assert "cannot add a zram device" in store.get("reason", ""), store
    support = json.loads(g.read("/run/iscsimple/bitmap-support.json") or "{}")
    assert support.get("supported") is False and "overlay" in support.get("reason", ""), support
    assert "bitmap" not in bed.mdstat().split(m.md, 1)[1].split("\n\n", 1)[0], bed.mdstat()
    outage_writes(bed, m, "nosupport")
    target_back(bed, m.sd)
    result, written = heal(bed, m.sd)
    record("routes: no bitmap support, MiB written by the full heal", written / (1 << 20))
    record("routes: no bitmap support, full heal to in sync (s)", result["seconds"])
    assert result["mode"] == "full" and "not built with a bitmap" in result["reason"], result
    assert_full(written)
    assert_legs_equal_and_writes_present(bed, m, m.sd, "nosupport")
