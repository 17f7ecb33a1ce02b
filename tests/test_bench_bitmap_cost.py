"""bench/bitmap_cost.py's figures: the blocks, the throughput ratio, its bootstrap interval and the heal-granularity count."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bitmap_cost


def block(chunk, pattern, a_seconds, b_seconds):
    return {"chunk": chunk, "pattern": pattern, "a_seconds": a_seconds, "b_seconds": b_seconds}


def test_blocks_are_grouped_by_chunk_and_pattern_and_empty_ones_dropped():
    records = [
        block(64, "random", 2.0, 1.0),
        block(64, "sequential", 1.0, 1.5),
        block(64, "random", 1.0, 1.0),
        block(256, "random", 0.0, 1.0),  # no time measured on one side: no pair
    ]
    assert bitmap_cost.blocks_by(records) == {
        (64, "random", "pwrite"): [(2.0, 1.0), (1.0, 1.0)],  # records before the aio writer: pwrite
        (64, "sequential", "pwrite"): [(1.0, 1.5)],
    }
    records.append({**block(64, "random", 3.0, 2.0), "writer": "aio"})
    assert bitmap_cost.blocks_by(records)[(64, "random", "aio")] == [(3.0, 2.0)]


def test_throughput_ratio_is_time_without_over_time_with_for_as_many_writes():
    # B took 3 s where A took 2.4 s for the same writes: B writes at 0.8 x A's rate
    assert bitmap_cost.throughput_ratio([(1.0, 1.0), (1.4, 2.0)]) == pytest.approx(0.8)


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_pairs():
    rnd = random.Random(3)

    def pair():
        a = rnd.lognormvariate(0, 0.1)
        return a, a / 0.96 * rnd.lognormvariate(0, 0.05)  # B 4 % slower, with noise

    few = [pair() for _ in range(10)]
    many = few + [pair() for _ in range(300)]
    lo_few, hi_few = bitmap_cost.bootstrap_ci(few, bitmap_cost.throughput_ratio)
    lo, hi = bitmap_cost.bootstrap_ci(many, bitmap_cost.throughput_ratio)
    assert lo < bitmap_cost.throughput_ratio(many) < hi
    assert lo < 0.96 < hi < 1
    assert hi - lo < (hi_few - lo_few) / 2
    assert all(math.isnan(bound) for bound in bitmap_cost.bootstrap_ci([0.9], bitmap_cost.median))


def test_median():
    assert bitmap_cost.median([3, 1, 2]) == 2
    assert bitmap_cost.median([4, 1, 2, 3]) == 2.5


def test_heal_copies_every_touched_chunk_whole():
    disk = 256 << 20
    assert bitmap_cost.heal_bytes(disk, 4096) == 4 << 20  # chunk = write: exactly what was written
    assert bitmap_cost.heal_bytes(disk, 64 << 20) == disk  # 1024 writes touch all four chunks
    small, large = bitmap_cost.heal_bytes(disk, 64 << 10), bitmap_cost.heal_bytes(disk, 1 << 20)
    assert 4 << 20 < small < large < disk


def three(chunk, pattern, a, b, c, b_writes=16, c_writes=16, writer="aio"):
    return {
        "chunk": chunk, "block": 0, "pattern": pattern, "writer": writer, "pairs": 16,
        "a_seconds": a, "b_seconds": b, "c_seconds": c,
        "b_bitmap_writes": b_writes, "b_bitmap_writes_all": b_writes,
        "c_bitmap_writes": c_writes, "c_bitmap_writes_all": c_writes + 1,
    }  # fmt: skip


def blocks_of(seed, b_ratio, c_ratio, writer="aio", b_md_thread_switches=0):
    """40 blocks per pattern: B and C at about the given throughput relative to A's."""
    rnd = random.Random(seed)
    records = []
    for pattern in ("random", "sequential"):
        for _ in range(40):
            a = rnd.uniform(0.9, 1.1)
            b = a / b_ratio * rnd.uniform(0.99, 1.01)
            records.append(three(64 << 10, pattern, a, b, a / c_ratio, writer=writer))
            records[-1]["b_md_thread_switches"] = b_md_thread_switches
    return records


