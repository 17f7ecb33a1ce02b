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
        (64, "random"): [(2.0, 1.0), (1.0, 1.0)],
        (64, "sequential"): [(1.0, 1.5)],
    }


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


def three(chunk, pattern, a, b, c, b_writes=16, c_writes=16):
    return {
        "chunk": chunk, "block": 0, "pattern": pattern, "pairs": 16,
        "a_seconds": a, "b_seconds": b, "c_seconds": c,
        "b_bitmap_writes": b_writes, "b_bitmap_writes_all": b_writes,
        "c_bitmap_writes": c_writes, "c_bitmap_writes_all": c_writes + 1,
    }  # fmt: skip


def test_report_compares_each_bitmap_store_with_the_mirror_without_and_judges_the_ram_store(capsys):
    rnd = random.Random(5)
    records = []
    for pattern in ("random", "sequential"):
        for _ in range(40):
            a = rnd.uniform(0.9, 1.1)
            records.append(three(64 << 10, pattern, a, a / 0.99 * rnd.uniform(0.99, 1.01), a / 0.8))
    assert bitmap_cost.blocks_by(records, "C")[(64 << 10, "random")][0][1] == records[0]["c_seconds"]
    bitmap_cost.report(records, 16 << 30)
    out = capsys.readouterr().out
    ram = [line for line in out.splitlines() if line.startswith("B: RAM store")]
    disk = [line for line in out.splitlines() if line.startswith("C: disk layout")]
    assert len(ram) == len(disk) == 2
    ratios = {line[0]: float(line.split(" | ")[4].split()[0]) for line in ram + disk}
    assert ratios["B"] == pytest.approx(0.99, abs=0.01) and ratios["C"] == pytest.approx(0.8, abs=0.01)
    assert "at most 5 % slower at 64 KiB chunks (CI lower bound >= 0.95, both patterns): shown" in out
