#!/usr/bin/env python3
"""How long block-iscsimple takes against the fake tools: prints figures, asserts nothing.

    .venv/bin/python bench/hotplug.py [--concurrent 16] [--arrays 600] [--dir DIR]

Uses the test harness (tests/fakes: fake iscsiadm, mdadm, xenstore-* keeping a fake
sysfs/dev tree), so the figures are our own cost plus one short Python process per
fake command (real iscsiadm/mdadm/xenstore-* are C and start faster; real logins and
md recovery take what the filer and the disks take). Times:
- one mirrored add and its remove, as processes, as libxl runs them;
- N concurrent adds of one target's LUNs (one login), then N concurrent removes;
- attach through the Python API on a host that already has ARRAYS arrays (registry
  and sysfs that big), md arrays named md_LABEL (CREATE names=yes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iscsimple.core.spec import parse_spec
from iscsimple.hotplug.attach import attach
from tests.fakes.harness import IQN, make_hotplug


def timed(fn):
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--arrays", type=int, default=600)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    own_dir = args.dir is None
    base = args.dir or Path(
        tempfile.mkdtemp(
            prefix="iscsimple-bench-hotplug-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
    )
    print(f"fake hosts under {base}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")

    try:
        run(args, base)
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)


def run(args: argparse.Namespace, base: Path) -> None:
    hp = make_hotplug(base / "single")
    hp.host.add_target(IQN)
    hp.mirror("vm1")
    vbd = hp.vbd(f"lun1@{IQN}+vm1")
    add, add_s = timed(lambda: hp.run("add", vbd))
    rm, rm_s = timed(lambda: hp.run("remove", vbd))
    assert add.returncode == 0 and rm.returncode == 0, (add.stderr, rm.stderr)
    print(f"one mirrored add (login, build, add):        {add_s:6.2f} s")
    print(f"its remove (stop, logout):                   {rm_s:6.2f} s")

    n = args.concurrent
    hp = make_hotplug(base / "concurrent")
    hp.host.add_target(IQN, luns={lun: 16 << 20 for lun in range(1, n + 1)})
    vbds = []
    for lun in range(1, n + 1):
        hp.mirror(f"vm{lun}", size=16 << 20)
        vbds.append(hp.vbd(f"lun{lun}@{IQN}+vm{lun}", domid=lun))
    for command in ("add", "remove"):
        started = time.monotonic()
        procs = [hp.start(command, v) for v in vbds]
        for p in procs:
            p.communicate()
        wall = time.monotonic() - started
        failed = sum(p.returncode != 0 for p in procs)
        errors = {hp.xs(v, "hotplug-error") for p, v in zip(procs, vbds, strict=True) if p.returncode}
        for error in sorted(e or "?" for e in errors):
            print(f"  {command} failed: {error}")
        verb = "login" if command == "add" else "logout"
        count = sum(line.endswith(f"--{verb}") for line in hp.command_lines())
        label = f"{n} concurrent {command}s on one target:"
        print(f"{label:45s}{wall:6.2f} s  ({count} {verb}, {failed} failed)")

    hp = make_hotplug(base / "scale")
    hp.host.enable_md_names()
    os.environ["PATH"] = hp.env["PATH"]
    os.environ["ISCSIMPLE_FAKE_HOST"] = hp.env["ISCSIMPLE_FAKE_HOST"]
    config = hp.config()
    seconds = []
    for i in range(args.arrays):
        hp.mirror(f"d{i}", size=1 << 20)
        _, s = timed(lambda i=i: attach(parse_spec(f"MISSING+d{i}"), hp.paths, config))
        seconds.append(s)
        if i + 1 in (100, args.arrays):
            last = seconds[-50:]
            print(
                f"attach (API), {i + 1:4d} arrays on the host:     median {statistics.median(last) * 1000:5.0f} ms,"
                f" max {max(last) * 1000:5.0f} ms (of the last 50)"
            )


if __name__ == "__main__":
    main()
