#!/usr/bin/env python3
"""What an iSCSI blip costs a mirrored VM disk, per replacement timeout, on the real kernel.

    sudo .venv/bin/python bench/blip.py [--timeouts 2,5,15] [--blips 3,10] [--kinds kill,drop]
                                        [--rate 10] [--mib 256]

Boots the real-kernel bed (tests/vm: Debian's kernel under qemu TCG, tgt on the guest's loopback)
holding the machine-wide VM lock (/tmp/iscsimple-vm.lock), attaches one mirror with `iscsimple
attach` (write-intent bitmap at the default chunk size, /var/lib/iscsimple on ext4 as on a host)
and starts a VM-like writer on it: 4 KiB O_DIRECT|O_DSYNC writes at random places, RATE a second,
one at a time (a write that stalls holds the next back, as a VM's synchronous writes do). Then,
for each kind of blip, each replacement timeout T (the live session's `recovery_tmo`) and each
blip length B:

- kill: tgtd is SIGKILLed and restarted B seconds later (the connection is reset at once: a filer
  that crashes or restarts its target);
- drop: every packet on the guest's loopback is dropped for B seconds (`tc qdisc ... netem loss
  100%`): a silent network blip; the initiator only notices through its NOP-Out ping
  (open-iscsi's defaults: every 5 s, 5 s to answer), so T counts from then.

Measured per blip: the writer's stall (the longest single write, issue to completion), whether md
failed the iSCSI leg; if it did, once the LUN is back, the writer paused (so the figures are
exact): the bitmap's dirty chunks, the heal through the shared executor (core.heal.execute_heal,
whichever route it proves, partial expected) with the MiB it wrote to the LUN (/sys/block/sdX/stat) and its time from
the executor's call to md idle and in sync. After the last blip both legs' checksums must be equal.
Prints one line per blip and a table; no timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from heal import BedBench, run_on_bed  # bench/heal.py, beside this file

IQN = "iqn.2026-11.bench.local:blip"
LABEL = "bench-blip"
WRITER_LOG = "/tmp/blip-writer.log"
PAUSE = "/tmp/blip-writer.pause"
PAUSED = "/tmp/blip-writer.paused"
STOP = "/tmp/blip-writer.stop"
BITMAP = f"/var/lib/iscsimple/bitmaps/{LABEL}"


# -- in the guest (run as `python bench/blip.py guest ...`) -----------------------------------------


def guest_main(argv: list[str]) -> None:
    op = argv[0]
    if op == "writer":  # device rate: runs until STOP exists
        paced_writer(argv[1], float(argv[2]))
    elif op == "heal":  # label bitmap-file -> the dirty chunks before, then the timed heal
        from heal import timed_heal  # bench/heal.py, beside this file

        from iscsimple.core.bitmap import read_bitmap_file

        before = read_bitmap_file(Path(argv[2]))
        result = timed_heal(argv[1], "auto")
        print(json.dumps({"dirty": before.dirty, "chunk": before.chunk_bytes, **result}))


def paced_writer(device: str, rate: float) -> None:
    """4 KiB writes at random places, one every 1/rate s (a late write is not made up for), each
    logged as "issued completed" (guest monotonic); while PAUSE exists it writes nothing."""
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
    blocks = os.lseek(fd, 0, os.SEEK_END) // 4096
    buf = mmap.mmap(-1, 4096)
    rnd = random.Random("blip")
    interval = 1 / rate
    due = time.monotonic()
    with open(WRITER_LOG, "w", buffering=1) as out:
        while not os.path.exists(STOP):
            if os.path.exists(PAUSE):
                if not os.path.exists(PAUSED):
                    Path(PAUSED).touch()
                time.sleep(0.01)
                due = time.monotonic()
                continue
            if os.path.exists(PAUSED):
                os.unlink(PAUSED)
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            buf.seek(0)
            buf.write(rnd.randbytes(4096))
            issued = time.monotonic()
            os.pwrite(fd, buf, rnd.randrange(blocks) * 4096)
            out.write(f"{issued:.3f} {time.monotonic():.3f}\n")
            due = max(due + interval, time.monotonic())
    os.close(fd)


# -- on the host ------------------------------------------------------------------------------------


@dataclass
class Blip:
    kind: str
    timeout: int
    length: float  # asked for
    down: float = 0.0  # guest monotonic: blip started
    up: float = 0.0  # blip ended (target answering / packets flowing)
    logged_in: float = 0.0  # session LOGGED_IN again, LUN running
    leg_failed: bool = False
    dirty_mib: float | None = None
    healed_mib: float | None = None
    heal_seconds: float | None = None
    heal_mode: str | None = None
    stall: float = 0.0  # the longest write issued in [down, end]
    stalled_until: float = 0.0  # when that write completed
    end: float = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeouts", default="2,5,15", help="replacement timeouts to try (s)")
    parser.add_argument("--blips", default="3,10", help="blip lengths (s)")
    parser.add_argument("--kinds", default="kill,drop", help="kill (target reset) and/or drop (silent)")
    parser.add_argument("--rate", type=float, default=10.0, help="the writer's writes per second")
    parser.add_argument("--mib", type=int, default=256, help="LUN size (MiB)")
    args = parser.parse_args()
    args.timeouts = [int(x) for x in args.timeouts.split(",")]
    args.blips = [float(x) for x in args.blips.split(",")]
    args.kinds = args.kinds.split(",")
    if not set(args.kinds) <= {"kill", "drop"}:
        parser.error("--kinds: kill, drop")
    run_on_bed("bench/blip.py", lambda bed, xl, cli: BlipBench(bed, xl, cli, args).run())


class BlipBench(BedBench):
    script = Path(__file__).resolve()

    def run(self) -> None:
        g, bed, a = self.g, self.bed, self.args
        self.records_on_ext4()
        if "drop" in a.kinds:
            g.run(["modprobe", "sch_netem"])
        lun = bed.make_disk("lun", a.mib)
        local = bed.make_disk("local", a.mib)
        bed.export(IQN, {1: lun})
        self.xl.configure({LABEL: local}, "replacement_timeout_mirrored = 5\n[heal]\nenabled = false\n")
        spec = f"lun1@{IQN}+{LABEL}"
        g.run([self.cli, "attach", spec], timeout=180)
        self.md = bed.md_name(LABEL)
        bed.wait_in_sync(self.md, timeout=900)
        self.session = bed.session(IQN)
        settings = {n: (g.read(f"{self.session}/{n}") or "?").strip() for n in ("recovery_tmo",)}
        conn = g.glob("/sys/class/iscsi_connection/connection*")[0]
        for n in ("ping_tmo", "recv_tmo"):  # the NOP-Out timeout and interval in force
            settings[n] = (g.read(f"{conn}/{n}") or "?").strip()
        print(f"attached {spec} as {self.md}; session {settings}", flush=True)
        g.spawn(
            "writer",
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "guest",
                "writer",
                f"/dev/md/{LABEL}",
                str(a.rate),
            ],
            log="/tmp/blip-writer.err",
        )
        g.wait_for(WRITER_LOG, "exists", timeout=120)
        time.sleep(3)
        blips = []
        for kind in a.kinds:
            for timeout in a.timeouts:
                for length in a.blips:
                    blip = self.blip(Blip(kind, timeout, length))
                    blips.append(blip)
        g.call("write", path=STOP, text="")
        g.wait_proc("writer", timeout=120)
        self.analyse(blips)
        sd = bed.lun_device(IQN, 1)
        sums = {dev: g.call("sha256", wait=900, path=dev)["sha256"] for dev in (sd, local)}
        assert len(set(sums.values())) == 1, f"the legs differ after the last heal: {sums}"
        print("after the last blip both legs' checksums are equal", flush=True)
        self.report(blips)

    def blip(self, b: Blip) -> Blip:
        g, bed = self.g, self.bed
        bed.wait_in_sync(self.md, timeout=900)
        g.call("write", path=f"{self.session}/recovery_tmo", text=f"{b.timeout}\n")
        assert (g.read(f"{self.session}/recovery_tmo") or "").strip() == str(b.timeout)
        time.sleep(2)  # the writer steady
        if b.kind == "kill":
            b.down = bed.kill_target()
        else:
            g.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "loss", "100%"])
            b.down = g.now()
        time.sleep(max(0.0, b.length - (g.now() - b.down)))
        if b.kind == "kill":
            bed.start_target()
        else:
            g.run(["tc", "qdisc", "del", "dev", "lo", "root"])
        b.up = g.now()
        g.wait_for(f"{self.session}/state", "equals", "LOGGED_IN", timeout=300)
        sd = bed.lun_device(IQN, 1)
        g.wait_for(f"/sys/block/{sd[5:]}/device/state", "equals", "running", timeout=120)
        b.logged_in = g.now()
        time.sleep(1)  # a write queued on the recovered session completes
        legs = bed.md_legs(self.md)
        b.leg_failed = "faulty" in legs.get(sd[5:], "") or sd[5:] not in legs
        if b.leg_failed:
            g.call("write", path=PAUSE, text="")
            g.wait_for(PAUSED, "exists", timeout=120)
            before = self.sectors_written(sd[5:])
            healed = self.helper("heal", LABEL, BITMAP, timeout=1900)
            assert "error" not in healed, healed
            b.heal_mode = healed["mode"]
            b.healed_mib = (self.sectors_written(sd[5:]) - before) * 512 / (1 << 20)
            b.dirty_mib = healed["dirty"] * healed["chunk"] / (1 << 20)
            b.heal_seconds = healed["seconds"]
            g.run(["rm", "-f", PAUSE])
            g.wait_for(PAUSED, "absent", timeout=120)
        b.end = g.now()
        print(f"{self.line(b)} (writer stall not yet read)", flush=True)
        return b

    def analyse(self, blips: list[Blip]) -> None:
        writes = [tuple(map(float, line.split())) for line in (self.g.read(WRITER_LOG) or "").splitlines()]
        for b in blips:
            inside = [(i, d) for i, d in writes if b.down - 1 <= i <= b.end]
            if inside:
                issued, done = max(inside, key=lambda w: w[1] - w[0])
                b.stall, b.stalled_until = done - issued, done

    @staticmethod
    def line(b: Blip) -> str:
        text = (
            f"{b.kind} blip {b.up - b.down:.1f} s, replacement timeout {b.timeout} s: writer stall {b.stall:.1f} s; "
            f"session back {b.logged_in - b.up:.1f} s after the blip; "
        )
        if b.leg_failed:
            degraded = b.end - b.stalled_until if b.stalled_until else float("nan")
            return text + (
                f"leg failed, {b.heal_mode} heal {b.healed_mib:.2f} MiB for {b.dirty_mib:.2f} MiB dirty in "
                f"{b.heal_seconds:.2f} s (without redundancy {degraded:.1f} s, the writer paused for the heal)"
            )
        return text + "leg kept (no heal)"

    def report(self, blips: list[Blip]) -> None:
        print()
        print(
            f"writer: 4 KiB O_DIRECT|O_DSYNC at random places, {self.args.rate:g}/s; LUN {self.args.mib} MiB"
        )
        print("| blip | length | timeout | writer stall | leg | heal: MiB to the LUN / dirty | heal time |")
        print("|---|---:|---:|---:|---|---:|---:|")
        for b in blips:
            heal = (
                (f"{b.healed_mib:.2f} / {b.dirty_mib:.2f}", f"{b.heal_seconds:.2f} s")
                if b.leg_failed
                else ("-", "-")
            )
            print(
                f"| {b.kind} | {b.up - b.down:.1f} s | {b.timeout} s | {b.stall:.1f} s | "
                f"{'failed' if b.leg_failed else 'kept'} | {heal[0]} | {heal[1]} |"
            )
        for b in blips:
            print(self.line(b))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "guest":
        guest_main(sys.argv[2:])
    else:
        main()
