"""Turn one captured kernel state into a fake root that the readers can walk.

The captures in ../shared/fixtures/kernel-6.1-raid1-iscsi/NN_*/ hold the real
sysfs files but not the symlinks. They are recreated here as the kernel lays them
out, all relative:

- every directory's `.ls-la` (an `ls -la` of it) lists its links (`rd0 -> dev-loop1`,
  `dev-sda/block -> ../../../../../platform/host0/.../block/sda`, `device -> ...`);
- `class_links.txt` lists the class links (`/sys/class/iscsi_session/session1 -> ...`,
  `/sys/block/sda -> ...`);
- a captured `sys/block/mdX` directory is really `sys/devices/virtual/block/mdX`
  (its `subsystem -> ../../../../class/block` says so) and is moved there;
- block device directories that links point at but were not captured (`.../block/sda`,
  `virtual/block/loop1`) are created with `dev`, `size` and `uevent` from
  `proc_partitions` when the state has one.

`proc_mdstat` becomes `proc/mdstat`, `proc_partitions` `proc/partitions`, and the
`dev_links.txt` listing becomes links under `dev/` (their targets, device nodes,
are not created: nothing in the tests may open a block device).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
KERNEL_CAPTURES = SHARED_FIXTURES / "kernel-6.1-raid1-iscsi"
STATES = tuple(sorted(p.name for p in KERNEL_CAPTURES.iterdir() if p.is_dir() and p.name[:2].isdigit()))

_LS_LINK = re.compile(r"^l\S*\s+\d+\s+\S+\s+\S+\s+\d+\s+\S+\s+\d+\s+\S+\s+(?P<name>.+?) -> (?P<target>.+)$")
_CLASS_LINK = re.compile(r"^(?P<link>/sys/\S+) -> (?P<target>/sys/\S+)$")


def state_dir(state: str | Path) -> Path:
    """A capture directory from its name ("06_outage_after_io_leg_faulty"), a unique prefix ("06") or a path."""
    if isinstance(state, Path) or "/" in str(state):
        return Path(state)
    matches = [name for name in STATES if name == state or name.startswith(state)]
    if len(matches) != 1:
        raise ValueError(f"no unique captured state {state!r} in {KERNEL_CAPTURES}: {matches}")
    return KERNEL_CAPTURES / matches[0]


def materialize(state: str | Path, dest: Path) -> Path:
    """Copy one captured state into dest as a fake root (dest/sys, dest/proc, dest/dev); returns dest."""
    src = state_dir(state)
    dest.mkdir(parents=True, exist_ok=True)
    sys_dir = dest / "sys"
    partitions = _read_partitions(src / "proc_partitions")

    if (src / "sys").is_dir():
        shutil.copytree(src / "sys", sys_dir, symlinks=True)
    else:
        sys_dir.mkdir()
    _move_virtual_block_devices(sys_dir)
    _recreate_listed_links(sys_dir, partitions)
    _recreate_class_links(src / "class_links.txt", dest, partitions)
    _add_missing_block_devices(sys_dir, partitions)

    proc = dest / "proc"
    proc.mkdir(exist_ok=True)
    for captured, name in (("proc_mdstat", "mdstat"), ("proc_partitions", "partitions")):
        if (src / captured).is_file():
            shutil.copyfile(src / captured, proc / name)
    _recreate_dev_links(src / "dev_links.txt", dest / "dev")
    return dest


def _read_partitions(path: Path) -> dict[str, tuple[str, int]]:
    """name -> ("major:minor", size in 1 KiB blocks) from a /proc/partitions capture."""
    result = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) == 4 and fields[0].isdigit():
                result[fields[3]] = (f"{fields[0]}:{fields[1]}", int(fields[2]))
    return result


def _move_virtual_block_devices(sys_dir: Path) -> None:
    block = sys_dir / "block"
    if not block.is_dir():
        return
    virtual = sys_dir / "devices" / "virtual" / "block"
    for entry in sorted(block.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            virtual.mkdir(parents=True, exist_ok=True)
            entry.rename(virtual / entry.name)
            entry.symlink_to(os.path.relpath(virtual / entry.name, block))


def _recreate_listed_links(sys_dir: Path, partitions: dict[str, tuple[str, int]]) -> None:
    listings = sorted(sys_dir.rglob(".ls-la"))
    for listing in listings:
        directory = listing.parent
        for line in listing.read_text().splitlines():
            m = _LS_LINK.match(line)
            if m is None:
                continue
            link = directory / m["name"]
            if not link.exists() and not link.is_symlink():
                link.symlink_to(m["target"])
        listing.unlink()
    # Second pass, once every link exists: create the block device dirs links point at.
    for link in sys_dir.rglob("*"):
        if link.is_symlink() and not link.exists():
            target = Path(os.path.normpath(link.parent / os.readlink(link)))
            if target.parent.name == "block" and target.name in partitions:
                _make_block_device(target, partitions)


def _recreate_class_links(listing: Path, dest: Path, partitions: dict[str, tuple[str, int]]) -> None:
    if not listing.is_file():
        return
    for line in listing.read_text().splitlines():
        m = _CLASS_LINK.match(line.strip())
        if m is None or "*" in line:  # "/sys/class/iscsi_session/* -> ..." = nothing was there
            continue
        link = dest / m["link"].lstrip("/")
        target = dest / m["target"].lstrip("/")
        if link.exists():
            continue  # reachable already, e.g. through a recreated `device` link
        if not target.exists():
            if target.parent.name == "block":
                _make_block_device(target, partitions)
            else:
                target.mkdir(parents=True)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, os.path.realpath(link.parent)))


def _make_block_device(directory: Path, partitions: dict[str, tuple[str, int]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if directory.name not in partitions:
        return
    dev, kib = partitions[directory.name]
    major, minor = dev.split(":")
    (directory / "dev").write_text(dev + "\n")
    (directory / "size").write_text(f"{kib * 2}\n")
    (directory / "uevent").write_text(
        f"MAJOR={major}\nMINOR={minor}\nDEVNAME={directory.name}\nDEVTYPE=disk\n"
    )


def _add_missing_block_devices(sys_dir: Path, partitions: dict[str, tuple[str, int]]) -> None:
    """Every disk of /proc/partitions gets /sys/block/X and /sys/class/block/X, as in the kernel."""
    block = sys_dir / "block"
    class_block = sys_dir / "class" / "block"
    for name in partitions:
        if not (block / name).exists():
            real = sys_dir / "devices" / "virtual" / "block" / name
            if not real.exists():
                _make_block_device(real, partitions)
            block.mkdir(parents=True, exist_ok=True)
            if (block / name).is_symlink():
                (block / name).unlink()
            (block / name).symlink_to(os.path.relpath(real, block))
    if block.is_dir():
        for entry in block.iterdir():
            if not (class_block / entry.name).exists():
                class_block.mkdir(parents=True, exist_ok=True)
                real = Path(os.path.realpath(entry))
                (class_block / entry.name).symlink_to(os.path.relpath(real, class_block))


def _recreate_dev_links(listing: Path, dev: Path) -> None:
    if not listing.is_file():
        return
    directory: Path | None = None
    for line in listing.read_text().splitlines():
        if line.startswith("/dev/") and line.endswith(":"):
            directory = dev / line[len("/dev/") : -1]
            directory.mkdir(parents=True, exist_ok=True)
        elif directory is not None and (m := _LS_LINK.match(line)):
            link = directory / m["name"]
            if not link.is_symlink():
                link.symlink_to(m["target"])
