"""Partial heal on the real stack: a mirror attached by `block-iscsimple add` gets a write-intent bitmap
in the RAM store (ext4 on a zram device the build mounts at /var/lib/iscsimple/bitmaps, with
/var/lib/iscsimple itself on ext4, as on a host), an outage with writes at known places, the LUN back, and
the agent heals through the partial route: md writes only the dirty chunks to the LUN, both legs'
checksums are equal and every write is there. `remove` deletes the bitmap file with the array."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import record
from test_vm_outage import LISTEN, sample_line, wait_metric
from xldriver import AGENT, Vbd, Xl

pytestmark = pytest.mark.vm

IQN = "iqn.2026-11.test.local:bitmap"
LABEL = "bitmap-disk"
MIB = 32
WRITES, WRITE_KIB = 8, 64
HELPER = str(Path(__file__).resolve().parents[2] / "bench" / "heal.py")
RECORDS = "/var/lib/iscsimple"


def test_partial_heal_writes_only_the_dirty_chunks_and_both_legs_match(bed):
    g, xl = bed.guest, Xl(bed)
    fs = bed.make_disk("records-fs", 16)
    g.run(["mkfs.ext4", "-q", fs])
    g.run(["mkdir", "-p", RECORDS])
    g.run(["mount", fs, RECORDS])
    try:
        run_scenario(bed, g, xl)
    finally:
        g.run(["umount", "-l", RECORDS], check=False)


def run_scenario(bed, g, xl) -> None:
    backing = bed.make_disk("bitmap-lun", MIB)
    local = bed.make_disk("bitmap-local", MIB)
    bed.export(IQN, {1: backing})
    xl.configure(
        {LABEL: local}, "replacement_timeout_mirrored = 5\n[heal]\nenabled = true\nstable_seconds = 1\n"
    )
    vbd = Vbd(30, 51712)
    res = xl.add(vbd, f"lun1@{IQN}+{LABEL}")
    assert res.rc == 0, str(res)
    md, sd = bed.md_name(LABEL), bed.lun_device(IQN, 1)[5:]
    bitmap = f"{RECORDS}/bitmaps/{LABEL}"
    assert f"file: {bitmap}" in bed.mdstat(), bed.mdstat()
    store = [line.split() for line in g.read("/proc/mounts").splitlines() if f" {RECORDS}/bitmaps " in line]
    assert store and re.fullmatch(r"/dev/zram\d+", store[-1][0]) and store[-1][2] == "ext4", store
    made = re.search(r"bitmap files in RAM: ext4 on \S+ at \S+ \(made in ([0-9.]+) s\)", res.stderr)
    assert made, res.stderr  # this test's records filesystem hides the bed's store: this add made one
    record("bitmap: RAM store made by the add (modprobe, mkfs.ext4, mount)", float(made[1]))
    bed.wait_in_sync(md)

    agent = [AGENT, "--web.listen-address", LISTEN, "--refresh.interval", "1s", "--log.level", "debug"]
    g.spawn("agent", agent, log="/tmp/agent.log")
    wait_metric(g, sample_line("iscsimple_array_bitmap", "1.0", label=LABEL), timeout=60)

    bed.kill_target()
    g.run(
        [
            sys.executable,
            HELPER,
            "guest",
            "write",
            f"/dev/md/{LABEL}",
            "outage",
            str(WRITES),
            str(WRITE_KIB << 10),
        ],
        timeout=120,
    )
    assert "faulty" in bed.md_legs(md)[sd]
    dirty_line = wait_metric(
        g, rf'^iscsimple_array_out_of_sync_bytes\{{label="{LABEL}"\}} [1-9][0-9.e+]*$', timeout=60
    )
    dirty = float(dirty_line["line"].rsplit(" ", 1)[1])
    written_before = int(g.read(f"/sys/block/{sd}/stat").split()[6])

    back = g.now()
    bed.start_target()
    # A member re-added in place keeps md's write_error flag: look for in_sync, not the whole state.
    healed = g.wait_for(f"/sys/block/{md}/md/dev-{sd}/state", "regex", r"^in_sync,write_mostly", timeout=180)
    bed.wait_in_sync(md)
    record("bitmap: target back -> iSCSI leg in sync (partial heal by the agent)", healed["at"] - back)
    wait_metric(
        g, sample_line("iscsimple_heal_operations_total", "1.0", result="success", mode="partial"), timeout=30
    )
    written = (int(g.read(f"/sys/block/{sd}/stat").split()[6]) - written_before) * 512
    record("bitmap: MiB written to the LUN by the partial heal", written / (1 << 20))
    record("bitmap: MiB of dirty chunks before the heal", dirty / (1 << 20))
    assert 0 < written <= dirty * 1.01, (written, dirty)
    assert written < MIB << 19, "the heal copied half the disk or more: not partial"

    sums = {dev: g.call("sha256", path=dev)["sha256"] for dev in (f"/dev/{sd}", local)}
    assert len(set(sums.values())) == 1, f"legs differ after the partial heal: {sums}"
    verdict = g.run(
        [
            sys.executable,
            HELPER,
            "guest",
            "verify",
            f"/dev/md/{LABEL}",
            "outage",
            str(WRITES),
            str(WRITE_KIB << 10),
        ]
    )
    assert '"mismatched": []' in verdict.stdout, verdict.stdout
    log = g.read("/tmp/agent.log") or ""
    assert re.search(rf"heal of {LABEL} started, partial", log), log[-3000:]

    g.kill("agent", "TERM")
    g.wait_proc("agent", timeout=30)
    res = xl.remove(vbd)
    assert res.rc == 0, str(res)
    assert g.read(bitmap) is None, "the bitmap file outlived the array"
