#!/usr/bin/env python3
"""The writer's cost of the write-intent bitmap on the real kernel, resolved below the machine's noise.

    sudo .venv/bin/python bench/bitmap_cost.py [--chunks 64,4096] [--phase-minutes 5] [--pairs 16]
                                               [--disk-gib 16] [--control] [--writers aio,pwrite]
                                               [--xen] [--save FILE]

Boots the real-kernel bed (tests/vm: Debian's kernel under qemu TCG, tgt on the guest's loopback;
with --xen as dom0 under Xen, each mirror attached as dom0's own vbd and written through blkfront ->
blkback, a VM's path) holding the machine-wide VM lock (/tmp/iscsimple-vm.lock). Three mirrors of
the project's layout (a local device plus a LUN over iSCSI, write-mostly, built by the project's
--build command with --assume-clean), each DISK_GIB large (sparse), same kind of backing: A without
a bitmap, B with its bitmap file in the product's RAM store (ext4 on zram, made by
core/bitmapstore.py), C with its bitmap file on ext4 with 4 KiB blocks on a loop device, the layout
of a bitmap on a local disk's filesystem (the loop device's file is in the guest's RAM, so C shows
the block layer's path to a disk, not a disk's latency; with --control, C is built without a bitmap,
like A, and C/A is the bench's own bias between two identical mirrors). One phase per chunk size: B
and C are rebuilt with that chunk, left idle until md has cleaned every bit mdadm's new file starts
with, warmed up, and then one writer of 4 KiB O_DIRECT|O_DSYNC writes, one at a time, writes to A, B
and C in turn (A B C, B C A, C A B, ...: a load change on this shared machine hits all alike), in
blocks of PAIRS turns, sequential and at random places block by block, and for each WRITER in turn:
`aio` submits each write through Linux AIO as Xen's blkback and qemu submit a VM's writes (md then
writes the bitmap page and submits the write in the submitter's context), `pwrite` is a process's
synchronous pwrite(), which md hands to the array's raid1d thread when the array has a bitmap
(bench/aio.py). A queue-depth-1 writer's throughput is 1 / its mean latency, so per mirror with a
bitmap (X = B, C), chunk and pattern the bench prints X's throughput over A's (A's total write time
over X's, for as many writes) with a 95 % bootstrap confidence interval (resampling blocks), the
median of the per-block ratios with its interval, and md's bitmap-file writes per X write, counted
on the device under X's filesystem (md writes the file's blocks itself and nothing else writes
there): during X's writes, and in all (the daemon's lazy clears may land during the others'). "At
most 5 % slower" is shown for a chunk size only when B's interval's lower bound is at least 0.95 for
both patterns, with the aio writer (a VM's path) when it ran. It also prints what a partial heal
copies for 4 MiB written as 1024 scattered 4 KiB writes at each chunk size (the other side of the
trade-off).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import sys
import time
from pathlib import Path

from aio import AioWriter  # bench/aio.py, beside this file
from heal import BedBench, run_on_bed  # bench/heal.py, beside this file

IQN = "iqn.2026-11.bench.local:cost"
MD = {"A": "/dev/md/bench-cost-a", "B": "/dev/md/bench-cost-b", "C": "/dev/md/bench-cost-c"}
# Where B's and C's bitmap files live: B in the product's RAM store, C on a disk's layout.
BITMAP_DIRS = {"B": "/var/lib/iscsimple/cost-ram", "C": "/var/lib/iscsimple/cost-disk"}
WITH_BITMAP = tuple(BITMAP_DIRS)
# Each block's turns rotate A B C, B C A, C A B: every mirror writes first, second and third alike.
ORDERS = (("A", "B", "C"), ("B", "C", "A"), ("C", "A", "B"))
RESULTS = "/tmp/bitmap-cost.jsonl"
PATTERNS = ("sequential", "random")
WRITERS = ("aio", "pwrite")  # how a write is submitted: a VM's path first
XEN_VDEVS = {"A": "xvdb", "B": "xvdc", "C": "xvdd"}  # --xen: each mirror as dom0's own vbd
WRITE = 4096


# -- in the guest (run as `python bench/bitmap_cost.py guest FILE`) ---------------------------------


def guest_main(argv: list[str]) -> None:
    if argv[0] == "ram-store":
        from iscsimple.core.bitmapstore import make_ram_store
        from iscsimple.core.paths import HostPaths
        from iscsimple.core.run import Deadline

        print(json.dumps({"device": make_ram_store(HostPaths(), Path(argv[1]), Deadline(60))}))
        return
    cfg = json.loads(Path(argv[0]).read_text())
    with open(RESULTS, "a") as out:
        run_phases(cfg, out)


def run_phases(cfg: dict, out) -> None:
    """Every phase in one process (no interpreter start between writes), one JSON line per block."""
    import subprocess

    from iscsimple.core.bitmap import read_bitmap_file
    from iscsimple.hotplug.mdadm import build_argv

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, timeout=120, capture_output=True)

    def build(name: str, chunk: int | None) -> int:
        leg = cfg["legs"][name]
        file = Path(BITMAP_DIRS[name]) / f"chunk-{chunk}" if chunk else None
        if file is not None:
            file.unlink(missing_ok=True)
        argv = build_argv(MD[name], leg["lun"], None, file, chunk)
        argv[argv.index("missing")] = leg["local"]
        sh(*argv, "--assume-clean")  # both legs hold whatever they hold: no resync
        deadline = time.monotonic() + 30
        while not os.path.exists(MD[name]) and time.monotonic() < deadline:
            time.sleep(0.05)
        # md reads the file mdadm just wrote: how many bits it starts with set
        return read_bitmap_file(file).dirty if file else 0

    stats = {name: Path("/sys/block") / Path(dev).name / "stat" for name, dev in cfg["fs_devices"].items()}

    def fs_writes() -> dict[str, int]:
        return {name: int(stat.read_text().split()[4]) for name, stat in stats.items()}  # writes completed

    def emit(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    def attach(name: str) -> str:
        """With --xen: the mirror as a VM's disk is served, through blkfront -> blkback (dom0's own vbd)."""
        if not cfg.get("xen"):
            return MD[name]
        vdev = XEN_VDEVS[name]
        target = os.path.realpath(MD[name])
        sh("xl", "block-attach", "0", f"format=raw,vdev={vdev},access=rw,target={target}")
        deadline = time.monotonic() + 60
        while not os.path.exists(f"/dev/{vdev}") and time.monotonic() < deadline:
            time.sleep(0.1)
        return f"/dev/{vdev}"

    def detach(name: str) -> None:
        if cfg.get("xen"):
            sh("xl", "block-detach", "0", XEN_VDEVS[name])

    build("A", None)
    writers = {}
    for chunk in cfg["chunks"]:
        for name in WITH_BITMAP:
            if cfg.get("control") and name == "C":  # the control: a second mirror like A
                build(name, None)
                emit(
                    {"chunk": chunk, "mirror": name, "bits_at_build": 0, "clean_after": 0.0, "bitmap": "none"}
                )
                continue
            at_build = build(name, chunk)
            md = os.path.realpath(MD[name]).rsplit("/", 1)[-1]
            started = time.monotonic()
            while "bitmap: 0/" not in mdstat_block(md) and time.monotonic() - started < 120:
                time.sleep(0.2)
            clean_after = time.monotonic() - started
            emit(
                {
                    "chunk": chunk,
                    "mirror": name,
                    "bits_at_build": at_build,
                    "clean_after": clean_after,
                    "bitmap": mdstat_block(md),
                }
            )
        threads = {name: MdThread(os.path.realpath(MD[name]).rsplit("/", 1)[-1]) for name in MD}
        for name in MD:
            device = attach(name)
            for pattern in PATTERNS:
                for submit in cfg["writers"]:
                    writers[(name, pattern, submit)] = Writer(
                        device,
                        pattern,
                        seed=f"{chunk}-{name}-{pattern}-{submit}",
                        submit=submit,
                        # each writer's sequential run in its own part of the disk: one writer
                        # following another through the same chunks would find their bits set
                        start=WRITERS.index(submit) / len(WRITERS),
                    )
        warmup_end = time.monotonic() + cfg["warmup"]
        phase_end = warmup_end + cfg["phase"]
        block = 0
        while time.monotonic() < phase_end:
            measured = time.monotonic() >= warmup_end
            for pattern, submit in [(p, w) for p in PATTERNS for w in cfg["writers"]]:
                seconds = dict.fromkeys(MD, 0.0)
                # bitmap-file writes on each store's device while each mirror wrote
                bitmap_writes = {(name, store): 0 for name in MD for store in WITH_BITMAP}
                switches = {name: thread.switches() for name, thread in threads.items()}
                for turn in range(cfg["pairs"]):
                    for name in ORDERS[turn % len(ORDERS)]:
                        io0 = fs_writes()
                        seconds[name] += writers[(name, pattern, submit)].write()
                        io1 = fs_writes()
                        for store in WITH_BITMAP:
                            bitmap_writes[(name, store)] += io1[store] - io0[store]
                if measured:
                    record = {
                        "chunk": chunk, "block": block, "pattern": pattern, "writer": submit, "pairs": cfg["pairs"],
                    }  # fmt: skip
                    for name in MD:
                        record[f"{name.lower()}_seconds"] = seconds[name]
                        # each array's raid1d: woken per write when md hands the writes to it
                        record[f"{name.lower()}_md_thread_switches"] = (
                            threads[name].switches() - switches[name]
                        )
                    for store in WITH_BITMAP:  # on each store: during its own mirror's writes, in all
                        own = bitmap_writes[(store, store)]
                        record[f"{store.lower()}_bitmap_writes"] = own
                        record[f"{store.lower()}_bitmap_writes_all"] = sum(
                            bitmap_writes[(name, store)] for name in MD
                        )
                    emit(record)
            block += measured
        for writer in writers.values():
            writer.close()
        for name in MD:
            detach(name)
        for name in WITH_BITMAP:
            sh("mdadm", "--stop", MD[name])
    sh("mdadm", "--stop", MD["A"])


class MdThread:
    """An array's md thread (`mdN_raid1`): its context switches count how often it ran."""

    def __init__(self, md: str):
        self.status = next(
            (p / "status" for p in Path("/proc").iterdir() if p.name.isdigit() and _comm(p) == f"{md}_raid1"),
            None,
        )

    def switches(self) -> int:
        if self.status is None:
            return 0
        try:
            text = self.status.read_text()
        except OSError:
            return 0
        return sum(int(line.split()[1]) for line in text.splitlines() if "ctxt_switches:" in line)


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return ""


