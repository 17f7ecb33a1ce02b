"""Where the write-intent bitmap files live: a small ext4 in RAM (zram), made by the first build of a boot.

Why RAM: before md writes to a chunk whose bit is clear, it sets the bit and waits for the bitmap
page to be written. A random writer lands in a clean chunk almost every time, so on a local disk the
bitmap costs one more synchronous disk write per VM write (README, "Writer cost of the bitmap"). In
RAM the page write is a memory copy.

Why that is safe: a bitmap file serves only the array instance it was built with, in the boot it was
built in (`core.bitmap.prove_partial` checks the boot id, the array instance and the file's identity
before any partial heal). After a reboot every mirror is built afresh and heals in full. So nothing
in the file has to outlive the boot, and RAM does not outlive it.

Why zram and not tmpfs: md maps a bitmap file's blocks with bmap() and writes them to the block
device itself, and tmpfs has no blocks. zram keeps pages that hold one repeated byte at no cost, and
a clean bitmap is zeros, so the device's nominal size costs only its page table (24 bytes per 4 KiB
page: 1.5 MiB for RAM_STORE_BYTES).

A bitmaps directory that is already a mount point (an operator's choice, or an earlier build this
boot) is used as it is. When the RAM store cannot be made (no zram module, a command fails),
everything made is undone, the files stay on the records directory's filesystem, and that is said
once per boot.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from . import bootmemo
from .files import MAX_INPUT_BYTES, read_file
from .locking import hotplug_lock
from .paths import HostPaths
from .run import CommandError, Deadline, run
from .sysfs import write_attr

log = logging.getLogger(__name__)

# Bitmap files take one bit per chunk: 256 MiB holds the files of 128 TiB of mirrors at 64 KiB chunks
# (a 100 GiB mirror's file is 200 KiB), and at least 4 KiB per mirror.
RAM_STORE_BYTES = 256 << 20
LOCK_NAME = "iscsimple-bitmap-store"
FAILURE_FILE = "bitmap-store.json"
# What the store's filesystem is made with: 4 KiB blocks (md writes whole pages); no journal and no
# reserved blocks (md writes the file's blocks in place, past the filesystem: nothing to journal).
MKFS_ARGV = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-O", "^has_journal", "-L", "iscsimple-bmp"]
MOUNT_OPTIONS = "nodev,nosuid,noexec,noatime"
COMMAND_TIMEOUT = 15.0
UNDO_TIMEOUT = 5.0  # unmounting a filesystem nothing uses yet


class StoreError(Exception):
    """The RAM store could not be made; the message says which step and why."""


@dataclass(frozen=True)
class Store:
    directory: Path
    mounted: bool  # the directory is a mount point: the RAM store, or a filesystem put there on purpose
    description: str  # what backs it, or why not RAM


def bitmap_dir(paths: HostPaths) -> Path:
    return paths.records / "bitmaps"


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str


def visible_mount(paths: HostPaths, directory: Path) -> Mount | None:
    """The mount a path lookup of `directory` lands on: of the mounts at the directory or above it,
    the last in /proc/self/mountinfo (mount order), since a later mount at an ancestor hides the
    earlier ones below it (a hidden mount is still listed)."""
    try:
        text = read_file(paths.procfs / "self" / "mountinfo", max_bytes=MAX_INPUT_BYTES)
    except OSError:
        return None
    target = os.path.realpath(directory)
    found = None
    for line in text.decode("utf-8", "replace").splitlines():
        fields = line.split()  # ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
        if "-" not in fields[5:]:
            continue
        dash = fields.index("-", 5)
        if len(fields) < dash + 3:
            continue
        point = _unescape(fields[4])
        if target == point or target.startswith(point.rstrip("/") + "/"):
            found = Mount(point, fields[dash + 1], _unescape(fields[dash + 2]))
    return found


def mount_at(paths: HostPaths, directory: Path) -> Mount | None:
    """What is mounted at `directory` itself, if that mount is the visible one."""
    mount = visible_mount(paths, directory)
    return mount if mount is not None and mount.point == os.path.realpath(directory) else None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def ensure(paths: HostPaths, deadline: Deadline, command=run, retry: bool = False) -> Store:
    """The bitmaps directory, on the RAM store when it is (or can now be) there. Never raises for
    the store itself: the caller builds with a bitmap on whatever filesystem the directory is on.
    A failure is remembered for the boot; `retry` tries again all the same."""
    directory = bitmap_dir(paths)
    mounted = mount_at(paths, directory)
    if mounted:
        return _found(directory, mounted)
    with hotplug_lock(paths.locks, LOCK_NAME, deadline):
        mounted = mount_at(paths, directory)  # another build may have made it meanwhile
        if mounted:
            return _found(directory, mounted)
        memo = None if retry else bootmemo.recall(paths, FAILURE_FILE)
        failure = str(memo.get("reason", ""))[:300] if memo else None
        if failure is not None:
            return Store(directory, False, failure)
        started = time.monotonic()
        try:
            device = make_ram_store(paths, directory, deadline, command)
        except StoreError as e:
            reason = f"no RAM store for bitmap files ({e})"
            log.warning("%s: they stay in %s, and md writes them to disk before each write to a clean chunk",
                        reason, directory)  # fmt: skip
            bootmemo.remember(paths, FAILURE_FILE, {"reason": reason})
            return Store(directory, False, reason)
        log.info("bitmap files in RAM: ext4 on %s at %s (made in %.1f s)", device, directory,
                 time.monotonic() - started)  # fmt: skip
        return Store(directory, True, f"ext4 on {device}")


def _found(directory: Path, mount: Mount) -> Store:
    return Store(directory, True, f"{mount.fstype} on {mount.source}")


def make_ram_store(paths: HostPaths, directory: Path, deadline: Deadline, command=run) -> str:
    """A zram device with ext4 mounted at `directory` (mode 0700); its /dev path. On failure, undone."""
    control = paths.sysfs / "class" / "zram-control"
    if not control.is_dir():
        _step(command, ["modprobe", "zram", "num_devices=0"], deadline, "load the zram module")
        if not control.is_dir():
            raise StoreError(f"the zram module has no {control}")
    try:
        index = read_file(control / "hot_add", max_bytes=64).decode("ascii", "replace").strip()
    except OSError as e:
        raise StoreError(f"cannot add a zram device: {e.strerror or e}") from None
    if not index.isdecimal():
        raise StoreError(f"{control / 'hot_add'} gave {index[:40]!r}, not a device number")
    name = f"zram{int(index)}"
    device = paths.devfs / name
    mounted = False
    try:
        try:
            write_attr(paths.sysfs / "block" / name / "disksize", str(RAM_STORE_BYTES))
            st = os.stat(device)
        except OSError as e:
            raise StoreError(f"cannot size {device}: {e.strerror or e}") from None
        if not stat.S_ISBLK(st.st_mode):
            raise StoreError(f"{device} is not a block device")
        _step(command, [*MKFS_ARGV, str(device)], deadline, f"make a filesystem on {device}")
        _make_mount_point(paths, directory)
        _step(command, ["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(device), str(directory)], deadline,
              f"mount {device} at {directory}")  # fmt: skip
        mounted = True
        try:
            os.chmod(directory, 0o700)  # the new filesystem's root: as private as the records
        except OSError as e:
            raise StoreError(f"cannot restrict {directory}: {e.strerror or e}") from None
        return str(device)
    except BaseException:  # a spent deadline too: undo, whatever is left of the budget
        _undo(paths, name, directory if mounted else None, command)
        raise


def _make_mount_point(paths: HostPaths, directory: Path) -> None:
    """`directory`, empty: files left there by arrays of an earlier boot go (they serve nothing now)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
    except OSError as e:
        raise StoreError(f"cannot make {directory}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):  # never mount over what a symlink points at
        raise StoreError(f"{directory} is not a directory")
    try:
        leftovers = list(os.scandir(directory))
    except OSError as e:
        raise StoreError(f"cannot list {directory}: {e.strerror or e}") from None
    if not leftovers:
        return
    try:
        mdstat = read_file(paths.procfs / "mdstat").decode("utf-8", "replace")
    except OSError as e:
        raise StoreError(
            f"{directory} is not empty and /proc/mdstat cannot be read: {e.strerror or e}"
        ) from None
    if f"{directory}/" in mdstat:  # a running array's file there: hiding it would cost its partial heal
        raise StoreError(f"running arrays keep their bitmap files in {directory}")
    for entry in leftovers:
        try:
            if not entry.is_file(follow_symlinks=False):
                raise StoreError(f"{entry.path} is not a bitmap file left by an earlier boot")
            os.unlink(entry.path)
        except OSError as e:
            raise StoreError(f"cannot remove {entry.path}: {e.strerror or e}") from None


def _undo(paths: HostPaths, name: str, mounted_at: Path | None, command) -> None:
    if mounted_at is not None:
        try:
            command(["umount", str(mounted_at)], timeout=UNDO_TIMEOUT)
        except (CommandError, OSError) as e:
            log.error("cannot unmount %s again: %s", mounted_at, e)
            return  # a device still mounted must not be reset under its filesystem
    for attr, value in ((paths.sysfs / "block" / name / "reset", "1"),
                        (paths.sysfs / "class" / "zram-control" / "hot_remove", name.removeprefix("zram"))):  # fmt: skip
        try:
            write_attr(attr, value)
        except OSError as e:
            log.error("cannot release %s (%s): %s", name, attr, e.strerror or e)
            return


def _step(command, argv: list[str], deadline: Deadline, what: str) -> None:
    try:
        command(argv, timeout=COMMAND_TIMEOUT, deadline=deadline)
    except CommandError as e:  # CommandTimeout is one
        detail = (e.stderr or "").strip().splitlines()
        raise StoreError(f"cannot {what}: {detail[-1] if detail else e}") from None
