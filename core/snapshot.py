"""One consistent view of the host: the registry joined with md and iSCSI state.

The CLI's `status` and the agent's collectors both render from a HostSnapshot,
so they cannot disagree about what a leg's state is or whether a VM is running
on its local mirror alone. Everything derived lives here, once.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import TypeVar

from .files import FileSignature
from .iscsi import (
    IscsiReadResult,
    IscsiSession,
    ScsiLun,
    iscsi_session_names,
    read_iscsi_session,
    read_iscsi_session_parts,
    session_sid,
)
from .md import MdArray, MdMember, MdReadResult, md_array_names, md_names_for, read_md_array_errors
from .paths import HostPaths
from .registry import LEG_ISCSI, LEG_LOCAL, Attachment, HotplugStats, Registry, vm_name
from .stale import RecordFiles, StaleRecord, StaleRecords
from .sysfs import SECTOR

LEG_STATES = ("in_sync", "recovering", "faulty", "missing", "spare", "blocked")
SYNC_ACTIONS = ("idle", "resync", "recover", "check", "repair", "frozen", "reshape")
SESSION_STATES = ("LOGGED_IN", "FAILED", "FREE")

T = TypeVar("T")
K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class LegView:
    role: str  # LEG_ISCSI | LEG_LOCAL
    configured: bool  # False when the spec or tab said MISSING: left out on purpose
    device: str | None  # kernel name of the member, e.g. "sda", "dm-3"
    state: str  # one of LEG_STATES
    write_mostly: bool
    errors: int | None
    member: MdMember | None


@dataclass(frozen=True, slots=True)
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
        return vm_name(self.attachment.domain_name, self.attachment.domain_id, numbered="{}")

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
    def recovery_stopped(self) -> bool:
        """The local leg waits as an idle spare and no recovery runs: its copy from iSCSI was cut
        (an iSCSI outage during it) and md does not restart it by itself. Unprotected until the
        agent resumes it (core.safety.plan_resume) or the VM is attached again."""
        return (
            self.md is not None and self.local.configured and self.local.state == "spare" and not self.syncing
        )

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


@dataclass(frozen=True, slots=True)
class PlainView:
    """An attachment without a LABEL: a LUN handed to Xen unmirrored, healthy only while its
    session is logged in and the LUN has a block device."""

    attachment: Attachment
    session: IscsiSession | None
    lun: ScsiLun | None

    @property
    def present(self) -> bool:
        """The LUN's block device exists (the session may still be down)."""
        return self.lun is not None and self.lun.block is not None

    @property
    def device(self) -> str | None:
        return self.lun.block if self.lun is not None and self.lun.block else self.attachment.iscsi_device

    @property
    def state(self) -> str:
        """As a leg's state: in_sync when it can serve I/O, else missing."""
        up = self.session is not None and self.session.state == "LOGGED_IN"
        return "in_sync" if up and self.present else "missing"


@dataclass(frozen=True, slots=True)
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
class Changes:
    """What `HostSnapshot.update` re-reads; everything else is taken over from the previous snapshot.

    The registry, hotplug statistics and stale records are files: every update checks them
    with one stat each and re-reads those that moved."""

    md: frozenset[str] = frozenset()  # md arrays by kernel name: "md127", "md_web1"
    sessions: frozenset[str] = frozenset()  # iSCSI sessions by name: "session3"
    # Other kernel names an event named ("sda", "dm-3", "0:0:0:1", "connection3:0", "host2"):
    # the arrays and sessions that use them are re-read.
    devices: frozenset[str] = frozenset()
    everything: bool = False  # list and re-read every array and session (the full sweep)

    def __or__(self, other: Changes) -> Changes:
        return Changes(
            self.md | other.md,
            self.sessions | other.sessions,
            self.devices | other.devices,
            self.everything or other.everything,
        )

    def __bool__(self) -> bool:
        return bool(self.everything or self.md or self.sessions or self.devices)


EVERYTHING = Changes(everything=True)