def mdstat_block(md: str) -> str:
    """The `bitmap:` line of one array in /proc/mdstat ("bitmap: 0/N pages" once md cleaned every bit)."""
    lines = Path("/proc/mdstat").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{md} :"):
            for follow in lines[i + 1 : i + 4]:
                if "bitmap:" in follow:
                    return follow.strip()
    return ""


class Writer:
    """4 KiB O_DIRECT|O_DSYNC writes, one at a time, submitted by `submit` (WRITERS); a sequential
    writer starts at `start` (a fraction of the disk) and resumes where it stopped."""

    def __init__(self, device: str, pattern: str, seed: str, submit: str = "pwrite", start: float = 0.0):
        self.fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
        self.blocks = os.lseek(self.fd, 0, os.SEEK_END) // WRITE
        self.pattern, self.rnd, self.next = pattern, random.Random(seed), int(start * self.blocks)
        self.buf = mmap.mmap(-1, WRITE)
        self.buf.write(os.urandom(WRITE))
        self.aio = AioWriter(self.fd, self.buf) if submit == "aio" else None

    def write(self) -> float:
        """One write; its latency in seconds."""
        if self.pattern == "random":
            block = self.rnd.randrange(self.blocks)
        else:
            block, self.next = self.next, (self.next + 1) % self.blocks
        started = time.perf_counter()
        if self.aio is not None:
            self.aio.pwrite(block * WRITE)
        else:
            os.pwrite(self.fd, self.buf, block * WRITE)
        return time.perf_counter() - started

    def close(self) -> None:
        if self.aio is not None:
            self.aio.close()
        os.close(self.fd)


