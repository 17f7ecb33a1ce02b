"""One consistent view of the host: the registry joined with md and iSCSI state.

The CLI's `status` and the agent's collectors both render from a HostSnapshot,
so they cannot disagree about what a leg's state is or whether a VM is running
on its local mirror alone. Everything derived lives here, once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .iscsi import IscsiReadResult, IscsiSession, ScsiLun, read_iscsi_sessions
from .md import MdArray, MdMember, MdReadResult, read_md_arrays
from .paths import HostPaths
from .registry import LEG_ISCSI, LEG_LOCAL, Attachment, HotplugStats, Registry, RegistryRead
from .stale import StaleRecord, StaleRecords

LEG_STATES = ("in_sync", "recovering", "faulty", "missing", "spare", "blocked")
SYNC_ACTIONS = ("idle", "resync", "recover", "check", "repair", "frozen", "reshape")
SESSION_STATES = ("LOGGED_IN", "FAILED", "FREE")
SECTOR = 512

T = TypeVar("T")


@dataclass(frozen=True)
class LegView:
    role: str  # LEG_ISCSI | LEG_LOCAL
    configured: bool  # False when the spec or tab said MISSING: left out on purpose
    device: str | None  # kernel name of the member, e.g. "sda", "dm-3"
    state: str  # one of LEG_STATES
    write_mostly: bool
    errors: int | None
    member: MdMember | None


@dataclass(frozen=True)
class ArrayView:
    """A mirrored attachment (one with a LABEL) and what the kernel says about it."""

    attachment: Attachment
    md: MdArray | None  # None: the array is not running
    iscsi: LegView
    local: LegView
    session: IscsiSession | None
    lun: ScsiLun | None
    stale: StaleRecord | None

    @property
    def label(self) -> str:
        return self.attachment.label or ""

    @property
    def domain(self) -> str:
        a = self.attachment
        if a.domain_name:
            return a.domain_name
        return str(a.domain_id) if a.domain_id is not None else ""

    @property
    def session_up(self) -> bool:
        return self.session is not None and self.session.state == "LOGGED_IN"

    @property
    def iscsi_usable(self) -> bool:
        """The iSCSI leg can serve I/O now: in sync in md and its session logged in."""
        return self.iscsi.state == "in_sync" and self.session_up

    @property
    def local_only(self) -> bool:
        """The VM's I/O is served by the local leg alone because iSCSI failed.

        The local mirror is protecting the VM and the iSCSI copy is going stale.
        Not set when the iSCSI leg was left out on purpose (MISSING): there is no
        iSCSI copy to go stale.
        """
        return (
            self.md is not None
            and self.iscsi.configured
            and not self.iscsi_usable
            and self.local.state == "in_sync"
        )

    @property
    def unprotected(self) -> bool:
        """The local leg is missing, faulty or not yet in sync: the VM depends on iSCSI alone."""
        return self.md is not None and self.local.state != "in_sync"

    @property
    def no_good_leg(self) -> bool:
        """Neither leg can serve I/O: the VM's disk is failing or stalled."""
        return self.md is not None and self.local.state != "in_sync" and not self.iscsi_usable

    @property
    def write_mostly_wrong(self) -> bool:
        """Reads should go to the local leg; write-mostly belongs on the other one."""
        expected = self.attachment.write_mostly_leg or LEG_ISCSI
        wrong = self.local if expected == LEG_ISCSI else self.iscsi
        return wrong.member is not None and wrong.write_mostly

    @property
    def sync_action(self) -> str:
        return (self.md.sync_action if self.md else None) or "idle"

    @property
    def syncing(self) -> bool:
        return self.sync_action not in ("idle", "frozen")

    @property
    def sync_completed_ratio(self) -> float:
        """0..1 of the running resync/recovery; 1 when idle and in sync, 0 when idle and degraded."""
        md = self.md
        if md is None:
            return 0.0
        if self.syncing:
            if md.sync_completed and md.sync_completed[1] > 0:
                done, total = md.sync_completed
                return min(1.0, done / total)
            return 0.0  # resync=PENDING or not started yet
        return 1.0 if (md.degraded or 0) == 0 else 0.0

    @property
    def sync_speed_bytes(self) -> float:
        if not self.syncing or self.md is None or self.md.sync_speed_kib is None:
            return 0.0
        return float(self.md.sync_speed_kib * 1024)

    @property
    def sync_remaining_seconds(self) -> float | None:
        """Seconds left at the current speed; 0 when idle; None when running but not moving."""
        md = self.md
        if md is None or not self.syncing:
            return 0.0
        speed = self.sync_speed_bytes
        if not md.sync_completed or speed <= 0:
            return None
        done, total = md.sync_completed
        return max(0, total - done) * SECTOR / speed

    @property
    def size_bytes(self) -> int | None:
        return self.md.size_bytes if self.md else None


