"""Block devices as the hotplug sees them: the LUN's disk, the local leg, the md array.

Everything is read from sysfs, procfs and device nodes under HostPaths (stat only:
nothing here opens a block device, so it cannot hang on a dead iSCSI session).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from iscsimple.core.errors import OperationError
from iscsimple.core.files import read_file
from iscsimple.core.iscsi import IscsiSession, ScsiLun, read_iscsi_sessions
from iscsimple.core.md import SysfsError, md_kernel_names, md_path, read_md_array
from iscsimple.core.paths import HostPaths
from iscsimple.core.run import Deadline
from iscsimple.core.sysfs import block_holders, block_size_bytes

log = logging.getLogger(__name__)

POLL = 0.05
# md array states in which the array is not running (md.rst: array_state).
STOPPED_STATES = frozenset({"clear", "inactive"})


class DeviceError(OperationError):
    pass


@dataclass(frozen=True)
class BlockDevice:
    path: str  # what mdadm and Xen are given: "/dev/sda", "/dev/vg0/vm1", "/dev/md/vm1"
    name: str  # kernel name: "sda", "dm-3", "md127", "md_vm1"
    major: int
    minor: int
    size_bytes: int | None

    @property
    def dev(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def xen_physical_device(self) -> str:
        """xenstore `physical-device`: hex major:minor, as block-common.sh writes it (stat -c %t:%T)."""
        return f"{self.major:x}:{self.minor:x}"


def describe(path: str | Path, paths: HostPaths) -> BlockDevice:
    """The block device at `path` (symlinks followed); DeviceError if missing or not a block device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DeviceError(f"{path} does not exist") from None
    except OSError as e:
        raise DeviceError(f"cannot stat {path}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"{path} is not a block device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    name = kernel_name(paths, major, minor) or os.path.basename(os.path.realpath(path))
    return BlockDevice(str(path), name, major, minor, block_size_bytes(paths.sysfs, name))


def kernel_name(paths: HostPaths, major: int, minor: int) -> str | None:
    link = paths.sysfs / "dev" / "block" / f"{major}:{minor}"
    if not os.path.lexists(link):
        return None
    return os.path.basename(os.path.realpath(link))


def holders(paths: HostPaths, name: str) -> list[str]:
    try:
        return block_holders(paths.sysfs, name)
    except OSError as e:
        raise DeviceError(f"cannot tell whether {name} is in use: {e.strerror or e}") from None


def mount_points(paths: HostPaths, device: BlockDevice) -> list[str]:
    """Where the device is mounted, from mountinfo (field 3 is major:minor). DeviceError when it
    cannot be read: the local leg is overwritten, so "cannot tell" is never "not mounted"."""
    mountinfo = paths.procfs / "self" / "mountinfo"
    try:
        text = read_file(mountinfo).decode("utf-8", "replace")
    except OSError as e:
        raise DeviceError(
            f"cannot tell whether {device.path} is mounted: {mountinfo}: {e.strerror or e}"
        ) from None
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[2] == device.dev:
            found.append(fields[4])
    return found


def check_local_device(path: str, paths: HostPaths, min_size: int | None, where: str) -> BlockDevice:
    """The local leg may be overwritten: it must exist, be a block device, be unused and big enough."""
    try:
        device = describe(path, paths)
    except DeviceError as e:
        raise DeviceError(
            f"local device {e} ({where}); create it or fix the tab file (MISSING leaves the local leg out)"
        ) from None
    mounted = mount_points(paths, device)
    if mounted:
        raise DeviceError(
            f"local device {path} ({device.name}) is mounted on {', '.join(mounted)}; "
            "the mirror would overwrite it: unmount it or fix the tab file"
        )
    held = holders(paths, device.name)
    if held:
        raise DeviceError(
            f"local device {path} ({device.name}) is in use by {', '.join(held)}; "
            "a device can be the local leg of one mirror only: fix the tab file or stop the holder"
        )
    if min_size is not None and device.size_bytes is not None and device.size_bytes < min_size:
        raise DeviceError(
            f"local device {path} has {device.size_bytes} bytes, less than the iSCSI LUN's {min_size}; "
            f"grow it to at least {min_size} bytes ({min_size // (1024 * 1024)} MiB)"
        )
    return device


# -- the LUN's disk --------------------------------------------------------------


def target_sessions(paths: HostPaths, target: str) -> list[IscsiSession]:
    return [s for s in read_iscsi_sessions(paths.sysfs).sessions if s.target == target]


def by_path_links(paths: HostPaths, target: str, lun: int) -> list[Path]:
    """udev's /dev/disk/by-path/ip-ADDR:PORT-iscsi-IQN-lun-N links for this LUN."""
    directory = paths.devfs / "disk" / "by-path"
    suffix = f"-iscsi-{target}-lun-{lun}"
    try:
        return [directory / n for n in sorted(os.listdir(directory)) if n.endswith(suffix)]
    except OSError:
        return []


def wait_for_lun(
    paths: HostPaths,
    target: str,
    lun: int,
    wait: float,
    deadline: Deadline,
    on_stall=None,
) -> tuple[IscsiSession, BlockDevice]:
    """LUN `lun`'s disk on a logged-in session to `target`, waiting at most `wait` s.

    sysfs (session → target → lun → block) is the source; the by-path link, when udev
    made one, must agree. `on_stall()` is called once if nothing shows up within a
    second (to rescan a session that predates the LUN).
    """
    started = time.monotonic()
    end = started + min(wait, max(deadline.remaining(), 0))
    stalled = False
    last_problem = "no session"
    while True:
        sessions = target_sessions(paths, target)
        problem, found = _usable_lun(paths, sessions, lun)
        if found is not None:
            session, _lun, device = found
            mismatch = _by_path_mismatch(paths, target, lun, device)
            if mismatch is None:
                return session, device
            problem = mismatch  # udev may not have caught up yet: wait, refuse only at the end
        last_problem = problem
        now = time.monotonic()
        if on_stall is not None and not stalled and now - started > 1.0:
            stalled = True
            on_stall()
            now = time.monotonic()
        if now >= end:
            if found is not None:
                raise DeviceError(f"{last_problem}; refusing to guess which disk is the iSCSI copy")
            raise DeviceError(
                f"LUN {lun} of {target} did not show up within {now - started:.0f} s ({last_problem}); "
                "check that the LUN exists on the filer and is mapped to this host's initiator name"
            )
        time.sleep(POLL)


def _usable_lun(
    paths: HostPaths, sessions: list[IscsiSession], lun: int
) -> tuple[str, tuple[IscsiSession, ScsiLun, BlockDevice] | None]:
    if not sessions:
        return "no session to the target", None
    problem = ""
    for session in sorted(sessions, key=lambda s: s.state != "LOGGED_IN"):
        if session.state != "LOGGED_IN":
            problem = f"session {session.sid} is {session.state}"
            continue
        scsi_lun = session.lun(lun)
        if scsi_lun is None or scsi_lun.block is None:
            problem = f"session {session.sid} has no disk for LUN {lun}"
            continue
        node = paths.devfs / scsi_lun.block
        try:
            device = describe(node, paths)
        except DeviceError:
            problem = f"{node} is not there yet"
            continue
        if scsi_lun.dev and device.dev != scsi_lun.dev:
            problem = f"{node} is {device.dev}, sysfs says {scsi_lun.dev}"
            continue
        return "", (session, scsi_lun, device)
    return problem, None


def _by_path_mismatch(paths: HostPaths, target: str, lun: int, device: BlockDevice) -> str | None:
    """Why udev's by-path link disagrees with sysfs, or None (agrees, or no link: udev not running)."""
    for link in by_path_links(paths, target, lun):
        resolved = os.path.realpath(link)
        if not os.path.exists(resolved):
            continue  # dangling: the link of a disk that is gone, not yet removed by udev
        points_to = os.path.basename(resolved)
        if points_to != device.name:
            return f"sysfs says LUN {lun} of {target} is {device.name} but {link} points to {points_to}"
    return None


# -- md arrays ----------------------------------------------------------------------


UNKNOWN_STATE = "unknown"


def md_array_state(paths: HostPaths, name: str) -> str | None:
    """md/array_state of array NAME; None when there is no such array, UNKNOWN_STATE when it is
    there but its state cannot be read (never taken for stopped: an attach or resolve refuses,
    a remove tries to stop it)."""
    try:
        state = read_md_array(paths.sysfs, name).array_state
    except SysfsError:
        return None
    return UNKNOWN_STATE if state is None else state


def active_md_array(paths: HostPaths, label: str) -> str | None:
    """The kernel name of a running array for LABEL (or one whose state cannot be read), if any."""
    for name in md_kernel_names(paths, label):
        state = md_array_state(paths, name)
        if state is not None and state not in STOPPED_STATES:
            return name
    return None


def wait_for_md(paths: HostPaths, label: str, deadline: Deadline, wait: float = 5.0) -> BlockDevice:
    """The array mdadm just built, once /dev/md/LABEL (made by udev or mdadm) names it."""
    end = time.monotonic() + min(wait, max(deadline.remaining(), 0))
    path = md_path(paths, label)
    while True:
        try:
            device = describe(path, paths)
            if (paths.sysfs / "block" / device.name / "md").is_dir():
                return device
        except DeviceError:
            pass
        if time.monotonic() >= end:
            raise DeviceError(f"mdadm built the array but {path} did not appear; is udev running?")
        time.sleep(POLL)


def wait_for_md_gone(paths: HostPaths, name: str, deadline: Deadline, wait: float = 5.0) -> None:
    """Give the kernel a moment to delete a stopped md node.

    md removes /sys/block/mdN from a workqueue after STOP_ARRAY returns; an add
    right behind a remove (a migration back) must not meet the dying node.
    A node still there after `wait` is only logged: the array itself is stopped.
    """
    node = paths.sysfs / "block" / name
    end = time.monotonic() + min(wait, max(deadline.remaining(), 0))
    while os.path.lexists(node):
        if time.monotonic() >= end:
            log.info("%s is stopped but its node is still listed; the kernel removes it later", name)
            return
        time.sleep(POLL)
