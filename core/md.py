"""Reader of the md arrays in sysfs: /sys/block/<array>/md/ and its dev-<member>/ dirs.

This runs on every scrape for up to thousands of arrays, so it reads each small
attribute file once, lists only the directories it needs and never opens a
block device or runs a command. Attribute meanings: Documentation/admin-guide/md.rst.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from iscsimple.core.paths import HostPaths
from iscsimple.core.sysfs import AttrReader, SysfsError, open_dir, parse_dev, parse_int, read_bytes

__all__ = [
    "REDUNDANT_LEVELS",
    "MdArray",
    "MdMember",
    "MdReadResult",
    "SysfsError",
    "component_size_kib",
    "md_array_names",
    "md_kernel_names",
    "md_names_for",
    "md_path",
    "read_md_array",
    "read_md_array_errors",
    "read_md_arrays",
]

# Personalities with a sync_request method; only they have degraded, sync_action,
# sync_completed... (the kernel's md_redundancy_group).
REDUNDANT_LEVELS = frozenset({"raid1", "raid4", "raid5", "raid6", "raid10"})


@dataclass(frozen=True, slots=True)
class MdMember:
    name: str  # "sda", "loop1", "dm-3" (the dev-<name> directory)
    slot: int | None  # role in the array; None for "none" (spare or faulty)
    state: frozenset[str]  # flags of dev-*/state: in_sync, write_mostly, faulty, write_error, spare, ...
    errors: int | None  # corrected read errors
    dev: str | None  # "8:0"

    @property
    def in_sync(self) -> bool:
        return "in_sync" in self.state

    @property
    def write_mostly(self) -> bool:
        return "write_mostly" in self.state

    @property
    def faulty(self) -> bool:
        return "faulty" in self.state

    @property
    def spare(self) -> bool:
        return "spare" in self.state

    @property
    def blocked(self) -> bool:
        return "blocked" in self.state

    @property
    def write_error(self) -> bool:
        return "write_error" in self.state

    @property
    def replacement(self) -> bool:
        return "replacement" in self.state

    @property
    def recovering(self) -> bool:
        """Has a slot but is not in sync yet: data is being copied onto it."""
        return self.slot is not None and not self.in_sync and not self.faulty


@dataclass(frozen=True, slots=True)
class MdArray:
    """What the agent, the heal and the CLI use of an array. Only these attributes are read: a
    start-up reads every array of the host, and each file costs a syscall round trip (md's other
    attributes, e.g. metadata_version or component_size, are read where they are needed)."""

    name: str  # "md127", "md_data"
    level: str | None  # "raid1"; None if the file is missing or empty (inactive array)
    array_state: str | None  # clear, inactive, suspended, readonly, read-auto, clean, active, ...
    degraded: int | None  # number of missing/failed slots
    sync_action: str | None  # idle, resync, recover, check, repair, reshape, frozen
    sync_completed: tuple[int, int] | None  # (done, total) sectors; None for "none"/"delayed"
    # KiB/s of the running sync; None for "none", and not read while sync_action is idle or
    # frozen (md shows "none" then, and nothing uses a speed without a running sync).
    sync_speed_kib: int | None
    size_bytes: int | None  # /sys/block/<name>/size * 512
    members: tuple[MdMember, ...]
    sync_delayed: bool = False  # sync_completed says "delayed" (waiting for another array)
    # md/mismatch_cnt: sectors the last check (or repair) found different between the legs; md
    # resets it when such a pass starts. None where the kernel has no such file.
    mismatch_sectors: int | None = None

    def member(self, name: str) -> MdMember | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass
class MdReadResult:
    arrays: dict[str, MdArray] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def read_md_arrays(sysfs: Path) -> MdReadResult:
    """Every md array under sysfs/block. A broken array is reported in errors, never hides others."""
    names, errors = md_array_names(sysfs)
    result = MdReadResult(errors=errors)
    for name in names:
        array, array_errors = read_md_array_errors(sysfs, name)
        result.errors.extend(array_errors)
        if array is not None:
            result.arrays[name] = array
    return result


def md_array_names(sysfs: Path) -> tuple[list[str], list[str]]:
    """The kernel names under sysfs/block that may be md arrays, sorted, and listing errors."""
    block = os.path.join(sysfs, "block")
    try:
        return sorted(entry.name for entry in os.scandir(block) if entry.name.startswith("md")), []
    except FileNotFoundError:
        return [], []
    except OSError as e:
        return [], [f"{block}: cannot list: {e.strerror or e}"]


def read_md_array_errors(sysfs: Path, name: str) -> tuple[MdArray | None, list[str]]:
    """One array by kernel name and the problems reading it; None when it is not (any more) an array."""
    block = os.path.join(sysfs, "block")
    errors: list[str] = []
    try:
        return _read_array(block, name, errors), errors
    except _Gone:
        return None, []  # not an array (any more): stopped while we listed or read it
    except (OSError, ValueError) as e:  # never let one array hide the others
        return None, [f"{os.path.join(block, name, 'md')}: {e}"]


def read_md_array(sysfs: Path, name: str, errors: list[str] | None = None) -> MdArray:
    """One array by kernel name ("md127"). Raises SysfsError if it does not exist (any more).

    Problems with single attributes are appended to `errors` when given.
    """
    block = os.path.join(sysfs, "block")
    if "/" in name or name in ("", ".", "..") or not os.path.isdir(os.path.join(block, name, "md")):
        raise SysfsError(f"md array {name} not found in {block}")
    try:
        return _read_array(block, name, errors if errors is not None else [])
    except _Gone:
        raise SysfsError(f"md array {name} disappeared while being read") from None


class _Gone(Exception):
    pass


def _read_array(block: str, name: str, all_errors: list[str]) -> MdArray:
    disk_dir = f"{block}/{name}"  # f-strings, not os.path.join: this runs for every array
    md_dir = f"{disk_dir}/md"
    # Opening md/ tells an array from a plain disk or a stopped array, and every read after
    # that is relative to it.
    try:
        md_fd = open_dir(md_dir)
    except (FileNotFoundError, NotADirectoryError):
        raise _Gone from None
    try:
        return _read_array_at(md_fd, disk_dir, md_dir, name, all_errors)
    finally:
        os.close(md_fd)


def _read_array_at(md_fd: int, disk_dir: str, md_dir: str, name: str, all_errors: list[str]) -> MdArray:
    member_dirs = [entry for entry in os.listdir(md_fd) if entry.startswith("dev-")]
    errors: list[str] = []
    md = AttrReader(md_dir, errors, md_fd)
    disk = AttrReader(disk_dir, errors, md_fd, "../")

    level = md.text("level", required=True) or None
    redundant = level in REDUNDANT_LEVELS
    sync_action = md.text("sync_action", required=redundant)
    sync_completed_text = md.text("sync_completed", required=redundant, shared=False)
    sectors = disk.parsed("size", True, parse_int)
    array = MdArray(
        name=name,
        level=level,
        array_state=md.text("array_state", required=True),
        degraded=md.parsed("degraded", redundant, parse_int),
        sync_action=sync_action,
        sync_completed=_parse_sync_completed(sync_completed_text, md_dir, errors),
        sync_speed_kib=(
            md.parsed("sync_speed", redundant, parse_int) if sync_action not in _NOT_SYNCING else None
        ),
        size_bytes=sectors * 512 if sectors is not None else None,
        members=_read_members(md_fd, md_dir, member_dirs, errors),
        sync_delayed=sync_completed_text == "delayed",
        mismatch_sectors=md.parsed("mismatch_cnt", False, parse_int),
    )
    if errors and not os.path.isdir(md_dir):
        raise _Gone  # stopped while we read it: the missing files are no fault
    all_errors.extend(errors)
    return array


# sync_action values without a running sync (None: no such file, a level without sync).
_NOT_SYNCING = frozenset({None, "idle", "frozen"})


def _read_members(md_fd: int, md_dir: str, entries: list[str], errors: list[str]) -> tuple[MdMember, ...]:
    members = []
    for entry in entries:
        member_dir = f"{md_dir}/{entry}"
        member_errors: list[str] = []
        attrs = AttrReader(member_dir, member_errors, md_fd, entry + "/")
        state_text = attrs.text("state", required=True)
        member = MdMember(
            name=entry[4:],
            slot=attrs.parsed("slot", True, parse_int),
            state=_member_state(state_text or ""),
            errors=attrs.parsed("errors", True, parse_int),
            # dev-X/block links to the member's block device dir, whatever kind (disk,
            # partition, dm, loop), so one read gives its major:minor.
            dev=attrs.parsed("block/dev", False, parse_dev),
        )
        if member_errors and not os.path.isdir(member_dir):
            continue  # removed from the array (mdadm --remove) while we read it
        errors.extend(member_errors)
        members.append(member)
    members.sort(key=lambda m: (m.slot is None, m.slot or 0, m.name))
    return tuple(members)


_STATES: dict[str, frozenset[str]] = {}


def _member_state(text: str) -> frozenset[str]:
    """The flags of dev-*/state as a set, one shared set per distinct text (a handful occur)."""
    state = _STATES.get(text)
    if state is None:
        state = frozenset(filter(None, text.split(",")))
        if len(_STATES) < 256:  # a tree full of garbage must not grow it without bound
            _STATES[text] = state
    return state


def component_size_kib(sysfs: Path, name: str) -> int | None:
    """md/component_size of array NAME (KiB each member must hold); None when unknown."""
    try:
        return parse_int(
            read_bytes(os.path.join(sysfs, "block", name, "md", "component_size")).decode().strip()
        )
    except (OSError, ValueError):
        return None


def _parse_sync_completed(text: str | None, md_dir: str, errors: list[str]) -> tuple[int, int] | None:
    if text is None or text in ("none", "delayed"):
        return None
    done, sep, total = text.partition("/")
    try:
        if not sep:
            raise ValueError(text)
        return parse_int(done.strip()), parse_int(total.strip())
    except ValueError:
        errors.append(f"{os.path.join(md_dir, 'sync_completed')}: cannot parse {text[:80]!r}")
        return None


# -- which array is LABEL's ----------------------------------------------------------


def md_path(paths: HostPaths, label: str) -> Path:
    """/dev/md/LABEL: what mdadm --build is given and what udev (or mdadm) links to the array."""
    return paths.devfs / "md" / label


def md_names_for(paths: HostPaths, label: str) -> list[str]:
    """Kernel names LABEL's array may have, best first: the one /dev/md/LABEL points to (found even
    when the registry lacks it, e.g. a half-done add), then md_LABEL (mdadm with names=yes)."""
    names = []
    link = md_path(paths, label)
    if os.path.lexists(link):
        names.append(os.path.basename(os.path.realpath(link)))
    names.append(f"md_{label}")
    return list(dict.fromkeys(names))


def md_kernel_names(paths: HostPaths, label: str) -> list[str]:
    """The arrays that exist (in sysfs) under one of LABEL's names (`md_names_for`)."""
    return [n for n in md_names_for(paths, label) if (paths.sysfs / "block" / n / "md").is_dir()]
