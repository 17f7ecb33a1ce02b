#!/usr/bin/env python3
"""How long the operator CLI takes on a big host: prints figures, asserts nothing.

    .venv/bin/python bench/cli.py [--vms 500] [--disks-per-vm 2] [--dir DIR]

Builds a generated sysfs tree with VMS x DISKS mirrored arrays on 10 targets and a
registry entry per disk (the issue's scale: 500 VMs x 2 = 1000 arrays), plus one domU
.cfg per VM in the legacy form, then times:
- `iscsimple status` and `status --json` (snapshot + render), in process;
- `iscsimple check-config` over every .cfg and the tab file;
- `iscsimple convert-config` (diff only) over every .cfg;
- one `iscsimple status` as a process (what an operator waits for, interpreter start included).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixturetree import FakeLun, FakeMember, write_iscsi_session, write_md_array

from iscsimple.cli.main import main
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import Attachment, Registry

TARGETS = 10


def build(root: Path, vms: int, per_vm: int) -> tuple[HostPaths, list[Path]]:
    sysfs, state, xen = root / "sys", root / "run", root / "xen"
    xen.mkdir(parents=True)
    (root / "lib").mkdir()  # the CLI refuses a --records directory that does not exist (a typo)
    paths = HostPaths(
        sysfs=sysfs,
        devfs=root / "dev",
        state=state,
        records=root / "lib",
        tab=root / "tab.conf",
        config=root / "cfg.toml",
    )
    registry = Registry(paths)
    disks = vms * per_vm
    luns: dict[int, list[FakeLun]] = {t: [] for t in range(TARGETS)}
    tab_lines, cfgs = [], []
    for i in range(disks):
        vm, target, lun = i // per_vm, i % TARGETS, i // TARGETS
        iqn = f"iqn.2001-04.com.example:storage{target}"
        label = f"vm{vm}-d{i % per_vm}"
        sd = f"sd{i}"
        luns[target].append(FakeLun(lun, sd, f"8:{i}"))
        write_md_array(
            sysfs,
            f"md_{label}",
            [
                FakeMember(f"dm-{i}", 0, "in_sync", dev=f"253:{i}"),
                FakeMember(sd, 1, "in_sync,write_mostly", dev=f"8:{i}"),
            ],
            minor=i,
        )
        registry.put(
            Attachment(
                id=f"vbd-{vm + 1}-{51712 + 16 * (i % per_vm)}",
                spec=f"lun{lun}@{iqn}+{label}",
                lun=lun,
                target=iqn,
                label=label,
                state="attached",
                iscsi_device=sd,
                local_device=f"/dev/vg0/{label}",
                local_kernel_name=f"dm-{i}",
                md_device=f"md_{label}",
                md_path=f"/dev/md/{label}",
                write_mostly_leg="iscsi",
                domain_id=vm + 1,
                domain_name=f"vm{vm}",
                vbd=f"xvd{chr(ord('a') + i % per_vm)}",
            )
        )
        tab_lines.append(f"{label} /dev/vg0/{label}\n")
        if i % per_vm == 0:
            cfgs.append(xen / f"vm{vm}.cfg")
            cfgs[-1].write_text(f"name = 'vm{vm}'\nmemory = 1024\ndisk = [\n")
        with open(cfgs[-1], "a") as f:
            f.write(f"    'iscsimple:lun{lun}@{iqn}+{label},xvd{chr(ord('a') + i % per_vm)},w',\n")
    for cfg in cfgs:
        with open(cfg, "a") as f:
            f.write("]\n")
    for t in range(TARGETS):
        write_iscsi_session(sysfs, t + 1, f"iqn.2001-04.com.example:storage{t}", luns[t], recovery_tmo=5)
    paths.tab.write_text("".join(tab_lines))
    return paths, cfgs


def timed(argv: list[str], repeat: int = 3) -> tuple[float, int, int]:
    best, code, size = float("inf"), 0, 0
    for _ in range(repeat):
        out, err = io.StringIO(), io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        best = min(best, time.perf_counter() - started)
        size = len(out.getvalue().splitlines()) + len(err.getvalue().splitlines())
    return best, code, size


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=500)
    parser.add_argument("--disks-per-vm", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="where to build the tree (default: /dev/shm if present)")
    args = parser.parse_args()
    base = args.dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    root = Path(tempfile.mkdtemp(prefix="iscsimple-bench-cli-", dir=base))
    try:
        started = time.perf_counter()
        paths, cfgs = build(root, args.vms, args.disks_per_vm)
        disks = args.vms * args.disks_per_vm
        print(
            f"built {disks} arrays, {len(cfgs)} domU configs in {time.perf_counter() - started:.1f} s under {root}"
        )
        common = [f"--path.sysfs={paths.sysfs}", f"--path.devfs={paths.devfs}", f"--state={paths.state}",
                  f"--records={paths.records}", f"--tab={paths.tab}", f"--config={paths.config}"]  # fmt: skip
        for name, argv in (
            ("status", ["status", *common]),
            ("status --json", ["status", "--json", *common]),
            ("check-config", ["check-config", *common, *map(str, cfgs)]),
            ("convert-config (diff)", ["convert-config", *map(str, cfgs)]),
        ):
            seconds, code, lines = timed(argv)
            print(f"{name:24s} {seconds * 1000:8.0f} ms  (exit {code}, {lines} lines of output, best of 3)")
        script = Path(sys.executable).parent / "iscsimple"
        if script.exists():
            started = time.perf_counter()
            result = subprocess.run(
                [str(script), "status", *common], capture_output=True, timeout=300, env=dict(os.environ)
            )
            print(
                f"{'iscsimple status (process)':24s} {(time.perf_counter() - started) * 1000:8.0f} ms  (exit {result.returncode})"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main_bench()