@dataclass(frozen=True)
class SessionView:
    """A target the registry depends on, and its session (None: expected but gone)."""

    target: str
    portal: str
    session: IscsiSession | None

    @property
    def state(self) -> str | None:
        return self.session.state if self.session else None

    @property
    def up(self) -> bool:
        return self.state == "LOGGED_IN"


@dataclass(frozen=True)
class SourceResult:
    seconds: float
    errors: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class HostSnapshot:
    taken: float
    attachments: tuple[Attachment, ...]
    arrays: tuple[ArrayView, ...]
    sessions: tuple[SessionView, ...]
    md: MdReadResult
    iscsi: IscsiReadResult
    stale: tuple[StaleRecord, ...]
    hotplug: HotplugStats
    sources: dict[str, SourceResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.sources.values())

    def array(self, label: str) -> ArrayView | None:
        return next((a for a in self.arrays if a.label == label), None)

    @classmethod
    def read(cls, paths: HostPaths) -> HostSnapshot:
        """Read every source once. Each source's failure is recorded, never raised."""
        sources: dict[str, SourceResult] = {}

        def timed(name: str, read: Callable[[], T], empty: T, errors_of=lambda r: ()) -> T:
            started = time.perf_counter()
            try:
                result = read()
                errors = tuple(errors_of(result))
            except Exception as e:  # a broken source must not hide the others
                result, errors = empty, (f"{name}: {e}",)
            sources[name] = SourceResult(time.perf_counter() - started, errors)
            return result

        registry = Registry(paths)
        # A corrupt registry entry or stale record is an error of its source, never silently dropped.
        attachments = timed(
            "registry", registry.read_all, RegistryRead([], []), lambda r: r.errors
        ).attachments
        hotplug = timed("hotplug", registry.read_stats, HotplugStats())
        stale = timed("stale", StaleRecords(paths).read_all, ([], []), lambda r: r[1])[0]
        md = timed("md", lambda: read_md_arrays(paths.sysfs), MdReadResult({}, []), lambda r: r.errors)
        iscsi = timed(
            "iscsi", lambda: read_iscsi_sessions(paths.sysfs), IscsiReadResult([], []), lambda r: r.errors
        )
        return cls.build(attachments, md, iscsi, stale, hotplug, paths=paths, sources=sources)

    @classmethod
    def build(
        cls,
        attachments: list[Attachment],
        md: MdReadResult,
        iscsi: IscsiReadResult,
        stale: list[StaleRecord],
        hotplug: HotplugStats | None = None,
        *,
        paths: HostPaths | None = None,
        sources: dict[str, SourceResult] | None = None,
        taken: float | None = None,
    ) -> HostSnapshot:
        stale_by_label = {r.label: r for r in stale}
        by_target: dict[str, list[IscsiSession]] = {}
        for s in iscsi.sessions:
            by_target.setdefault(s.target, []).append(s)

        arrays = []
        for a in sorted(attachments, key=lambda a: (a.label or "", a.id)):
            if a.label is None:
                continue
            session, lun = _session_for(a, by_target.get(a.target or "", []))
            array = _md_for(a, md.arrays, paths)
            arrays.append(_array_view(a, array, session, lun, stale_by_label.get(a.label), paths))

        sessions = []
        for target in sorted({a.target for a in attachments if a.target}):
            found = by_target.get(target, [])
            if found:
                sessions.extend(
                    SessionView(target, s.portal or "", s) for s in sorted(found, key=lambda s: s.sid)
                )
            else:
                portal = next((a.portal for a in attachments if a.target == target and a.portal), "")
                sessions.append(SessionView(target, portal or "", None))
        return cls(
            taken=time.time() if taken is None else taken,
            attachments=tuple(attachments),
            arrays=tuple(arrays),
            sessions=tuple(sessions),
            md=md,
            iscsi=iscsi,
            stale=tuple(stale),
            hotplug=hotplug or HotplugStats(),
            sources=sources or {},
        )


