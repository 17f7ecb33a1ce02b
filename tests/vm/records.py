"""Verifiable records a VM stand-in writes to its disk: one 4 KiB block per record, at offset seq * 4 KiB.

A record holds its sequence number, a payload derived from it, and the SHA-256 of both, so a reader
can tell a record that is there and whole from a stale, torn or missing one, on any copy of the disk
(an md array, one of its legs, the filer's backing file). The content depends on the sequence number
only: a record written again after a hand-over (the last one, when the source stopped mid-log) is the
same bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct

SIZE = 4096
MAGIC = b"ISCSIMPLE-RECORD"
_HEAD = struct.Struct("<16sQ")


def record(seq: int) -> bytes:
    head = _HEAD.pack(MAGIC, seq)
    payload = hashlib.shake_256(f"record-{seq}".encode()).digest(SIZE - _HEAD.size - 32)
    return head + payload + hashlib.sha256(head + payload).digest()


def check(block: bytes, seq: int) -> str | None:
    """None when `block` is record `seq`, whole; else what is wrong."""
    magic, found = _HEAD.unpack_from(block)
    if magic != MAGIC:
        return "no record"
    if found != seq:
        return f"record {found} instead"
    if hashlib.sha256(block[:-32]).digest() != block[-32:]:
        return "checksum mismatch"
    return None


def verify(path: str, count: int, direct: bool = True) -> dict:
    """Records 0..count-1 on `path` (a block device with O_DIRECT, or a file): which are bad."""
    import mmap

    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    bad: list[tuple[int, str]] = []
    buf = mmap.mmap(-1, SIZE)
    try:
        for seq in range(count):
            n = os.preadv(fd, [buf], seq * SIZE)
            problem = check(bytes(buf[:SIZE]), seq) if n == SIZE else "short read"
            if problem is not None:
                bad.append((seq, problem))
    finally:
        os.close(fd)
    return {"count": count, "bad": bad[:20], "bad_total": len(bad)}


def write_records(device: str, log: str, start: int, stop: str, limit: int, interval: float = 0.0) -> None:
    """The VM stand-in: records start, start+1, ... with O_DIRECT|O_DSYNC until `stop` exists or `limit`,
    one per `interval` seconds (0: as fast as they complete). Each completed write is logged ("seq
    monotonic-time") after pwrite returns: the log's last line is the last record known on stable
    storage. A paced writer lasts: unpaced, a writer that runs through an outage and its heal can
    reach `limit` (the disk's end) before a migration, and the destination then has nothing to write."""
    import mmap
    import time

    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
    buf = mmap.mmap(-1, SIZE)
    began = time.monotonic()
    with open(log, "a", buffering=1) as out:
        seq = start
        while seq < limit and not os.path.exists(stop):
            buf.seek(0)
            buf.write(record(seq))
            os.pwrite(fd, buf, seq * SIZE)
            out.write(f"{seq} {time.monotonic():.3f}\n")
            seq += 1
            if interval:  # on a schedule from the start: a slow write does not shift the ones after it
                time.sleep(max(0.0, began + (seq - start) * interval - time.monotonic()))
    os.close(fd)


def last_logged(text: str) -> int:
    """The last record a writer's log says completed (-1: none)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return int(lines[-1].split()[0]) if lines else -1