@dataclass(frozen=True)
class HostSnapshot:
    taken: float
    attachments: tuple[Attachment, ...]
    arrays: Sequence[ArrayView]  # Chunks when read or derived: a change copies a run, not all
    sessions: Sequence[SessionView]
    md: MdReadResult
    iscsi: IscsiReadResult
    stale: tuple[StaleRecord, ...]
    hotplug: HotplugStats
    sources: dict[str, SourceResult] = field(default_factory=dict)
    # Per md array / session name, the problems reading it ("" = listing); None when the snapshot
    # was not read from a host (build()), so it cannot be updated piecewise.
    md_errors: Mapping[str, tuple[str, ...]] | None = field(default=None, compare=False, repr=False)
    iscsi_errors: Mapping[str, tuple[str, ...]] | None = field(default=None, compare=False, repr=False)
    files: Mapping[str, FileSignature] = field(default_factory=dict, compare=False, repr=False)
    stale_files: RecordFiles | None = field(default=None, compare=False, repr=False)
    # Why the records directory could not be read on the last read of it (its source's error
    # line); None when it could. Then whether an iSCSI copy is stale is unknown beyond the
    # records read before (an update keeps those): no array is safe to migrate.
    records_error: str | None = field(default=None, compare=False, repr=False)
    # Attachment ids whose ArrayView is not the previous snapshot's object, and targets whose
    # SessionViews are not: None after a full read (everything may be new).
    changed: frozenset[str] | None = field(default=None, compare=False, repr=False)
    changed_targets: frozenset[str] | None = field(default=None, compare=False, repr=False)
    # Labels whose stale record came, changed or went since the parent (None after a full read).
    changed_records: frozenset[str] | None = field(default=None, compare=False, repr=False)
    # True when views were added, removed or moved in `arrays` since the parent (positions differ).
    reordered: bool = field(default=True, compare=False, repr=False)
    derived_from: float | None = field(default=None, compare=False, repr=False)  # the parent's `taken`

    def changed_since(self, previous: HostSnapshot | None) -> frozenset[str] | None:
        """Attachment ids whose view is new since `previous`, when this snapshot was derived
        from it; None when unknown (then every view may be new)."""
        if previous is None or self.derived_from is None or self.derived_from != previous.taken:
            return None
        return self.changed

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.sources.values())

    @cached_property
    def plain(self) -> tuple[PlainView, ...]:
        """One PlainView per attachment without a LABEL, derived here like the arrays' states."""
        by_target: dict[str, list[IscsiSession]] = {}
        for s in self.iscsi.sessions:
            by_target.setdefault(s.target, []).append(s)
        return tuple(
            PlainView(a, *_session_for(a, by_target.get(a.target or "", [])))
            for a in sorted(self.attachments, key=lambda a: a.id)
            if a.label is None
        )

    def array(self, label: str) -> ArrayView | None:
        ids = self._index.by_label.get(label)
        if not ids:
            return None
        return self._index.by_id[min(ids)]  # arrays are ordered by (label, id): the first one

    def by_id(self, attachment_id: str) -> ArrayView | None:
        return self._index.by_id.get(attachment_id)

    def target_sessions(self, target: str | None) -> tuple[IscsiSession, ...]:
        """The iSCSI sessions to `target` (by sid): what a heal of one array looks at, without
        going through every session of the host."""
        return self._index.sessions_by_target.get(target, ()) if target else ()

    def session_views(self, target: str) -> tuple[SessionView, ...]:
        return self._index.session_views.get(target, ())

    def position(self, attachment_id: str) -> int | None:
        """Where the attachment's view is in `arrays`."""
        return self._index.position.get(attachment_id)

    def stale_by_label(self) -> dict[str, StaleRecord]:
        """The stale records by label (a new dict)."""
        return self._index.stale_by_label.as_dict()

    def stale_record(self, label: str) -> StaleRecord | None:
        return self._index.stale_by_label.get(label)

    def ids_of(self, label: str) -> frozenset[str]:
        return frozenset(self._index.by_label.get(label, ()))

    def ids_with_md(self, md_name: str) -> frozenset[str]:
        """The attachments whose view is (or names) md array `md_name`."""
        return frozenset(self._index.by_md.get(md_name, ()))

    @cached_property
    def _index(self) -> _Index:
        return _Index.of(self)

    @classmethod
    def read(cls, paths: HostPaths, md_arrays: Callable[[], MdArrays] | None = None) -> HostSnapshot:
        """Read every source once. Each source's failure is recorded, never raised.

        `md_arrays`: gives what `read_md_arrays_parts(paths.sysfs)` would, read meanwhile (the
        agent's start reads the md arrays in another process while this one reads the rest)."""
        sources: dict[str, SourceResult] = {}
        files = _file_signatures(paths)
        registry = Registry(paths)
        # A corrupt registry entry or stale record is an error of its source, never silently dropped.
        attachments = _read_registry(sources, registry)
        hotplug = _timed(sources, "hotplug", registry.read_stats, HotplugStats())
        stale_files, _, records_error = _read_stale(sources, StaleRecords(paths), None)
        stale = _records_of(stale_files)
        if md_arrays is None:
            md_parts, listing, seconds = read_md_arrays_parts(paths.sysfs)
        started = time.perf_counter()
        names, listing_ = iscsi_session_names(paths.sysfs)
        session_parts = read_iscsi_session_parts(paths.sysfs, names)
        iscsi, iscsi_errors = _iscsi_result(session_parts, listing_)
        sources["iscsi"] = SourceResult(time.perf_counter() - started, tuple(iscsi.errors))
        if md_arrays is not None:
            md_parts, listing, seconds = md_arrays()
        md, md_errors = _md_result(md_parts, listing)
        sources["md"] = SourceResult(seconds, tuple(md.errors))
        sources["iscsi"] = sources.pop("iscsi")  # in the order they always were
        snapshot = cls.build(attachments, md, iscsi, stale, hotplug, paths=paths, sources=sources)
        return cls._with(
            snapshot,
            md_errors=md_errors,
            iscsi_errors=iscsi_errors,
            files=files,
            stale_files=stale_files,
            records_error=records_error,
        )

    @classmethod
    def _with(cls, snapshot: HostSnapshot, **values) -> HostSnapshot:
        fields_ = {name: getattr(snapshot, name) for name in cls.__dataclass_fields__}
        return cls(**{**fields_, **values})

    def update(self, paths: HostPaths, changes: Changes = Changes()) -> HostSnapshot:
        """A new snapshot: this one with what `changes` names (and the files that moved) re-read.

        Views, sessions and md arrays that read the same are this snapshot's very objects, so
        consumers can tell what changed by identity (`changed` lists the new ArrayViews)."""
        if self.md_errors is None or self.iscsi_errors is None:
            return HostSnapshot.read(paths)
        return _Update(self, paths, changes).run()

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
        plain_dirs: dict[str, bool] = {}  # devfs's directories seen by lstat in this build
        for a in sorted(attachments, key=_array_order):
            if a.label is None:
                continue
            arrays.append(_view_of(a, md.arrays, by_target, stale_by_label, paths, plain_dirs))

        sessions = []
        for target in sorted({a.target for a in attachments if a.target}):
            sessions.extend(_session_views(target, by_target.get(target, []), attachments))
        return cls(
            taken=time.time() if taken is None else taken,
            attachments=tuple(attachments),
            arrays=Chunks(arrays),
            sessions=Chunks(sessions),
            md=md,
            iscsi=iscsi,
            stale=tuple(stale),
            hotplug=hotplug or HotplugStats(),
            sources=sources or {},
        )