def _session_for(a: Attachment, sessions: list[IscsiSession]) -> tuple[IscsiSession | None, ScsiLun | None]:
    """The session carrying this attachment's LUN: prefer the one with our device, then a live one."""
    if not sessions:
        return None, None

    def rank(s: IscsiSession) -> tuple[int, int, int]:
        lun = s.lun(a.lun)
        return (
            int(lun is not None and lun.block is not None and lun.block == a.iscsi_device),
            int(s.state == "LOGGED_IN"),
            int(lun is not None),
        )

    best = max(sessions, key=rank)
    return best, best.lun(a.lun)


def _md_for(a: Attachment, arrays: dict[str, MdArray], paths: HostPaths | None) -> MdArray | None:
    if a.md_device and a.md_device in arrays:
        return arrays[a.md_device]
    if paths is not None and a.label:
        # /dev/md/LABEL → ../md127: found even if the registry lacks the kernel name (half-done add).
        try:
            name = os.path.basename(os.readlink(paths.devfs / "md" / a.label))
        except OSError:
            return None
        return arrays.get(name)
    return None


def _array_view(
    a: Attachment,
    md: MdArray | None,
    session: IscsiSession | None,
    lun: ScsiLun | None,
    stale: StaleRecord | None,
    paths: HostPaths | None,
) -> ArrayView:
    members = list(md.members) if md else []
    iscsi_names = {n for n in (a.iscsi_device, lun.block if lun else None) if n}
    local_names = {n for n in (a.local_kernel_name, _kernel_name(a.local_device, paths)) if n}

    iscsi_member = next((m for m in members if m.name in iscsi_names), None)
    local_member = next((m for m in members if m.name in local_names), None)
    if local_member is None and a.local_device is not None:
        # The local device's kernel name is unknown: the one member that is not iSCSI is it.
        others = [m for m in members if m is not iscsi_member]
        local_member = others[0] if len(others) == 1 else None

    return ArrayView(
        attachment=a,
        md=md,
        iscsi=_leg(LEG_ISCSI, a.target is not None, iscsi_member, a.iscsi_device),
        local=_leg(LEG_LOCAL, a.local_device is not None, local_member, a.local_kernel_name),
        session=session,
        lun=lun,
        stale=stale,
    )


def _kernel_name(device: str | None, paths: HostPaths | None) -> str | None:
    """/dev/vg0/lv → dm-3, resolved under the (possibly injected) devfs."""
    if not device or paths is None or not device.startswith("/dev/"):
        return None
    try:
        real = os.path.realpath(paths.devfs / device[len("/dev/") :])
    except OSError:
        return None
    name = os.path.basename(real)
    return name if Path(real).parent == Path(os.path.realpath(paths.devfs)) else None


def _leg(role: str, configured: bool, member: MdMember | None, device: str | None) -> LegView:
    return LegView(
        role=role,
        configured=configured,
        device=member.name if member else device,
        state=leg_state(member),
        write_mostly=bool(member and member.write_mostly),
        errors=member.errors if member else None,
        member=member,
    )


def leg_state(member: MdMember | None) -> str:
    """Map md's per-member flags (dev-*/state) onto one of LEG_STATES."""
    if member is None:
        return "missing"
    if member.faulty:
        return "faulty"
    if member.blocked:
        return "blocked"
    if member.in_sync:
        return "in_sync"
    # A member with a slot that is not in sync is being written from the other leg.
    if member.slot is not None:
        return "recovering"
    return "spare"
