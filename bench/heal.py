#!/usr/bin/env python3
"""Partial (bitmap) heal vs full heal on the real kernel: prints figures, asserts only data safety.

    sudo .venv/bin/python bench/heal.py [--mib 256] [--outage-writes 64] [--write-kib 64]

Boots the real-kernel test bed (tests/vm: Debian's kernel under qemu TCG, tgt on the guest's
loopback) holding the machine-wide VM lock (/tmp/iscsimple-vm.lock), with /var/lib/iscsimple on
ext4 as on a host. One mirror of a LUN (`iscsimple attach`, built with a write-intent bitmap at
the default chunk size), one outage (tgtd killed) during which OUTAGE_WRITES blocks of WRITE_KIB
(default 64 x 64 KiB = 4 MiB) are written at seeded random distinct places, then the LUN back and
the shared heal executor (core.heal.execute_heal, what the agent and `resolve --keep local` call)
heals it; it proves and takes the partial route. Then the same outage again, healed by the same
plan's full-route commands (`--fail`, `--remove`, `--add --write-mostly`). Measured: bytes
written to the iSCSI leg (/sys/block/sdX/stat, sectors written) and the time from the
executor's call to md idle with both legs in sync (timed in the guest, md polled every 10 ms;
a cold `iscsimple` CLI start, ~20 s under TCG, is not part of it). After each heal both legs'
checksums must be equal and every outage write present.

The writer's cost of the bitmap (with / without, per chunk size) is bench/bitmap_cost.py.

The last line is exactly:
    partial heal: W MiB written to the iSCSI leg for D MiB of dirty chunks (full heal: F MiB); T_p s vs T_f s
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VM_LOCK = Path("/tmp/iscsimple-vm.lock")
IQN = "iqn.2026-11.bench.local:heal"
LABEL = "bench-heal"
BITMAPS_FS_MIB = 32


# -- in the guest (run as `python bench/heal.py guest ...`) -----------------------------------------


def guest_main(argv: list[str]) -> None:
    op = argv[0]
    if op == "write":  # device seed count size -> offsets
        device, seed, count, size = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(scattered_writes(device, seed, count, size)))
    elif op == "verify":  # device seed count size -> mismatches
        device, seed, count, size = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(verify_writes(device, seed, count, size)))
    elif op == "bitmap":
        from iscsimple.core.bitmap import read_bitmap_file

        f = read_bitmap_file(Path(argv[1]))
        print(json.dumps({"dirty": f.dirty, "chunk": f.chunk_bytes, "chunks": f.chunks}))
    elif op == "heal":  # label partial|full -> seconds from the executor's call to md idle
        print(json.dumps(timed_heal(argv[1], argv[2])))
    elif op == "record":  # what the agent's detector (or `remove`) writes when it sees the stale copy
        from iscsimple.core.paths import HostPaths
        from iscsimple.core.registry import Registry
        from iscsimple.core.safety import record_if_stale

        paths = HostPaths()
        attachment = Registry(paths).by_label(argv[1])
        record = record_if_stale(paths, attachment, attachment.md_device) if attachment else None
        print(json.dumps({"recorded": record is not None}))


def _blocks(device: str, seed: str, count: int, size: int) -> list[tuple[int, bytes]]:
    fd = os.open(device, os.O_RDONLY)
    total = os.lseek(fd, 0, os.SEEK_END)
    os.close(fd)
    rnd = random.Random(seed)
    slots = rnd.sample(range(total // size), count)  # distinct places
    return [(slot * size, rnd.randbytes(size)) for slot in slots]


def scattered_writes(device: str, seed: str, count: int, size: int) -> dict:
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    buf = mmap.mmap(-1, size)
    started = time.monotonic()
    try:
        for offset, data in _blocks(device, seed, count, size):
            buf.seek(0)
            buf.write(data)
            os.pwrite(fd, buf, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"seconds": time.monotonic() - started}


def timed_heal(label: str, route: str) -> dict:
    """The heal as the agent runs it once it has decided, timed in the guest (no CLI cold start):
    `auto` is core.heal.execute_heal (lock, re-read, proof, the route it proves, mdadm), `partial`
    the same but an error unless it took the partial route, `full` the same plan's full-route
    commands; then md polled every 10 ms until both legs are in sync."""
    from iscsimple.core.bitmap import full_route
    from iscsimple.core.heal import MDADM_TIMEOUT, execute_heal
    from iscsimple.core.paths import HostPaths
    from iscsimple.core.registry import Registry
    from iscsimple.core.run import Deadline, run
    from iscsimple.core.safety import HealBlocked, plan_heal, read_view

    paths = HostPaths()
    view = read_view(paths, Registry(paths).by_label(label))
    plan = plan_heal(view, paths.sysfs, paths.devfs, enabled=True)
    if isinstance(plan, HealBlocked):
        return {"error": plan.detail}
    md = paths.sysfs / "block" / plan.md_device / "md"
    started = time.monotonic()
    if route == "full":
        plan = full_route(plan)
        for command in plan.commands():
            run(command, timeout=MDADM_TIMEOUT)
    else:
        outcome = execute_heal(paths, view, plan, Deadline(60))
        plan = outcome.plan
        if not outcome.started or (route == "partial" and plan.mode != "partial"):
            return {"error": f"{outcome.result} {plan.mode}: {outcome.detail} ({plan.route_reason})"}
    commands = time.monotonic() - started
    while not (
        (md / "degraded").read_text().strip() == "0" and (md / "sync_action").read_text().strip() == "idle"
    ):
        if time.monotonic() - started > 1800:
            return {"error": "not in sync after 30 min"}
        time.sleep(0.01)
    return {
        "seconds": time.monotonic() - started,
        "commands_seconds": commands,
        "mode": plan.mode,
        "reason": plan.route_reason,
        "added": plan.add,
    }


def verify_writes(device: str, seed: str, count: int, size: int) -> dict:
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)
    bad = []
    try:
        for offset, data in _blocks(device, seed, count, size):
            os.preadv(fd, [buf], offset)
            if buf[:size] != data:
                bad.append(offset)
    finally:
        os.close(fd)
    return {"mismatched": bad}


# -- on the host ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="LUN size (MiB)")
    parser.add_argument("--outage-writes", type=int, default=64, help="blocks written during the outage")
    parser.add_argument("--write-kib", type=int, default=64, help="size of each outage write (KiB)")
    args = parser.parse_args()
    run_on_bed("bench/heal.py", lambda bed, xl, cli: Bench(bed, xl, cli, args).run())


def run_on_bed(script: str, bench, memory_mib: int = 1024, xen: bool = False) -> None:
    """As root and holding the machine-wide VM lock: boot the real-kernel bed (with `xen`: as dom0
    under Xen, blkback and blkfront loaded), set it up and call bench(bed, xl, cli) (tests/vm:
    StorageBed, Xl, the CLI's path); bench/blip.py and bench/bitmap_cost.py use it too."""
    if os.geteuid() != 0:
        sys.exit(f"{script} boots the real-kernel bed: run it as root")
    sys.path.insert(0, str(REPO / "tests" / "vm"))
    VM_LOCK.touch(exist_ok=True)
    with open(VM_LOCK) as lock:
        print(f"waiting for {VM_LOCK} ...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        from storagebed import StorageBed
        from vmharness import Guest, prepare_kernel, prepare_xen
        from xldriver import CLI, Xl

        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            guest = Guest.boot(
                Path(tmp), prepare_kernel(), xen=prepare_xen() if xen else None, memory_mib=memory_mib
            )
            try:
                bed = StorageBed(guest)
                bed.setup()
                if xen:
                    bed.setup_xen()
                print(f"booted and set up in {time.monotonic() - started:.0f} s", flush=True)
                bench(bed, Xl(bed), CLI)
            finally:
                guest.shutdown()


class BedBench:
    """A benchmark on the booted bed: guest commands, this script's guest side, LUN counters."""

    script = Path(__file__).resolve()

    def __init__(self, bed, xl, cli: str, args: argparse.Namespace):
        self.bed, self.g, self.xl, self.cli, self.args = bed, bed.guest, xl, cli, args

    def sh(self, argv: list[str], timeout: float = 120):
        return self.g.run(argv, timeout=timeout)

    def helper(self, *argv: str, timeout: float = 300) -> dict:
        res = self.g.run([sys.executable, str(self.script), "guest", *argv], timeout=timeout)
        return json.loads(res.stdout)

    def sectors_written(self, sd: str) -> int:
        return int(self.g.read(f"/sys/block/{sd}/stat").split()[6])

    def records_on_ext4(self) -> str:
        """/var/lib/iscsimple on its own ext4, as on a host (md maps a bitmap file's blocks)."""
        fs = self.fs = self.bed.make_disk("bitmaps-fs", BITMAPS_FS_MIB)
        self.sh(["mkfs.ext4", "-q", "-b", "4096", fs])  # a host's block size (small filesystems get 1 KiB)
        self.sh(["mkdir", "-p", "/var/lib/iscsimple"])
        self.sh(["mount", fs, "/var/lib/iscsimple"])
        return fs


class Bench(BedBench):
    def __init__(self, bed, xl, cli: str, args: argparse.Namespace):
        super().__init__(bed, xl, cli, args)
        self.size = args.write_kib << 10

    def run(self) -> None:
        g, bed, a = self.g, self.bed, self.args
        self.records_on_ext4()

        lun = bed.make_disk("lun", a.mib)
        local = bed.make_disk("local", a.mib)
        bed.export(IQN, {1: lun})
        self.xl.configure({LABEL: local}, "replacement_timeout_mirrored = 5\n[heal]\nenabled = false\n")
        spec = f"lun1@{IQN}+{LABEL}"
        self.sh([self.cli, "attach", spec], timeout=120)
        md = bed.md_name(LABEL)
        sd = bed.lun_device(IQN, 1)[5:]
        bed.wait_in_sync(md, timeout=600)
        print(f"attached {spec} as {md}: {bed.mdstat().splitlines()[-3].strip()}", flush=True)
        bitmap = f"/var/lib/iscsimple/bitmaps/{LABEL}"

        # -- partial: the project's own heal executor, which proves and takes the partial route ---------
        self.outage("outage-1", md, sd)
        before = self.helper("bitmap", bitmap)
        dirty_mib = before["dirty"] * before["chunk"] / (1 << 20)
        print(f"bitmap before the heal: {before['dirty']} dirty chunks of {before['chunk'] >> 10} KiB")
        assert self.helper("record", LABEL)["recorded"], "no stale record for the outage"
        w0 = self.sectors_written(sd)
        partial = self.helper("heal", LABEL, "partial", timeout=1900)
        assert "error" not in partial, partial
        w_partial = (self.sectors_written(sd) - w0) * 512 / (1 << 20)
        self.check_legs("partial", md, sd, local, "outage-1")

        # -- full: the same outage again, the same plan's full-route commands ---------------------------
        self.outage("outage-2", md, sd)
        w0 = self.sectors_written(sd)
        full = self.helper("heal", LABEL, "full", timeout=1900)
        assert "error" not in full, full
        w_full = (self.sectors_written(sd) - w0) * 512 / (1 << 20)
        self.check_legs("full", md, sd, local, "outage-2")

        self.sh([self.cli, "detach", spec], timeout=120)
        assert g.read(bitmap) is None, "the bitmap file outlived the array"
        cold = [self.sh([self.cli, "--version"]).seconds for _ in range(3)]
        print(f"LUN {a.mib} MiB; outage writes {a.outage_writes} x {a.write_kib} KiB at random places")
        for route, r in (("partial", partial), ("full", full)):
            print(
                f"{route} heal: {r['seconds']:.2f} s from the executor's call to md idle "
                f"(its mdadm calls {r['commands_seconds']:.2f} s of it)"
            )
        print(
            "a cold start of the iscsimple CLI in this guest (not part of the times above): "
            + ", ".join(f"{c:.2f} s" for c in cold)
        )
        t_partial, t_full = partial["seconds"], full["seconds"]
        last = (
            f"partial heal: {w_partial:.2f} MiB written to the iSCSI leg for {dirty_mib:.2f} MiB of dirty "
            f"chunks (full heal: {w_full:.2f} MiB); {t_partial:.2f} s vs {t_full:.2f} s"
        )
        print(f"partial/full time: {t_partial / t_full * 100:.1f} %")
        print(last)

    def outage(self, seed: str, md: str, sd: str) -> None:
        a, bed, g = self.args, self.bed, self.g
        bed.kill_target()
        wrote = self.helper("write", f"/dev/md/{LABEL}", seed, str(a.outage_writes), str(self.size))
        assert "faulty" in bed.md_legs(md)[sd], bed.md_legs(md)
        print(
            f"{seed}: {a.outage_writes} writes in {wrote['seconds']:.1f} s (the first stalls until md fails the leg)"
        )
        bed.start_target()
        g.wait_for(bed.session(IQN) + "/state", "equals", "LOGGED_IN", timeout=120)
        g.wait_for(f"/sys/block/{sd}/device/state", "equals", "running", timeout=60)

    def check_legs(self, route: str, md: str, sd: str, local: str, seed: str) -> None:
        sums = {dev: self.g.call("sha256", wait=600, path=dev)["sha256"] for dev in (f"/dev/{sd}", local)}
        assert len(set(sums.values())) == 1, f"{route} heal: the legs differ: {sums}"
        bad = self.helper("verify", f"/dev/md/{LABEL}", seed, str(self.args.outage_writes), str(self.size))
        assert bad["mismatched"] == [], f"{route} heal lost writes at {bad['mismatched']}"
        print(f"{route} heal: both legs' checksums equal, every outage write present", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "guest":
        guest_main(sys.argv[2:])
    else:
        main()
