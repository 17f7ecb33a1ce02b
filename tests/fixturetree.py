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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from iscsimple.exporter.sysfstree import LunFiles, MemberFiles, SysfsTree

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
KERNEL_CAPTURES = SHARED_FIXTURES / "kernel-6.1-raid1-iscsi"
# Empty when the captures are not next to the repo: test_fixturetree then fails and says where it looked
# (failing the import here would take every other test down with it).
STATES = tuple(
    sorted(p.name for p in KERNEL_CAPTURES.iterdir() if p.is_dir() and p.name[:2].isdigit())
    if KERNEL_CAPTURES.is_dir()
    else ()
)

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


# --- generated trees ---------------------------------------------------------------------------
# Small builders for sysfs trees the captures do not cover (many arrays, odd states).
# They lay files and links out like the kernel does, so readers cannot tell them apart.


@dataclass(frozen=True)
class FakeMember:
    name: str  # "sda", "loop1", "dm-3"
    slot: int | None = 0
    state: str = "in_sync"
    errors: int = 0
    recovery_start: int | None = None
    dev: str | None = "8:0"  # None: no dev-X/block link (the device vanished)


def write_md_array(
    sysfs: Path,
    name: str,
    members: Sequence[FakeMember] = (),
    *,
    minor: int = 127,
    level: str = "raid1",
    array_state: str = "clean",
    metadata_version: str = "none",
    raid_disks: str | int = 2,
    degraded: int | None = 0,
    sync_action: str = "idle",
    last_sync_action: str = "none",
    sync_completed: str = "none",
    sync_speed: str = "none",
    component_size: int = 65536,
) -> Path:
    """An md array at sysfs/devices/virtual/block/<name>, linked from sysfs/block; returns its md/ dir."""
    tree = SysfsTree(sysfs)
    if (sysfs / "devices" / "virtual" / "block" / name / "md").exists():
        raise FileExistsError(f"{name} is written already")
    attrs = {
        "level": level,
        "array_state": array_state,
        "metadata_version": metadata_version,
        "raid_disks": str(raid_disks),
        "component_size": str(component_size),
    }
    if level in ("raid1", "raid4", "raid5", "raid6", "raid10"):  # the kernel's md_redundancy_group
        attrs |= {
            "sync_action": sync_action,
            "last_sync_action": last_sync_action,
            "sync_completed": sync_completed,
            "sync_speed": sync_speed,
        }
        if degraded is not None:
            attrs["degraded"] = str(degraded)
    files = []
    for member in members:
        device = None
        if member.dev is not None:
            device = f"devices/virtual/block/{member.name}"
            tree.attrs(device, {"dev": member.dev})
        files.append(
            MemberFiles(
                member.name, member.state, member.slot, member.errors, member.recovery_start, device=device
            )
        )
    md = tree.md_array(
        name, {"dev": f"9:{minor}", "size": str(component_size * 2)}, attrs, files, slaves=False
    )
    return sysfs / md


@dataclass(frozen=True)
class FakeLun:
    lun: int
    block: str | None = "sda"  # None: the SCSI device has no disk (yet)
    dev: str | None = "8:0"
    state: str = "running"


def write_iscsi_session(
    sysfs: Path,
    sid: int,
    target: str,
    luns: Sequence[FakeLun] = (),
    *,
    host: int | None = None,
    tpgt: int = 1,
    state: str = "LOGGED_IN",
    recovery_tmo: int = 120,
    address: str = "192.0.2.10",
    port: int = 3260,
    connection_state: str = "up",
) -> Path:
    """An iscsi_tcp session as the kernel shows it; returns the session device dir."""
    host = sid - 1 if host is None else host
    if (sysfs / "devices" / "platform" / f"host{host}" / f"session{sid}").exists():
        raise FileExistsError(f"session{sid} is written already")
    session = SysfsTree(sysfs).iscsi_session(
        host,
        sid,
        {
            "targetname": target,
            "tpgt": str(tpgt),
            "state": state,
            "recovery_tmo": str(recovery_tmo),
            "target_state": "SCANNED",
        },
        {"persistent_address": address, "persistent_port": str(port), "state": connection_state},
        [
            LunFiles(
                lun.lun, {"state": lun.state}, lun.block, {"dev": lun.dev} if lun.dev is not None else {}
            )
            for lun in luns
        ],
    )
    return sysfs / session


# The mirror in the captures: LUN 1 of this target (sda) mirrored onto /dev/loop1 as md127.
CAPTURE_TARGET = "iqn.2026-11.test.local:disk1"
CAPTURE_PORTAL = "127.0.0.1:3260"


def register_capture_array(root: Path, *, state: Path | None = None, **overrides):
    """Write the registry entry the hotplug would have written for the captured mirror.

    Returns HostPaths over the materialised root (registry under `state`, default root/run);
    `overrides` change fields of the Attachment (e.g. to describe a MISSING leg).
    """
    from iscsimple.core.paths import HostPaths
    from iscsimple.core.registry import Attachment, Registry

    paths = HostPaths(
        procfs=root / "proc",
        sysfs=root / "sys",
        devfs=root / "dev",
        state=state or root / "run",
        records=root / "lib",
    )
    fields = dict(
        id="vbd-1-51712",
        spec=f"lun1@{CAPTURE_TARGET}+test",
        lun=1,
        target=CAPTURE_TARGET,
        label="test",
        state="attached",
        portal=CAPTURE_PORTAL,
        iscsi_device="sda",
        local_device="/dev/loop1",
        local_kernel_name="loop1",
        md_device="md127",
        md_path="/dev/md/test",
        write_mostly_leg="iscsi",
        domain_id=1,
        domain_name="web1",
        vbd="xvda",
    )
    fields.update(overrides)
    Registry(paths).put(Attachment(**fields))
    return paths
