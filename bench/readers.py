#!/usr/bin/env python3
"""How long the kernel-state readers take on a big host: prints figures, asserts nothing.

    .venv/bin/python bench/readers.py [--arrays 5000] [--sessions 500] [--luns 10] [--dir DIR]

Builds a generated sysfs tree (on /dev/shm when it exists: real sysfs is in memory
too, a disk-backed tree would measure the disk) and a matching /proc/mdstat text,
then times read_md_arrays, parse_mdstat and read_iscsi_sessions over it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixturetree import FakeLun, FakeMember, write_iscsi_session, write_md_array

from iscsimple.core.iscsi import read_iscsi_sessions
from iscsimple.core.md import read_md_arrays
from iscsimple.core.mdstat import (
    Mdstat,
    MdstatArray,
    MdstatMember,
    MdstatProgress,
    format_mdstat,
    parse_mdstat,
)


def build(root: Path, arrays: int, sessions: int, luns: int) -> str:
    md_arrays = {}
    for i in range(arrays):
        name = f"md_vm{i}"
        recovering = i % 50 == 0
        write_md_array(
            root,
            name,
            [
                FakeMember(f"dm-{i}", 0, "spare" if recovering else "in_sync", dev=f"253:{i}"),
                FakeMember(f"sd{i}", 1, "in_sync,write_mostly", dev=f"8:{i}"),
            ],
            minor=i,
            degraded=1 if recovering else 0,
            sync_action="recover" if recovering else "idle",
            sync_completed="8320 / 131072" if recovering else "none",
            sync_speed="2645" if recovering else "none",
        )
        md_arrays[name] = MdstatArray(
            name=name,
            active=True,
            read_only=None,
            level="raid1",
            members=(MdstatMember(f"dm-{i}", 2), MdstatMember(f"sd{i}", 1, write_mostly=True)),
            blocks=65536,
            super="non-persistent",
            raid_disks=2,
            working_disks=1 if recovering else 2,
            status="U_" if recovering else "UU",
            progress=MdstatProgress("recovery", 0.063, 4160, 65536, 0.2, 2645) if recovering else None,
        )
    for sid in range(1, sessions + 1):
        write_iscsi_session(
            root,
            sid,
            f"iqn.2026-11.example:t{sid}",
            [FakeLun(lun, block=f"sd{sid}l{lun}", dev=f"8:{sid * 16 + lun}") for lun in range(luns)],
        )
    return format_mdstat(Mdstat(personalities=("raid1",), arrays=md_arrays))


def timed(label: str, runs: int, fn) -> None:
    # CPU time too: on a busy machine wall time measures the neighbours.
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    print(
        f"{label:<40} median {statistics.median(walls) * 1000:8.1f} ms wall"
        f" {statistics.median(cpus) * 1000:8.1f} ms cpu   max {max(walls) * 1000:8.1f} ms wall"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--luns", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="iscsimple-bench-", dir=args.dir))
    try:
        start = time.perf_counter()
        mdstat_text = build(root, args.arrays, args.sessions, args.luns)
        print(f"tree: {args.arrays} arrays, {args.sessions} sessions x {args.luns} LUNs under {root}")
        print(f"built in {time.perf_counter() - start:.1f} s; mdstat text {len(mdstat_text)} bytes")
        md = read_md_arrays(root)
        assert len(md.arrays) == args.arrays and not md.errors, md.errors[:3]
        timed(f"read_md_arrays ({args.arrays} arrays)", args.runs, lambda: read_md_arrays(root))
        timed(f"parse_mdstat ({args.arrays} arrays)", args.runs, lambda: parse_mdstat(mdstat_text))
        timed(
            f"read_iscsi_sessions ({args.sessions * args.luns} LUNs)",
            args.runs,
            lambda: read_iscsi_sessions(root),
        )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
