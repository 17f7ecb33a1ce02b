"""Data-safety decisions on one ArrayView: is the iSCSI copy stale, may a heal run, is it done.

Pure functions over the snapshot (plus a fresh sysfs look-up for the heal's
device), shared by the agent (detector, healer), the hotplug `remove` (which
records a stale copy when the agent is not running) and `iscsimple resolve`.

The danger they guard against: once md fails the iSCSI leg of a running mirror,
every later write lands on the local leg only. Building the array from the
iSCSI copy again (the normal attach) would overwrite those writes silently.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .iscsi import IscsiSession, ScsiLun, find_lun_block, read_iscsi_sessions
from .md import MdReadResult, SysfsError, component_size_kib, md_kernel_names, read_md_array
from .paths import HostPaths
from .registry import Attachment
from .snapshot import ArrayView, HostSnapshot
from .stale import StaleRecord, StaleRecords
from .sysfs import block_holders, block_size_bytes

if TYPE_CHECKING:  # at run time only where the log is read: hotplug starts need no bitmap code
    from .bitmap import KernelLog

# iSCSI leg states in which the iSCSI copy lacks writes the local leg has:
# failed by md, gone from the array, or being (re)written from the local leg.
STALE_ISCSI_STATES = frozenset({"faulty", "missing", "recovering", "spare"})
# iSCSI leg states a heal starts from (recovering/spare: a heal already runs).
HEALABLE_ISCSI_STATES = frozenset({"faulty", "missing"})


def stale_reason(view: ArrayView) -> str | None:
    """Why the iSCSI copy of this running array is stale, or None if it is not.

    Stale means: the array runs, its iSCSI leg was configured, md no longer
    writes to that leg (faulty, removed, or being rebuilt), the local leg is in
    sync and md counts the array degraded. A local leg that is itself recovering
    (the initial copy from iSCSI at attach, or a pygrub attach/detach during it)
    means the iSCSI copy is the good one: never stale then.
    """
    md = view.md
    # An array_state that cannot be read (None) is no proof the array stopped: its members decide.
    if md is None or md.array_state in ("clear", "inactive"):
        return None
    if not view.iscsi.configured or view.local.state != "in_sync":
        return None
    if view.iscsi.state not in STALE_ISCSI_STATES:
        return None
    # A healthy 2-leg mirror whose iSCSI member we could not name is not degraded:
    # md's own count keeps a misidentified member from looking like a stale copy.
    if md.degraded is not None and md.degraded < 1:
        return None
    device = view.iscsi.device or "the iSCSI device"
    return {
        "faulty": f"md marked the iSCSI leg {device} faulty while {md.name} ran",
        "missing": f"the iSCSI leg is gone from the running array {md.name}",
        "recovering": f"the iSCSI leg {device} of {md.name} is being rewritten from the local leg",
        "spare": f"the iSCSI leg {device} of {md.name} waits to be rewritten from the local leg",
    }[view.iscsi.state]


def stale_record(
    view: ArrayView,
    now: float | None = None,
    *,
    paths: HostPaths | None = None,
    seen_by: str = "the agent",
    failure_log: Callable[[], KernelLog | None] | None = None,
) -> StaleRecord | None:
    """The record to write for this array, or None when its iSCSI copy is not stale.

    `since` is the earliest evidence: with `paths`, the kernel log's line of md failing the
    iSCSI leg (or, if the ring buffer lost it, of the leg's session failing), else `now`, when
    `seen_by` saw it. `since_source` says which. `failure_log`: the kernel log's failure lines
    read once for many arrays (`failure_lines`), instead of reading the log for this one.
    """
    reason = stale_reason(view)
    if reason is None:
        return None
    a = view.attachment
    since, source = (time.time() if now is None else now), f"first seen by {seen_by}"
    evidence = fault_evidence(paths, view, failure_log) if paths is not None else None
    if evidence is not None and evidence[0] < since:
        since, source = evidence
    return StaleRecord(
        label=view.label,
        since=since,
        since_source=source,
        md_device=view.md.name if view.md else a.md_device,
        domain_name=a.domain_name,
        domain_id=a.domain_id,
        target=a.target,
        lun=a.lun,
        iscsi_device=view.iscsi.device or a.iscsi_device,
        local_device=a.local_device,
        reason=reason,
    )


def failure_lines(klog: KernelLog | None) -> KernelLog | None:
    """The records of `klog` that fault_evidence can use: both of its patterns need one of
    these words, and a log of thousands of lines usually holds a handful of them."""
    if klog is None or len(klog.usecs) != len(klog.messages):
        return klog
    kept = [
        (message, usec)
        for message, usec in zip(klog.messages, klog.usecs, strict=True)
        if "Disk failure on" in message[1] or "detected conn error" in message[1]
    ]
    return replace(klog, messages=tuple(m for m, _ in kept), usecs=tuple(u for _, u in kept))


def fault_evidence(
    paths: HostPaths, view: ArrayView, failure_log: Callable[[], KernelLog | None] | None = None
) -> tuple[float, str] | None:
    """When the kernel log says the iSCSI leg failed: md's own line (`md/raid1:MD: Disk failure
    on DEV`, the moment writes began to reach the local leg alone), else the last failure of the
    leg's session (`connectionSID:0: detected conn error`, earlier: writes queued from then on
    ended on the local leg). md keeps no time of a member's state change; the kernel log does,
    while its ring buffer still holds the line. Wall time and the source in words, or None."""
    from .bitmap import read_kernel_log  # the one /dev/kmsg reader

    klog = failure_log() if failure_log is not None else read_kernel_log(paths)
    if klog is None or len(klog.usecs) != len(klog.messages) or view.md is None:
        return None
    device = view.iscsi.device or view.attachment.iscsi_device
    md_line = re.compile(rf"md/raid1:{re.escape(view.md.name)}: Disk failure on {re.escape(device or '')}\b")
    session_line = (
        re.compile(rf"connection{view.session.sid}:0: detected conn error")
        if view.session is not None
        else None
    )
    found: dict[str, tuple[int, str]] = {}
    for (_, text), usec in zip(klog.messages, klog.usecs, strict=True):
        if device and md_line.search(text):
            found["md"] = (usec, text)  # the last one: an earlier failure was healed since
        elif session_line is not None and session_line.search(text):
            found["session"] = (usec, text)
    chosen = found.get("md") or found.get("session")
    if chosen is None:
        return None
    usec, text = chosen
    since_boot = time.clock_gettime(time.CLOCK_MONOTONIC)
    if usec / 1e6 > since_boot:  # not this boot's kernel log (a file given as devfs/kmsg)
        return None
    wall = time.time() - (since_boot - usec / 1e6)
    return wall, f"kernel log: {text.strip()}"


def read_view(paths: HostPaths, attachment: Attachment, md_name: str | None = None) -> ArrayView | None:
    """The ArrayView of one attachment read now: its md array (kernel name `md_name`, else the
    registry's, else /dev/md/LABEL's target) and the iSCSI sessions — cheap with 1000 arrays.
    None when the attachment has no LABEL; `view.md` is None when the array does not run."""
    if attachment.label is None:
        return None
    name = md_name or attachment.md_device or next(iter(md_kernel_names(paths, attachment.label)), None)
    arrays = {}
    if name is not None:
        with contextlib.suppress(SysfsError):  # not running
            arrays[name] = read_md_array(paths.sysfs, name)
    one = replace(attachment, md_device=name)
    snapshot = HostSnapshot.build(
        [one], MdReadResult(arrays), read_iscsi_sessions(paths.sysfs), [], paths=paths
    )
    return snapshot.array(attachment.label)


def record_if_stale(paths: HostPaths, attachment: Attachment, md_name: str | None) -> StaleRecord | None:
    """Look at one attachment's running array now; if its iSCSI copy is stale, write the record.

    For the hotplug `remove`, just before it stops the array: the agent may not be
    running, and once the array is stopped nobody can tell any more which copy is
    newer. Reads only this array and the iSCSI sessions (cheap with 1000 arrays).
    Returns the record standing afterwards (an existing one is kept), or None.
    """
    if attachment.label is None or md_name is None:
        return None
    records = StaleRecords(paths)
    view = read_view(paths, attachment, md_name)
    record = stale_record(view, paths=paths, seen_by="the hotplug remove") if view is not None else None
    if record is not None:
        records.put(record)
    return records.get(attachment.label)


def recovery_complete(view: ArrayView) -> bool:
    """Both legs hold the same data again: the stale record may be cleared.

    The iSCSI leg is in sync in md (the heal's copy local → iSCSI finished), the
    local leg too, md counts nothing degraded and no resync/recovery runs.
    """
    md = view.md
    return (
        md is not None
        and view.iscsi.state == "in_sync"
        and view.local.state == "in_sync"
        and md.degraded == 0
        and (md.sync_action or "idle") == "idle"
    )


@dataclass(frozen=True)
class HealPlan:
    """What a heal does to one array, decided from a fresh look at the LUN."""

    label: str
    md_path: str  # what mdadm is given, e.g. /dev/md/LABEL
    md_device: str  # kernel name, e.g. md127
    remove: str | None  # kernel name of the old iSCSI member to fail and remove; None: already gone
    add: str  # kernel name of the LUN's device now, e.g. sdb
    add_dev: str  # its major:minor per sysfs
    add_path: str  # its node under devfs, what mdadm opens: /dev/sdb
    target: str
    lun: int
    session: str  # e.g. session3
    renamed: bool  # the LUN came back under another name than the member md knew
    # "full": md forgets the leg and copies the whole disk. "partial": re-added in its old slot,
    # md copies the chunks its write-intent bitmap marks (only when core.bitmap proved it safe).
    mode: str = "full"
    route_reason: str = ""  # why this mode (the proof, or the obligation that failed)

    def replan(self, view: ArrayView, sysfs: Path, devfs: Path) -> HealPlan | HealBlocked:
        """The same decision taken again on a fresh view (the executor, under the label's lock)."""
        return plan_heal(view, sysfs, devfs)

    def commands(self) -> list[list[str]]:
        """mdadm calls in order. A kernel member name (not a /dev path) lets mdadm fail and remove
        a member whose device node is gone (it looks it up as md/dev-NAME)."""
        argv = []
        keep_member = self.mode == "partial" and self.remove == self.add
        if self.remove is not None and not keep_member:
            argv.append(["mdadm", self.md_path, "--fail", self.remove])
            argv.append(["mdadm", self.md_path, "--remove", self.remove])
        if self.mode == "partial":
            # mdadm 4.2 on an array without a superblock: `re-add` into md/dev-X/state when the
            # faulty member is still listed, else ADD_NEW_DISK with MD_DISK_SYNC into the free slot
            # (the leg's old one): md then copies only the chunks the bitmap marks.
            argv.append(["mdadm", self.md_path, "--re-add", "--write-mostly", self.add_path])
        else:
            # Added as a new disk, md forgets the leg: a full recovery local → iSCSI.
            argv.append(["mdadm", self.md_path, "--add", "--write-mostly", self.add_path])
        return argv

    def describe(self) -> str:
        steps = []
        if self.remove is not None and not (self.mode == "partial" and self.remove == self.add):
            steps.append(f"fail and remove the stale iSCSI member {self.remove}")
        renamed = " (the LUN came back under a new name)" if self.renamed else ""
        if self.mode == "partial":
            steps.append(
                f"re-add {self.add_path} (LUN {self.lun} of {self.target}){renamed} write-mostly in its "
                f"old slot, so md copies only the chunks its bitmap marks ({self.route_reason})"
            )
        else:
            why = f" ({self.route_reason})" if self.route_reason else ""
            steps.append(
                f"add {self.add_path} (LUN {self.lun} of {self.target}){renamed} write-mostly, "
                f"so it recovers from the local leg: a full copy{why}"
            )
        return f"{self.label} ({self.md_path}): " + ", then ".join(steps)


@dataclass(frozen=True)
class ResumePlan:
    """Restart the copy iSCSI → local of an array whose local leg md left as an idle spare.

    An iSCSI outage during the local leg's recovery (the initial copy after attach) makes
    raid1 stop it and keep recovery disabled until a device is added to the array, so md
    never retries by itself. Removing the spare and adding it again does: a full recovery
    from the iSCSI leg, the only complete copy. Never the other way: the local leg is
    incomplete.
    """

    label: str
    md_path: str
    md_device: str
    member: str  # kernel name of the local leg, e.g. loop1, dm-3
    dev: str | None  # its major:minor per sysfs
    add_path: str  # its node under devfs, what mdadm opens
    target: str
    lun: int
    removed: bool = False  # an earlier resume removed the spare and its --add failed: add only
    renamed: bool = False  # the local device keeps its name (the executor asks every plan)

    def commands(self) -> list[list[str]]:
        argv = [] if self.removed else [["mdadm", self.md_path, "--remove", self.member]]
        return [*argv, ["mdadm", self.md_path, "--add", self.add_path]]

    def describe(self) -> str:
        remove = "" if self.removed else f"remove the idle spare local leg {self.member} and "
        return (
            f"{self.label} ({self.md_path}): {remove}add {self.add_path} again, so it recovers from the "
            f"iSCSI leg (LUN {self.lun} of {self.target})"
        )

    def replan(self, view: ArrayView, sysfs: Path, devfs: Path) -> ResumePlan | HealBlocked:
        """The same decision taken again on a fresh view (the executor, under the label's lock)."""
        return plan_resume(view, sysfs, devfs, removed=(self.member, self.dev) if self.removed else None)


@dataclass(frozen=True)
class HealBlocked:
    """Why no heal may run now. `reason` is a short token (also a metric label suffix)."""

    reason: str
    detail: str


def plan_heal(
    view: ArrayView,
    sysfs: Path,
    devfs: Path,
    *,
    enabled: bool = True,
    sessions: list[IscsiSession] | None = None,
) -> HealPlan | HealBlocked:
    """Decide whether the iSCSI leg of this array may be re-added now, and onto which device.

    The device is looked up fresh by target AND LUN (`find_lun_block`), so a LUN
    that came back under a new name is found and a device of another target or
    LUN is never used. The session must be LOGGED_IN and the SCSI device
    `running`. Time-based policy (stable for N seconds, backoff) is the caller's.
    `sessions`: the iSCSI sessions just read (a snapshot's), to spare re-reading sysfs
    for every array; the heal itself re-plans from a fresh read.
    """
    a = view.attachment
    if not enabled:
        return HealBlocked("disabled", "heal is disabled in the configuration ([heal] enabled = false)")
    if view.md is None:
        return HealBlocked("not_running", f"the array of {view.label} is not running")
    if a.target is None or not view.iscsi.configured:
        return HealBlocked("no_iscsi_leg", f"{view.label} has no iSCSI leg")
    if view.local.state != "in_sync":
        return HealBlocked(
            "local_not_in_sync", f"the local leg of {view.label} is {view.local.state}: nothing to heal from"
        )
    if view.iscsi.state in ("recovering", "spare"):
        return HealBlocked("in_progress", f"the iSCSI leg of {view.label} is already {view.iscsi.state}")
    if view.iscsi.state not in HEALABLE_ISCSI_STATES:
        return HealBlocked("not_stale", f"the iSCSI leg of {view.label} is {view.iscsi.state}")

    running = _answering_lun(sysfs, a.target, a.lun, sessions)
    if isinstance(running, HealBlocked):
        return running
    chosen = _choose(running, view)
    if chosen is None:
        names = ", ".join(str(lun.block) for _, lun in running)
        return HealBlocked(
            "ambiguous_device", f"LUN {a.lun} of {a.target} is reachable as several devices ({names})"
        )
    session, lun = chosen
    assert lun.block is not None  # find_lun_block only returns LUNs with a block device
    old = view.iscsi.member.name if view.iscsi.member is not None else None
    members = {m.name for m in view.md.members}
    if lun.block in members and lun.block != old:
        return HealBlocked(
            "wrong_device", f"{lun.block} is already a member of {view.md.name} as another leg: refusing"
        )
    problem = _device_problem(
        sysfs,
        devfs,
        lun.block,
        lun.dev,
        allowed_holder=view.md.name if lun.block == old else None,
        what=f"LUN {lun.lun}",
    )
    if problem is None:
        problem = _size_problem(sysfs, lun.block, view)
    if problem is not None:
        return HealBlocked("device_unusable", problem)
    return HealPlan(
        label=view.label,
        md_path=a.md_path or f"/dev/{view.md.name}",
        md_device=view.md.name,
        remove=old,
        add=lun.block,
        add_dev=lun.dev or "",
        add_path=str(devfs / lun.block),
        target=a.target,
        lun=a.lun,
        session=session.name,
        renamed=(old or a.iscsi_device or lun.block) != lun.block,
    )


def plan_resume(
    view: ArrayView,
    sysfs: Path,
    devfs: Path,
    *,
    enabled: bool = True,
    sessions: list[IscsiSession] | None = None,
    removed: tuple[str, str | None] | None = None,
) -> ResumePlan | HealBlocked:
    """Whether the stopped recovery of this array's local leg may be restarted now (ResumePlan).

    Only when the iSCSI leg is in sync in md, its session LOGGED_IN and its LUN `running`
    under the very device md uses, and the local leg is an idle spare — or, `removed`
    (kernel name, major:minor), gone because a resume removed it and its --add failed.
    Time-based policy (stable for N seconds, backoff) is the caller's, as for plan_heal.
    """
    a = view.attachment
    if not enabled:
        return HealBlocked("disabled", "heal is disabled in the configuration ([heal] enabled = false)")
    if view.md is None:
        return HealBlocked("not_running", f"the array of {view.label} is not running")
    if removed is not None and view.local.state == "missing" and view.local.configured and not view.syncing:
        member, dev, holder = removed[0], removed[1], None
    elif view.recovery_stopped and view.local.member is not None:
        member, dev, holder = view.local.member.name, view.local.member.dev, view.md.name
    else:
        return HealBlocked("not_stopped", f"the local leg of {view.label} is {view.local.state}")
    if a.target is None or not view.iscsi.configured:
        return HealBlocked("no_iscsi_leg", f"{view.label} has no iSCSI leg to recover from")
    if view.iscsi.state != "in_sync" or view.iscsi.device is None:
        return HealBlocked(
            "source_not_in_sync",
            f"the iSCSI leg of {view.label} is {view.iscsi.state}: the local leg has nothing to recover from",
        )
    answering = _answering_lun(sysfs, a.target, a.lun, sessions)
    if isinstance(answering, HealBlocked):
        return answering
    if view.iscsi.device not in {lun.block for _, lun in answering}:
        names = ", ".join(str(lun.block) for _, lun in answering)
        return HealBlocked(
            "iscsi_member_gone",
            f"LUN {a.lun} of {a.target} is back as {names}, but md's iSCSI leg is {view.iscsi.device}: "
            "the array has no working copy to recover from; stop the VM and attach it again",
        )
    problem = _device_problem(sysfs, devfs, member, dev, allowed_holder=holder)
    if problem is not None:
        return HealBlocked("device_unusable", problem)
    return ResumePlan(
        label=view.label,
        md_path=a.md_path or f"/dev/{view.md.name}",
        md_device=view.md.name,
        member=member,
        dev=dev,
        add_path=str(devfs / member),
        target=a.target,
        lun=a.lun,
        removed=holder is None,
    )


def _answering_lun(
    sysfs: Path, target: str, lun: int, sessions: list[IscsiSession] | None
) -> list[tuple[IscsiSession, ScsiLun]] | HealBlocked:
    """LUN `lun` of `target` (by target AND LUN) on a LOGGED_IN session with its SCSI device
    `running`, or why not yet."""
    candidates = find_lun_block(sysfs, target, lun, sessions)
    live = [(s, found) for s, found in candidates if s.state == "LOGGED_IN"]
    if not live:
        states = ", ".join(f"{s.name} {s.state}" for s, _ in candidates) or "no session with the LUN"
        return HealBlocked("session_down", f"no logged-in session to {target} has LUN {lun} ({states})")
    running = [(s, found) for s, found in live if found.state == "running"]
    if not running:
        states = ", ".join(f"{found.block} {found.state}" for _, found in live)
        return HealBlocked("device_not_ready", f"LUN {lun} of {target} does not answer yet ({states})")
    return running


def _choose(
    running: list[tuple[IscsiSession, ScsiLun]], view: ArrayView
) -> tuple[IscsiSession, ScsiLun] | None:
    """One device for the LUN. With several sessions (several portals), prefer the device md or the
    registry knew; otherwise refuse to guess."""
    if len(running) == 1:
        return running[0]
    known = {n for n in (view.iscsi.device, view.attachment.iscsi_device) if n}
    same = [c for c in running if c[1].block in known]
    return same[0] if len(same) == 1 else None


def _device_problem(
    sysfs: Path, devfs: Path, name: str, dev: str | None, allowed_holder: str | None, what: str | None = None
) -> str | None:
    """The device must not be held by anything else (another array, LVM), and its /dev node must be
    the device sysfs names, so mdadm opens the LUN we checked."""
    try:
        holders = set(block_holders(sysfs, name)) - ({allowed_holder} if allowed_holder else set())
    except OSError as e:
        return f"cannot tell whether {name} is in use: {e.strerror or e}"
    if holders:
        return f"{name} is in use by {', '.join(sorted(holders))}: refusing to add it"
    return _node_problem(devfs, name, dev, what)


def _node_problem(devfs: Path, name: str, dev: str | None, what: str | None = None) -> str | None:
    """mdadm must open the device sysfs names: its node must exist and be that device."""
    node = devfs / name
    try:
        st = os.stat(node)
    except FileNotFoundError:
        return f"{node} does not exist (yet)"
    except OSError as e:
        return f"cannot stat {node}: {e.strerror or e}"
    if stat.S_ISBLK(st.st_mode) and dev is not None:
        found = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        if found != dev:
            return f"{node} is device {found}, but sysfs says {what or name} is {dev}: refusing"
    return None


def _size_problem(sysfs: Path, name: str, view: ArrayView) -> str | None:
    """md would refuse a too small device; say why in our words first."""
    need_kib = component_size_kib(sysfs, view.md.name) if view.md else None
    size = block_size_bytes(sysfs, name)  # None: unknown, let mdadm decide
    if need_kib is not None and size is not None and size < need_kib * 1024:
        return f"{name} has {size} bytes, the array needs {need_kib * 1024}: not the LUN it was?"
    return None


def migrate_blockers(
    view: ArrayView, stale: StaleRecord | None = None, records_error: str | None = None
) -> list[str]:
    """Why moving this array's VM to another host now could lose data or fail; empty: safe.

    The destination builds its mirror from the iSCSI copy alone, so that copy must be
    complete: iSCSI leg in sync in md, no stale record, the session up. `stale`: the record
    standing for this LABEL if the caller knows it better than the snapshot (the agent's pass).
    `records_error`: why the records directory could not be read (HostSnapshot.records_error):
    then no record is not known, so the copy is not known to be complete.
    """
    stale = stale or view.stale
    reasons = []
    if stale is not None:
        reasons.append(f"stale record: {stale.describe()}")
    elif records_error is not None:
        reasons.append(
            f"whether its iSCSI copy is stale is unknown: the stale-copy records cannot be read ({records_error})"
        )
    if view.md is None:
        reasons.append(f"the array of {view.label} is not running on this host")
    if not view.iscsi.configured:
        reasons.append(f"{view.label} has no iSCSI leg (MISSING): its data is on this host's local disk only")
    else:
        if view.md is not None and view.iscsi.state != "in_sync":
            reasons.append(f"the iSCSI leg is {view.iscsi.state}, not in sync")
        if not view.session_up:
            state = view.session.state if view.session is not None else "gone"
            reasons.append(f"the iSCSI session to {view.attachment.target} is {state}")
    return reasons