def test_report_compares_each_bitmap_store_with_the_mirror_without_and_judges_the_ram_store(capsys):
    records = blocks_of(5, 0.99, 0.8)
    assert bitmap_cost.blocks_by(records, "C")[(64 << 10, "random", "aio")][0][1] == records[0]["c_seconds"]
    bitmap_cost.report(records, 16 << 30)
    out = capsys.readouterr().out
    ram = [line for line in out.splitlines() if line.startswith("B: RAM store")]
    disk = [line for line in out.splitlines() if line.startswith("C: disk layout")]
    assert len(ram) == len(disk) == 2
    ratios = {line[0]: float(line.split(" | ")[5].split()[0]) for line in ram + disk}
    assert ratios["B"] == pytest.approx(0.99, abs=0.01) and ratios["C"] == pytest.approx(0.8, abs=0.01)
    assert (
        "at most 5 % slower at 64 KiB chunks (CI lower bound >= 0.95, both patterns, aio writer): shown"
        in out
    )


def test_the_verdict_is_the_vm_path_writers_when_it_ran_and_both_writers_are_shown(capsys):
    # md handed each of B's 16 writes per block to raid1d with the pwrite writer
    records = blocks_of(6, 0.99, 1.0) + blocks_of(7, 0.9, 1.0, writer="pwrite", b_md_thread_switches=16)
    bitmap_cost.report(records, 16 << 30)
    out = capsys.readouterr().out
    rows = {
        (line.split(" | ")[2], line.split(" | ")[3]): line
        for line in out.splitlines()
        if line.startswith("B:")
    }
    assert set(rows) == {(p, w) for p in ("random", "sequential") for w in ("aio", "pwrite")}
    assert float(rows[("random", "pwrite")].split(" | ")[5].split()[0]) == pytest.approx(0.9, abs=0.01)
    assert rows[("random", "pwrite")].endswith(" | 0.00, 1.00") and rows[("random", "aio")].endswith(
        " | 0.00, 0.00"
    )
    assert "(CI lower bound >= 0.95, both patterns, aio writer): shown" in out
    bitmap_cost.report(records, 16 << 30, xen=True)
    assert "(CI lower bound >= 0.95, both patterns, aio writer, through Xen blkfront -> blkback): shown" in (
        capsys.readouterr().out
    )
    # one block in ten stalls 3x longer with the bitmap: the throughput interval cannot show 5 %,
    # the per-block median's still can, and both verdicts are printed
    stalled = [
        {**r, "b_seconds": r["b_seconds"] * (3 if i % 10 == 0 else 1)}
        for i, r in enumerate(x for x in records if x["writer"] == "aio")
    ]
    bitmap_cost.report(stalled, 16 << 30)
    out = capsys.readouterr().out
    assert "(CI lower bound >= 0.95, both patterns, aio writer): NOT shown" in out
    assert "by the per-block median instead (its CI lower bound >= 0.95, both patterns): shown" in out
    # without the aio writer the pwrite writer is judged, and fails
    bitmap_cost.report([r for r in records if r["writer"] == "pwrite"], 16 << 30)
    assert "(CI lower bound >= 0.95, both patterns, pwrite writer): NOT shown" in capsys.readouterr().out


def test_the_aio_writer_writes_its_buffer_at_the_offset_and_says_why_it_cannot(tmp_path):
    import mmap
    import os

    from aio import AioWriter

    buf = mmap.mmap(-1, 4096)
    buf.write(b"\x5a" * 4096)
    fd = os.open(tmp_path / "disk", os.O_RDWR | os.O_CREAT, 0o600)
    writer = AioWriter(fd, buf)
    try:
        writer.pwrite(3 * 4096)
        assert os.pread(fd, 4096, 3 * 4096) == b"\x5a" * 4096
        assert os.path.getsize(tmp_path / "disk") == 4 * 4096
    finally:
        writer.close()
        os.close(fd)
    readonly = os.open(tmp_path / "disk", os.O_RDONLY)
    writer = AioWriter(readonly, buf)
    try:
        with pytest.raises(OSError) as err:
            writer.pwrite(0)
        assert err.value.errno == 9  # EBADF: the descriptor is not open for writing
    finally:
        writer.close()
        os.close(readonly)