# -- the figures (host side; pure functions) --------------------------------------------------------


def blocks_by(
    records: list[dict], mirror: str = "B"
) -> dict[tuple[int, str, str], list[tuple[float, float]]]:
    """(chunk, pattern, writer) -> per block of alternating writes: (A's seconds, `mirror`'s seconds) for
    as many writes each. Records of runs before the aio writer have no writer: they were pwrite."""
    key = f"{mirror.lower()}_seconds"
    out: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
    for r in records:
        if r["a_seconds"] > 0 and r.get(key, 0) > 0:
            out.setdefault((r["chunk"], r["pattern"], r.get("writer", "pwrite")), []).append(
                (r["a_seconds"], r[key])
            )
    return out


def throughput_ratio(blocks: list[tuple[float, float]]) -> float:
    """B's writes/s over A's: the same number of writes each, so A's total time over B's."""
    return sum(a for a, _ in blocks) / sum(b for _, b in blocks)


def median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def bootstrap_ci(values: list[float], statistic, resamples: int = 4000, level: float = 0.95, seed: int = 1):
    """Percentile bootstrap: the statistic over `resamples` resamples (with replacement) of the pairs."""
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rnd = random.Random(seed)
    n = len(values)
    stats = sorted(statistic([values[rnd.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    tail = (1 - level) / 2
    return stats[int(tail * resamples)], stats[min(resamples - 1, int((1 - tail) * resamples))]


def heal_bytes(disk_bytes: int, chunk: int, writes: int = 1024, size: int = WRITE, seed: str = "heal") -> int:
    """What a partial heal copies after `writes` scattered writes of `size` bytes: every chunk they
    touched, whole (md's recovery skips only chunks whose bit is clear)."""
    rnd = random.Random(seed)
    slots = rnd.sample(range(disk_bytes // size), writes)
    return len({slot * size // chunk for slot in slots}) * chunk


# -- on the host --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", default="64,4096", help="bitmap chunk sizes, KiB")
    parser.add_argument("--phase-minutes", type=float, default=5.0, help="measured time per chunk size")
    parser.add_argument("--warmup", type=float, default=15.0, help="unmeasured seconds per phase")
    parser.add_argument(
        "--pairs", type=int, default=16, help="alternating A/B writes per block (bootstrap unit)"
    )
    parser.add_argument("--disk-gib", type=int, default=16, help="size of each mirror (sparse)")
    parser.add_argument(
        "--writers", default=",".join(WRITERS), help="how writes are submitted: aio (a VM's path), pwrite"
    )
    parser.add_argument(
        "--xen",
        action="store_true",
        help="boot dom0 under Xen and write to each mirror as dom0's own vbd: blkfront -> blkback -> md",
    )
    parser.add_argument("--save", type=Path, help="also write the per-block records (JSON lines) here")
    parser.add_argument(
        "--control",
        action="store_true",
        help="build C without a bitmap: C/A is then the bench's own bias between two identical mirrors",
    )
    args = parser.parse_args()
    writers = args.writers.split(",")
    if not writers or set(writers) - set(WRITERS):
        parser.error(f"--writers: a comma-separated list of {', '.join(WRITERS)}")
    run_on_bed(
        "bench/bitmap_cost.py",
        lambda bed, xl, cli: CostBench(bed, xl, cli, args).run(),
        memory_mib=2048,
        xen=args.xen,
    )


class CostBench(BedBench):
    script = Path(__file__).resolve()

    def run(self) -> None:
        bed, g, a = self.bed, self.g, self.args
        chunks = [int(k) << 10 for k in a.chunks.split(",")]
        fs_devices = {"B": self.helper("ram-store", BITMAP_DIRS["B"])["device"]}  # core/bitmapstore.py
        # C: a host's /var/lib, ext4 with 4 KiB blocks, here on a loop device (RAM under the guest)
        fs_devices["C"] = bed.make_disk("cost-fs", 64)
        self.sh(["mkfs.ext4", "-q", "-b", "4096", fs_devices["C"]])
        self.sh(["mkdir", "-p", BITMAP_DIRS["C"]])
        self.sh(["mount", fs_devices["C"], BITMAP_DIRS["C"]])
        legs = {}
        disks = {}
        for i, name in enumerate(MD, start=1):
            disks[i] = bed.make_disk(f"cost-lun-{name}", a.disk_gib << 10)
            legs[name] = {"local": bed.make_disk(f"cost-local-{name}", a.disk_gib << 10)}
        bed.export(IQN, disks)
        bed.discover_and_login(IQN, 5)
        for i, name in enumerate(MD, start=1):
            legs[name]["lun"] = bed.lun_device(IQN, i)
        cfg = {
            "legs": legs, "fs_devices": fs_devices, "chunks": chunks, "pairs": a.pairs,
            "warmup": a.warmup, "phase": a.phase_minutes * 60, "control": a.control,
            "writers": a.writers.split(","), "xen": a.xen,
        }  # fmt: skip
        g.run(["tee", "/tmp/bitmap-cost.json"], input=json.dumps(cfg))
        total = len(chunks) * (a.phase_minutes * 60 + a.warmup + 150) + 120
        print(
            f"A/B/C on three {a.disk_gib} GiB mirrors, one write each in turn, {a.phase_minutes:g} min per chunk size "
            f"(at most {total / 60:.0f} min)",
            flush=True,
        )
        g.spawn(
            "cost", [sys.executable, str(self.script), "guest", "/tmp/bitmap-cost.json"], log="/tmp/cost.log"
        )
        started, shown = time.monotonic(), 0
        while True:
            answer = g.call("wait", wait=90, name="cost", timeout=30)
            done = not answer["running"]
            records = [json.loads(line) for line in (g.read(RESULTS) or "").splitlines() if line.strip()]
            for r in records[shown:]:
                if "bits_at_build" in r:
                    print(
                        f"  {r['mirror']}, chunk {r['chunk'] >> 10} KiB: {r['bits_at_build']} bits set in the file mdadm wrote; "
                        f"md had cleaned them all after {r['clean_after']:.1f} s idle ({r['bitmap']})",
                        flush=True,
                    )
            shown = len(records)
            if done or time.monotonic() - started > total:
                break
            print(f"  {time.monotonic() - started:.0f} s: {shown} blocks", flush=True)
        log = g.read("/tmp/cost.log") or ""
        if not done:
            g.kill("cost")
        if a.save:
            a.save.write_text("".join(json.dumps(r) + "\n" for r in records))
        report([r for r in records if "block" in r], a.disk_gib << 30, control=a.control, xen=a.xen)
        if not done or answer["rc"] != 0:
            sys.exit(f"the guest's run did not finish cleanly:\n{log[-3000:]}")


STORE_NAMES = {"B": "RAM store (zram, the product's)", "C": "disk layout (ext4 on a loop device)"}
CONTROL_NAME = "control (no bitmap, like A)"


def report(records: list[dict], disk_bytes: int, control: bool = False, xen: bool = False) -> None:
    """`xen`: the writes went through blkfront -> blkback (a VM's path), not straight to the arrays."""
    from iscsimple.core.bitmap import DEFAULT_CHUNK_BYTES

    print(
        "\nmirror | chunk | pattern | writer | writes each | X/A throughput [95 % CI] | block median [95 % CI] "
        "| writes/s A, X | bitmap writes per X write (during X's writes / all) | md thread runs per write A, X"
    )
    ran = {r.get("writer", "pwrite") for r in records}
    judged = next((w for w in WRITERS if w in ran), "pwrite")  # a VM's path when it ran
    shown: dict[int, bool] = {}  # by the throughput interval (the criterion)
    by_median: dict[int, bool] = {}  # by the per-block median's interval (robust to single stalls)
    for mirror in WITH_BITMAP:
        for (chunk, pattern, writer), blocks in sorted(blocks_by(records, mirror).items()):
            ratio, (lo, hi) = throughput_ratio(blocks), bootstrap_ci(blocks, throughput_ratio)
            per_block = [a / b for a, b in blocks]
            md, (mlo, mhi) = median(per_block), bootstrap_ci(per_block, median)
            mine = [
                r
                for r in records
                if r["chunk"] == chunk and r["pattern"] == pattern and r.get("writer", "pwrite") == writer
            ]
            writes = sum(r["pairs"] for r in mine)
            own = sum(r[f"{mirror.lower()}_bitmap_writes"] for r in mine) / writes
            every = sum(r[f"{mirror.lower()}_bitmap_writes_all"] for r in mine) / writes
            rates = f"{writes / sum(a for a, _ in blocks):.1f}, {writes / sum(b for _, b in blocks):.1f}"
            runs = ", ".join(
                f"{sum(r.get(f'{m.lower()}_md_thread_switches', 0) for r in mine) / writes:.2f}"
                for m in ("A", mirror)
            )
            default = " (default)" if chunk == DEFAULT_CHUNK_BYTES else ""
            print(
                f"{mirror}: {CONTROL_NAME if control and mirror == 'C' else STORE_NAMES[mirror]} | {chunk >> 10} KiB{default} | {pattern} | {writer} | {writes} | "
                f"{ratio:.3f} [{lo:.3f}-{hi:.3f}] | {md:.3f} [{mlo:.3f}-{mhi:.3f}] | {rates} | {own:.3f} / {every:.3f} | {runs}"
            )
            if mirror == "B" and writer == judged:
                shown[chunk] = shown.get(chunk, True) and lo >= 0.95
                by_median[chunk] = by_median.get(chunk, True) and mlo >= 0.95
    path = f"{judged} writer{', through Xen blkfront -> blkback' if xen else ''}"
    for chunk, ok in sorted(shown.items()):
        print(
            f"bitmap in the RAM store at most 5 % slower at {chunk >> 10} KiB chunks "
            f"(CI lower bound >= 0.95, both patterns, {path}): {'shown' if ok else 'NOT shown'}"
        )
        print(
            f"  by the per-block median instead (its CI lower bound >= 0.95, both patterns): "
            f"{'shown' if by_median[chunk] else 'NOT shown'}"
        )
    print("\nwhat a partial heal copies for 4 MiB written as 1024 scattered 4 KiB writes:")
    for disk in (256 << 20, disk_bytes, 100 << 30):
        copies = ", ".join(f"{c >> 10} KiB: {heal_bytes(disk, c) / (1 << 20):.0f} MiB" for c in sorted(shown))
        print(f"  {disk / (1 << 30):g} GiB disk: {copies}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "guest":
        guest_main(sys.argv[2:])
    else:
        main()