def _array_order(a: Attachment) -> tuple[str, str]:
    return (a.label or "", a.id)


def _view_of(
    a: Attachment,
    md_arrays: Mapping[str, MdArray],
    sessions_by_target: Mapping[str, list[IscsiSession]],
    stale_by_label: Mapping[str, StaleRecord],
    paths: HostPaths | None,
    plain_dirs: dict[str, bool] | None = None,
) -> ArrayView:
    session, lun = _session_for(a, sessions_by_target.get(a.target or "", []))
    array = _md_for(a, md_arrays, paths)
    return _array_view(a, array, session, lun, stale_by_label.get(a.label or ""), paths, plain_dirs)


def _session_views(
    target: str, found: Iterable[IscsiSession], attachments: Iterable[Attachment]
) -> list[SessionView]:
    found = sorted(found, key=lambda s: s.sid)
    if found:
        return [SessionView(target, s.portal or "", s) for s in found]
    portal = next((a.portal for a in attachments if a.target == target and a.portal), "")
    return [SessionView(target, portal or "", None)]


def _timed(sources: dict[str, SourceResult], name: str, read: Callable[[], T], empty: T, errors_of=None) -> T:
    started = time.perf_counter()
    try:
        result = read()
        errors = tuple(errors_of(result)) if errors_of else ()
    except Exception as e:  # a broken source must not hide the others
        result, errors = empty, (f"{name}: {e}",)
    sources[name] = SourceResult(time.perf_counter() - started, errors)
    return result


def _read_registry(
    sources: dict[str, SourceResult], registry: Registry, known: Sequence[Attachment] = ()
) -> Sequence[Attachment]:
    """Every readable entry; `known` (what an update read last) when the directory itself could not
    be read: unknown is not "nothing attached" (the source's error says it)."""
    read = _timed(sources, "registry", registry.read_all, None, lambda r: r.errors)
    return known if read is None else read.attachments


def _read_stale(
    sources: dict[str, SourceResult], records: StaleRecords, known: RecordFiles | None, every: bool = False
) -> tuple[RecordFiles, dict[str, StaleRecord | None] | None, str | None]:
    """The records directory: every file when `known` is None (a full read); else, for an update,
    those new or replaced since `known` as its inotify watch names them (StaleRecords.read_watched;
    `every`: all of them, the sweep); the records that changed by label (None: every one may
    have); and why the directory could not be read (None: it could)."""
    if known is None:
        read = _timed(sources, "stale", lambda: records.read_moved(None), None, lambda r: r[0].errors)
    else:
        read = _timed(
            sources, "stale", lambda: records.read_watched(known, every), None, lambda r: r[0].errors
        )
    if read is not None:
        return (*read, None)
    error = sources["stale"].errors[0]
    if known is None:
        return RecordFiles(), None, error
    # The directory could not be read: unknown is not "no records", so the records read last stand
    # (the source's error says it); without the watch (it may have lost names), the next read lists.
    if known.watch is not None:
        known.watch.close()
    return RecordFiles(known.files, known.inodes, known.problems), {}, error


def _watching(files: RecordFiles | None) -> bool:
    """Whether the update must ask the records' inotify watch (StaleRecords.read_watched): it
    is alive, or none was tried yet (a full read starts none: the CLI reads once)."""
    return files is not None and (files.watch is None or files.watch.alive)


def _records_of(files: RecordFiles) -> list[StaleRecord]:
    return [files.files[name] for name in sorted(files.files)]


def _record_name(record: StaleRecord) -> str:
    return record.label + ".json"  # records are listed by file name


def _patched(items: Sequence[T], changed: Mapping[K, T | None], key: Callable[[T], K], key_of) -> list[T]:
    """`items` (sorted by `key`, unique) with each changed key's item replaced, added or (None)
    removed: a copy of the list and a binary search per change."""
    result = list(items)
    for name, item in changed.items():
        wanted = key_of(name)
        i = bisect.bisect_left(result, wanted, key=key)
        present = i < len(result) and key(result[i]) == wanted
        if item is None:
            if present:
                del result[i]
        elif present:
            result[i] = item
        else:
            result.insert(i, item)
    return result


# Each md array's read by kernel name (the array, or None, and its problems), the listing's
# problems and the seconds it took.
MdArrays = tuple[dict[str, tuple[MdArray | None, list[str]]], list[str], float]


def read_md_arrays_parts(sysfs: Path) -> MdArrays:
    """Every md array of `sysfs`, as HostSnapshot.read reads them."""
    started = time.perf_counter()
    names, listing = md_array_names(sysfs)
    parts = {name: read_md_array_errors(sysfs, name) for name in names}
    return parts, listing, time.perf_counter() - started


def _file_signatures(paths: HostPaths) -> dict[str, FileSignature]:
    registry = Registry(paths)
    return {
        "registry": FileSignature.of(registry.directory),
        "hotplug": FileSignature.of(registry.stats_path),
        "stale": FileSignature.of(StaleRecords(paths).directory),
    }


def _md_result(
    parts: Mapping[str, tuple[MdArray | None, list[str] | tuple[str, ...]]], listing: list[str]
) -> tuple[MdReadResult, dict[str, tuple[str, ...]]]:
    """One MdReadResult from per-array reads, in the order a full read lists them (by name)."""
    errors = {name: tuple(e) for name, (_, e) in parts.items() if e}
    if listing:
        errors[""] = tuple(listing)
    arrays = {name: parts[name][0] for name in sorted(parts) if parts[name][0] is not None}
    return MdReadResult(arrays, _flat_errors(errors, sorted)), errors


def _iscsi_result(
    parts: Mapping[str, tuple[IscsiSession | None, list[str] | tuple[str, ...]]], listing: list[str]
) -> tuple[IscsiReadResult, dict[str, tuple[str, ...]]]:
    errors = {name: tuple(e) for name, (_, e) in parts.items() if e}
    if listing:
        errors[""] = tuple(listing)
    order = sorted(parts, key=session_sid)
    sessions = [parts[name][0] for name in order if parts[name][0] is not None]
    return IscsiReadResult(
        sessions, _flat_errors(errors, lambda names: sorted(names, key=session_sid))
    ), errors


def _flat_errors(
    errors: Mapping[str, tuple[str, ...]], order: Callable[[Iterable[str]], list[str]]
) -> list[str]:
    flat = list(errors.get("", ()))
    for name in order(n for n in errors if n):
        flat.extend(errors[name])
    return flat


def _view_keys(view: ArrayView) -> tuple[set[str], set[str]]:
    """The md names and device names whose change can change `view`."""
    a = view.attachment
    md = {n for n in (a.md_device, view.md.name if view.md else None) if n}
    devices = {m.name for m in view.md.members} if view.md else set()
    devices.update(
        n for n in (a.iscsi_device, a.local_kernel_name, view.lun.block if view.lun else None) if n
    )
    return md, devices


# The index maps hold tuples of attachment ids: almost always one id, and a tuple of one is a
# fifth of a frozenset of one (thousands of md and device names per thousand arrays).
def _add(index: CowMap, keys: Iterable[str], value: str) -> None:
    for key in keys:
        ids = index.get(key, ())
        if value not in ids:
            index[key] = (*ids, value)


def _discard(index: CowMap, keys: Iterable[str], value: str) -> None:
    for key in keys:
        ids = index.get(key, ())
        if value in ids:
            rest = tuple(v for v in ids if v != value)
            if rest:
                index[key] = rest
            else:
                index.pop(key)


class Chunks(Sequence):
    """An immutable sequence kept as runs of SIZE items: a derived snapshot that replaces a few
    views copies their runs and the list of runs (N / SIZE entries), not all N views, and the
    older snapshot keeps its own. Iterates, indexes and compares like the tuple of its items."""

    SIZE = 64
    __slots__ = ("_len", "_runs")

    def __init__(self, items: Iterable = ()):
        items = tuple(items)
        size = self.SIZE
        self._runs = tuple(items[i : i + size] for i in range(0, len(items), size))
        self._len = len(items)

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        return chain.from_iterable(self._runs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("Chunks index out of range")
        return self._runs[index // self.SIZE][index % self.SIZE]

    def __eq__(self, other) -> bool:
        if isinstance(other, Chunks):
            return self._len == other._len and tuple(self) == tuple(other)
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Chunks({tuple(self)!r})"

    def replaced(self, items: Mapping[int, object]) -> Chunks:
        """A copy with the item at each position of `items` replaced (positions must exist)."""
        runs = list(self._runs)
        by_run: dict[int, dict[int, object]] = {}
        for index, item in items.items():
            if not 0 <= index < self._len:
                raise IndexError("Chunks index out of range")
            by_run.setdefault(index // self.SIZE, {})[index % self.SIZE] = item
        for number, changes in by_run.items():
            run = list(runs[number])
            for offset, item in changes.items():
                run[offset] = item
            runs[number] = tuple(run)
        new = Chunks.__new__(Chunks)
        new._runs, new._len = tuple(runs), self._len
        return new


def _chunks(items: Sequence) -> Chunks:
    return items if isinstance(items, Chunks) else Chunks(items)


_DELETED = object()
_MISSING = object()


class CowMap(Mapping):
    """A mapping shared by successive snapshots' indexes. A derived index writes into a layer
    of its own over its parent's base, which nobody modifies, so an older snapshot's look-ups
    stay right and an update copies only the keys changed since the last fold; the layer is
    folded into a new base once it holds more than FOLD keys (one full copy per FOLD changes)."""

    FOLD = 256
    __slots__ = ("_base", "_len", "_top")

    def __init__(self, base: dict | None = None):
        self._base = {} if base is None else base  # taken over: the caller keeps no reference
        self._top: dict = {}
        self._len = len(self._base)

    def derive(self) -> CowMap:
        new = CowMap.__new__(CowMap)
        if len(self._top) > self.FOLD:
            new._base, new._top = self.as_dict(), {}
        else:
            new._base, new._top = self._base, dict(self._top)
        new._len = self._len
        return new

    def __getitem__(self, key):
        top = self._top
        if key in top:
            value = top[key]
            if value is _DELETED:
                raise KeyError(key)
            return value
        return self._base[key]

    def get(self, key, default=None):
        top = self._top
        if key in top:
            value = top[key]
            return default if value is _DELETED else value
        return self._base.get(key, default)

    def __contains__(self, key) -> bool:
        top = self._top
        if key in top:
            return top[key] is not _DELETED
        return key in self._base

    def __setitem__(self, key, value) -> None:
        if key not in self:
            self._len += 1
        self._top[key] = value

    def __delitem__(self, key) -> None:
        if key not in self:
            raise KeyError(key)
        self._len -= 1
        if key in self._base:
            self._top[key] = _DELETED
        else:
            del self._top[key]

    def pop(self, key, default=None):
        if key not in self:
            return default
        value = self[key]
        del self[key]
        return value

    def __iter__(self):
        top = self._top
        for key in self._base:
            if key not in top:
                yield key
        for key, value in top.items():
            if value is not _DELETED:
                yield key

    def __len__(self) -> int:
        return self._len

    def changed_keys(self, other: CowMap) -> set | None:
        """The keys whose values differ between this map and `other` when both are layers over
        the same base (only their layers are looked at, not every key); None when they are not."""
        if self._base is not other._base:
            return None
        mine, theirs = self._top, other._top
        # A layer is copied whole by derive(): most of its items are the other's very objects.
        keys = {key for key, value in mine.items() if theirs.get(key, _MISSING) is not value}
        keys.update(theirs.keys() - mine.keys())
        base = self._base
        changed = set()
        for key in keys:
            a = mine[key] if key in mine else base.get(key, _DELETED)
            b = theirs[key] if key in theirs else base.get(key, _DELETED)
            if a is not b and a != b:
                changed.add(key)
        return changed

    def as_dict(self) -> dict:
        """A plain dict of the same items (copied in C, not key by key)."""
        result = dict(self._base)
        for key, value in self._top.items():
            if value is _DELETED:
                del result[key]
            else:
                result[key] = value
        return result


def changed_keys(before: Mapping, after: Mapping) -> set:
    """The keys whose values differ between two mappings: from their layers alone when both are
    CowMaps over the same base, else by comparing every key."""
    if isinstance(before, CowMap) and isinstance(after, CowMap):
        keys = after.changed_keys(before)
        if keys is not None:
            return keys
    return {
        key for key in before.keys() | after.keys() if before.get(key, _DELETED) != after.get(key, _DELETED)
    }


@dataclass
class _Index:
    """Look-ups over one snapshot; a derived snapshot derives its index from the previous one
    instead of walking every view again."""

    by_id: CowMap  # attachment id -> ArrayView
    position: CowMap  # attachment id -> where its view is in `arrays`
    by_label: CowMap  # label -> attachment ids (a tuple)
    by_md: CowMap  # md name -> attachment ids (a tuple)
    by_device: CowMap  # kernel name -> attachment ids (a tuple)
    no_md: frozenset[str]
    attachments_by_target: dict[str, tuple[Attachment, ...]]
    ids_by_target: CowMap  # target -> attachment ids
    sessions_by_target: CowMap  # target -> its sessions by sid
    session_by_name: CowMap
    session_by_host: CowMap  # "host2" -> session name
    session_views: CowMap  # target -> its SessionViews
    stale_by_label: CowMap

    @classmethod
    def of(cls, snapshot: HostSnapshot) -> _Index:
        index = cls(*(CowMap() for _ in range(5)), frozenset(), {}, *(CowMap() for _ in range(6)))
        index.position = CowMap({view.attachment.id: i for i, view in enumerate(snapshot.arrays)})
        for view in snapshot.arrays:
            index.enter(view)
        index.attachments_by_target = _attachments_by_target(snapshot.attachments)
        index.patch_sessions({s.name: s for s in snapshot.iscsi.sessions})
        for view in snapshot.sessions:
            index.session_views[view.target] = (*index.session_views.get(view.target, ()), view)
        index.stale_by_label = CowMap({r.label: r for r in snapshot.stale})
        return index

    def patch_sessions(self, changed: Mapping[str, IscsiSession | None]) -> None:
        """Take over the sessions read again (None: gone), keeping each target's in sid order."""
        for name, session in changed.items():
            before = self.session_by_name.get(name)
            if before is not None:
                del self.session_by_name[name]
                if before.host and self.session_by_host.get(before.host) == name:
                    del self.session_by_host[before.host]
                rest = tuple(s for s in self.sessions_by_target.get(before.target, ()) if s.name != name)
                if rest:
                    self.sessions_by_target[before.target] = rest
                else:
                    self.sessions_by_target.pop(before.target)
            if session is not None:
                self.session_by_name[name] = session
                if session.host:
                    self.session_by_host[session.host] = name
                found = (*self.sessions_by_target.get(session.target, ()), session)
                self.sessions_by_target[session.target] = tuple(sorted(found, key=_sid))

    def enter(self, view: ArrayView) -> None:
        a = view.attachment
        self.by_id[a.id] = view
        md, devices = _view_keys(view)
        _add(self.by_label, (view.label,), a.id)
        _add(self.by_md, md, a.id)
        _add(self.by_device, devices, a.id)
        _add(self.ids_by_target, (a.target,) if a.target else (), a.id)
        if view.md is None:
            self.no_md = self.no_md | {a.id}

    def leave(self, view: ArrayView) -> None:
        a = view.attachment
        del self.by_id[a.id]
        md, devices = _view_keys(view)
        _discard(self.by_label, (view.label,), a.id)
        _discard(self.by_md, md, a.id)
        _discard(self.by_device, devices, a.id)
        _discard(self.ids_by_target, (a.target,) if a.target else (), a.id)
        self.no_md = self.no_md - {a.id}

    def derive(self) -> _Index:
        """The index of a snapshot derived from this one: sharing everything, copying nothing
        but the changes since the last fold (this index is never modified again)."""
        return _Index(
            self.by_id.derive(),
            self.position,
            self.by_label.derive(),
            self.by_md.derive(),
            self.by_device.derive(),
            self.no_md,
            self.attachments_by_target,
            self.ids_by_target.derive(),
            self.sessions_by_target.derive(),
            self.session_by_name.derive(),
            self.session_by_host.derive(),
            self.session_views.derive(),
            self.stale_by_label,
        )


def _sid(session: IscsiSession) -> int:
    return session.sid


def _view_target(view: SessionView) -> str:
    return view.target


def _attachments_by_target(attachments: Iterable[Attachment]) -> dict[str, tuple[Attachment, ...]]:
    by_target: dict[str, list[Attachment]] = {}
    for a in attachments:
        if a.target:
            by_target.setdefault(a.target, []).append(a)
    return {t: tuple(found) for t, found in by_target.items()}


class _Update:
    """HostSnapshot.update, one step at a time: files, md arrays, sessions, then the views they touch."""

    def __init__(self, old: HostSnapshot, paths: HostPaths, changes: Changes):
        self.old = old
        self.paths = paths
        self.changes = changes
        self.index = old._index
        self.sources = dict(old.sources)
        self.files = dict(old.files)
        self.stale_files = old.stale_files
        self.records_error = old.records_error

    def run(self) -> HostSnapshot:
        old, changes = self.old, self.changes
        md_names, session_names = self._names_from_devices()
        attachments, hotplug, stale, stale_changed = self._files()
        md, md_errors, changed_md, md_appeared = self._md(md_names | changes.md)
        iscsi, iscsi_errors, changed_sessions, new_sessions = self._sessions(session_names | changes.sessions)

        index = self.index.derive()
        if new_sessions:
            index.patch_sessions(new_sessions)
        if attachments is not old.attachments:
            index.attachments_by_target = _attachments_by_target(attachments)
        if stale_changed:
            index.stale_by_label = index.stale_by_label.derive()
            for label, record in stale_changed.items():
                if record is None:
                    index.stale_by_label.pop(label)
                else:
                    index.stale_by_label[label] = record

        # Which views to rebuild.
        old_by_id = {a.id: a for a in old.attachments} if attachments is not old.attachments else None
        new_by_id = {a.id: a for a in attachments} if old_by_id is not None else None
        todo: set[str] = set()
        targets: set[str] = set()
        if changes.everything:
            todo.update(self.index.by_id)  # devfs links may have moved too
        if old_by_id is not None and new_by_id is not None:
            for key in old_by_id.keys() | new_by_id.keys():
                before, after = old_by_id.get(key), new_by_id.get(key)
                if before != after:
                    todo.add(key)
                    targets.update(a.target for a in (before, after) if a is not None and a.target)
            if [(a.target, a.portal) for a in old.attachments] != [(a.target, a.portal) for a in attachments]:
                targets.update(index.attachments_by_target)
                targets.update(self.index.attachments_by_target)
        for name in changed_md:
            todo.update(self.index.by_md.get(name, ()))
        if md_appeared:
            todo.update(self.index.no_md)
        for session in changed_sessions:
            targets.add(session)
        for target in targets:
            todo.update(self.index.ids_by_target.get(target, ()))
        for label in stale_changed:
            todo.update(self.index.by_label.get(label, ()))
        stale_by_label = index.stale_by_label
        if new_by_id is not None:
            todo.update(i for i, a in new_by_id.items() if i not in self.index.by_id)
        current = new_by_id if new_by_id is not None else None

        # Rebuild them, keeping every view that reads the same.
        changed: set[str] = set()
        reorder = False
        sessions_by_target = index.sessions_by_target
        for key in todo:
            before_view = self.index.by_id.get(key)
            a = current.get(key) if current is not None else before_view.attachment if before_view else None
            view = None
            if a is not None and a.label is not None:
                view = _view_of(a, md.arrays, sessions_by_target, stale_by_label, self.paths)  # type: ignore[arg-type]
                if before_view is not None and view == before_view:
                    continue
            if before_view is not None:
                index.leave(before_view)
            if view is not None:
                index.enter(view)
            changed.add(key)
            if before_view is None or view is None or view.label != before_view.label:
                reorder = True

        if reorder:
            arrays = Chunks(sorted(index.by_id.values(), key=lambda v: _array_order(v.attachment)))
            index.position = CowMap({v.attachment.id: i for i, v in enumerate(arrays)})
        elif changed:
            arrays = _chunks(old.arrays).replaced({index.position[key]: index.by_id[key] for key in changed})
        else:
            arrays = old.arrays

        sessions, changed_targets = self._session_views(index, targets, attachments)
        snapshot = HostSnapshot(
            taken=time.time(),
            attachments=attachments,
            arrays=arrays,
            sessions=sessions,
            md=md,
            iscsi=iscsi,
            stale=stale,
            hotplug=hotplug,
            sources=self.sources,
            md_errors=md_errors,
            iscsi_errors=iscsi_errors,
            files=self.files,
            stale_files=self.stale_files,
            records_error=self.records_error,
            changed=frozenset(changed),
            changed_targets=frozenset(changed_targets),
            changed_records=frozenset(stale_changed),
            reordered=reorder,
            derived_from=old.taken,
        )
        snapshot.__dict__["_index"] = index
        return snapshot

    def _names_from_devices(self) -> tuple[set[str], set[str]]:
        """md arrays and sessions to re-read for the kernel names an event gave."""
        md: set[str] = set()
        sessions: set[str] = set()
        index = self.index
        for name in self.changes.devices:
            if name.startswith("md"):
                md.add(name)
            elif name.startswith("session"):
                sessions.add(name)
            elif name.startswith("connection"):
                sessions.add("session" + name[len("connection") :].split(":", 1)[0])
            elif name.count(":") == 3:  # a SCSI device H:C:T:L
                host = index.session_by_host.get("host" + name.split(":", 1)[0])
                if host:
                    sessions.add(host)
            elif name.startswith("host") and name in index.session_by_host:
                sessions.add(index.session_by_host[name])
            for key in index.by_device.get(name, ()):
                view = index.by_id[key]
                md.update(_view_keys(view)[0])
                if view.session is not None:
                    sessions.add(view.session.name)
        return md, sessions

    def _files(
        self,
    ) -> tuple[tuple[Attachment, ...], HotplugStats, tuple[StaleRecord, ...], dict[str, StaleRecord | None]]:
        old, paths = self.old, self.paths
        registry = Registry(paths)
        records = StaleRecords(paths)
        everything = self.changes.everything
        attachments, hotplug, stale = old.attachments, old.hotplug, old.stale
        stale_changed: dict[str, StaleRecord | None] = {}
        for name, path in (
            ("registry", registry.directory),
            ("hotplug", registry.stats_path),
            ("stale", records.directory),
        ):
            signature = FileSignature.of(path)
            # A live inotify watch names the record files that changed, whatever the directory's stat.
            watched = name == "stale" and _watching(self.stale_files)
            if not (everything or watched or signature.moved_since(self.files.get(name))):
                continue
            self.files[name] = signature
            if name == "registry":
                new = tuple(_read_registry(self.sources, registry, old.attachments))
                attachments = old.attachments if new == old.attachments else new
            elif name == "hotplug":
                new_stats = _timed(self.sources, name, registry.read_stats, HotplugStats())
                hotplug = old.hotplug if new_stats == old.hotplug else new_stats
            else:
                # Only the record files new or replaced, except on the sweep (the safety net reads
                # every one).
                self.stale_files, found, self.records_error = _read_stale(
                    self.sources, records, old.stale_files, every=everything
                )
                if found is None or everything:  # compare every record
                    before = self.index.stale_by_label
                    after = {r.label: r for r in _records_of(self.stale_files)}
                    found = {label: after.get(label) for label in {*before, *after}}
                    found = {k: v for k, v in found.items() if before.get(k) != v}
                if found:
                    stale = tuple(_patched(old.stale, found, _record_name, lambda label: label + ".json"))
                    stale_changed = found
        return attachments, hotplug, stale, stale_changed

    def _to_read(self, names: set[str], old_errors, known, list_names) -> tuple[set[str], dict]:
        """The names to re-read (on a sweep: every listed and every known one) and the errors
        dict to update (per name; "" = the listing's)."""
        errors = dict(old_errors or {})
        if self.changes.everything:
            listed, listing = list_names(self.paths.sysfs)
            names = names | set(listed) | set(known)
            errors.pop("", None)
            if listing:
                errors[""] = tuple(listing)
        return names, errors

    def _md(self, names: set[str]):
        old = self.old
        sysfs = self.paths.sysfs
        if not names and not self.changes.everything:
            return old.md, old.md_errors, set(), False
        started = time.perf_counter()
        names, errors = self._to_read(names, old.md_errors, old.md.arrays, md_array_names)
        arrays = dict(old.md.arrays)
        changed: set[str] = set()
        appeared = removed = False
        for name in names:
            array, array_errors = read_md_array_errors(sysfs, name)
            before = arrays.get(name)
            if array_errors:
                errors[name] = tuple(array_errors)
            else:
                errors.pop(name, None)
            if array is None:
                if before is not None:
                    del arrays[name]
                    changed.add(name)
                    removed = True
                continue
            if before is None:
                appeared = True
            elif array == before:
                continue
            arrays[name] = array
            changed.add(name)
        if appeared or removed:
            arrays = {name: arrays[name] for name in sorted(arrays)}
        md = MdReadResult(arrays, _flat_errors(errors, sorted))
        self.sources["md"] = SourceResult(time.perf_counter() - started, tuple(md.errors))
        return md, errors, changed, appeared

    def _sessions(self, names: set[str]):
        """The sessions read again: (result, errors, targets whose sessions changed, the new
        session objects by name (None: gone))."""
        old = self.old
        sysfs = self.paths.sysfs
        if not names and not self.changes.everything:
            return old.iscsi, old.iscsi_errors, set(), {}
        started = time.perf_counter()
        names, errors = self._to_read(
            names, old.iscsi_errors, self.index.session_by_name, iscsi_session_names
        )
        by_name = self.index.session_by_name
        changed_targets: set[str] = set()
        new: dict[str, IscsiSession | None] = {}
        for name in names:
            session, session_errors = read_iscsi_session(sysfs, name)
            if session_errors:
                errors[name] = tuple(session_errors)
            else:
                errors.pop(name, None)
            before = by_name.get(name)
            if session == before:
                continue
            for s in (before, session):
                if s is not None:
                    changed_targets.add(s.target)
            new[name] = session
        sessions = _patched(old.iscsi.sessions, new, _sid, session_sid) if new else old.iscsi.sessions
        iscsi = IscsiReadResult(sessions, _flat_errors(errors, lambda ns: sorted(ns, key=session_sid)))
        self.sources["iscsi"] = SourceResult(time.perf_counter() - started, tuple(iscsi.errors))
        return iscsi, errors, changed_targets, new

    def _session_views(
        self, index: _Index, targets: set[str], attachments: tuple[Attachment, ...]
    ) -> tuple[tuple[SessionView, ...], set[str]]:
        old = self.old
        changed: set[str] = set()
        for target in targets:
            before = index.session_views.get(target)
            expected = target in index.attachments_by_target
            if not expected:
                if before is not None:
                    del index.session_views[target]
                    changed.add(target)
                continue
            views = _session_views(
                target, index.sessions_by_target.get(target, ()), index.attachments_by_target[target]
            )
            if before is not None:
                views = [b if b == v else v for b, v in zip(before, views, strict=False)] + views[
                    len(before) :
                ]
            new = tuple(views)
            if new != before or before is None or any(a is not b for a, b in zip(new, before, strict=False)):
                index.session_views[target] = new
                changed.add(target)
        if not changed:
            return old.sessions, changed
        # Each target's views are one run of `sessions` (ordered by target): replace those runs,
        # in place when each keeps its length (a session's state changed), else in a new list.
        replaced = {}
        for target in changed:
            start = bisect.bisect_left(old.sessions, target, key=_view_target)
            end = bisect.bisect_right(old.sessions, target, key=_view_target)
            views = index.session_views.get(target, ())
            if end - start != len(views):
                break
            replaced.update((start + i, view) for i, view in enumerate(views))
        else:
            return _chunks(old.sessions).replaced(replaced), changed
        sessions = list(old.sessions)
        for target in changed:
            start = bisect.bisect_left(sessions, target, key=_view_target)
            end = bisect.bisect_right(sessions, target, key=_view_target)
            sessions[start:end] = index.session_views.get(target, ())
        return Chunks(sessions), changed


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
        return next((arrays[n] for n in md_names_for(paths, a.label) if n in arrays), None)
    return None


def _array_view(
    a: Attachment,
    md: MdArray | None,
    session: IscsiSession | None,
    lun: ScsiLun | None,
    stale: StaleRecord | None,
    paths: HostPaths | None,
    plain_dirs: dict[str, bool] | None = None,
) -> ArrayView:
    members = list(md.members) if md else []
    iscsi_names = {n for n in (a.iscsi_device, lun.block if lun else None) if n}
    local_names = {n for n in (a.local_kernel_name, _kernel_name(a.local_device, paths, plain_dirs)) if n}

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


def _kernel_name(
    device: str | None, paths: HostPaths | None, plain_dirs: dict[str, bool] | None = None
) -> str | None:
    """/dev/vg0/lv → dm-3, resolved under the (possibly injected) devfs. `plain_dirs`: what
    lstat said of devfs's directories (a link or not) so far in this read: every array of a
    full read has its local device in one of a few (vg0/)."""
    if not device or paths is None or not device.startswith("/dev/"):
        return None
    rel = device[len("/dev/") :]
    decided, name = _kernel_name_without_realpath(str(paths.devfs), rel, plain_dirs)
    if decided:
        return name
    try:
        real = os.path.realpath(paths.devfs / rel)
    except OSError:
        return None
    name = os.path.basename(real)
    return name if Path(real).parent == Path(os.path.realpath(paths.devfs)) else None


def _kernel_name_without_realpath(
    devfs: str, rel: str, plain_dirs: dict[str, bool] | None = None
) -> tuple[bool, str | None]:
    """(True, what realpath would give) for the common cases, in two or three syscalls where
    realpath lstats every component of the devfs path too (this runs for every array on a
    full read): a node or a missing name, or a udev link to a node in devfs itself
    (vg0/lv -> ../dm-3), none of whose directories is a link. (False, None) otherwise."""
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return False, None
    try:
        for depth in range(1, len(parts)):
            directory = os.path.join(devfs, *parts[:depth])
            plain = plain_dirs.get(directory) if plain_dirs is not None else None
            if plain is None:
                plain = not stat.S_ISLNK(os.lstat(directory).st_mode)
                if plain_dirs is not None:
                    plain_dirs[directory] = plain
            if not plain:
                return False, None
        target = os.readlink(os.path.join(devfs, rel))
    except FileNotFoundError:  # nothing to resolve: realpath keeps the path as it is
        return True, rel if len(parts) == 1 else None
    except OSError as e:
        if e.errno == errno.EINVAL:  # not a link: the node itself
            return True, rel if len(parts) == 1 else None
        return False, None
    ups = target.split("/")
    while ups and ups[0] == "..":
        ups.pop(0)
    if target.startswith("/") or len(ups) != 1 or ups[0] in ("", "."):
        return False, None
    resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    if resolved != ups[0]:
        return False, None  # the link leads outside devfs or into a subdirectory
    try:
        if stat.S_ISLNK(os.lstat(os.path.join(devfs, resolved)).st_mode):
            return False, None  # a chain of links
    except FileNotFoundError:
        return True, resolved  # dangling: realpath keeps the link's target
    except OSError:
        return False, None
    return True, resolved


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
