"""Durable records of iSCSI copies that went stale.

When md fails the iSCSI leg of a running mirror, every later write reaches only
the local leg. From then on the iSCSI copy is stale, and building the array from
it again (the normal attach) would silently overwrite the newer local data. The
agent writes one record per LABEL here, on local disk, fsynced; the hotplug
refuses to attach a LABEL that has one; heal or `iscsimple resolve` clear it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from .atomic import remove_durably, write_atomic
from .dirwatch import DirWatch
from .errors import StateFileError, time_text
from .files import ensure_dir, load_state_json_in, open_state_dir
from .paths import HostPaths
from .registry import vm_name
from .spec import check_label


@dataclass(frozen=True)
class StaleRecord:
    label: str
    since: float  # when the iSCSI leg was seen failed or gone
    md_device: str | None
    domain_name: str | None
    domain_id: int | None
    target: str | None
    lun: int | None
    iscsi_device: str | None
    local_device: str | None
    reason: str  # plain words: what was seen
    recorded: float = field(default_factory=time.time)
    # The file is there but could not be read: stale all the same, with unknown details.
    unreadable: bool = False
    # Where `since` comes from: the earliest evidence the host had when the record was written
    # (the kernel log's md or session line, else when the agent or the hotplug remove saw it).
    since_source: str = "unknown (written before iscsimple said)"

    def describe(self) -> str:
        when = time_text(self.since)
        vm = vm_name(self.domain_name, self.domain_id, unknown="an unknown VM")
        return f"since {when} the local leg of {self.label} ({vm}) holds writes its iSCSI copy lacks ({self.reason})"


class StaleRecords:
    def __init__(self, paths: HostPaths):
        self.directory = paths.records / "stale"

    def path(self, label: str) -> Path:
        check_label(label, ValueError)
        return self.directory / f"{label}.json"

    def get(self, label: str) -> StaleRecord | None:
        """The record of `label`, None when there is none.

        A record that is there but cannot be read (garbage, a directory, a symlink, wrong
        fields) still means "the iSCSI copy of LABEL is stale": it comes back as a record
        with unknown details that names the file, never as None."""
        path = self.path(label)
        try:
            fd = self._open()
        except FileNotFoundError:
            return None  # no records directory (yet): no record
        except OSError as e:
            # A directory that is a symlink, a file, unreadable: whether LABEL has a record is
            # unknown, so it has one (details unknown), never none.
            return _unreadable(label, path, e)
        try:
            return self._get_in(fd, label)
        finally:
            os.close(fd)

    def _open(self) -> int:
        """The records directory, reached through no symlink (neither it nor the records root,
        which iscsimple makes too): one planted there is refused, not followed."""
        return open_state_dir(self.directory, levels=1)

    def _get_in(self, fd: int, label: str) -> StaleRecord | None:
        path = self.path(label)
        try:
            return _record_from(load_state_json_in(fd, f"{label}.json", path), label)
        except FileNotFoundError:
            return None
        except (StateFileError, ValueError, TypeError) as e:
            return _unreadable(label, path, e)

    def put(self, record: StaleRecord) -> StaleRecord:
        """Write once: the first sighting is the one that matters, so an existing record is kept.
        Returns the record that stands (the one found, else `record`). A records directory that
        cannot be read (a symlink, a file) raises: nothing is written there, nor read as a record."""
        try:
            fd = self._open()
        except FileNotFoundError:
            existing = None
        else:
            try:
                existing = self._get_in(fd, record.label)
            finally:
                os.close(fd)
        if existing is not None:
            return existing
        ensure_dir(self.directory.parent)
        ensure_dir(self.directory)
        write_atomic(
            self.path(record.label), json.dumps(_fields_of(record), indent=1, sort_keys=True), mode=0o600
        )
        return record

    def clear(self, label: str) -> bool:
        return remove_durably(self.path(label))

    def list(self) -> list[StaleRecord]:
        return self.read_all()[0]

    def read_all(self) -> tuple[list[StaleRecord], list[str]]:
        """Every record (unreadable ones as "details unknown") and a line per problem.

        Only "no records yet" is empty; an unreadable directory raises, and one bad record never
        hides the others: each is a data-safety signal."""
        files, _ = self.read_moved(None)
        return [files.files[name] for name in sorted(files.files)], files.errors

    def read_moved(self, known: RecordFiles | None) -> tuple[RecordFiles, dict[str, StaleRecord | None]]:
        """The records directory again, reading only the files that are new or were replaced
        since `known` (their inode, from the listing, differs: iscsimple writes a record by
        renaming a new file over it), and what changed by label (None: the record is gone).
        With `known` None every file is read. A file edited in place keeps its inode: the full
        sweep (read_moved(None)) finds it."""
        try:
            listing = self._inodes()
        except FileNotFoundError:
            listing = {}
        if known is None:
            known = RecordFiles()
            moved = set(listing)
        else:
            moved = {name for name, _ in listing.items() - known.inodes.items()}
        return self._reread(known, listing, moved, known.inodes.keys() - listing.keys())

    def read_watched(
        self, known: RecordFiles, every: bool = False
    ) -> tuple[RecordFiles, dict[str, StaleRecord | None]]:
        """read_moved(known), told by inotify which files to look at instead of listing the
        directory: what one changed record costs does not grow with how many records stand.
        The watch travels with the RecordFiles; when there is none yet, it died (queue
        overflow, directory replaced) or `known` is not what it last answered for, a new one
        is started and the directory listed. Where inotify is unavailable, the RecordFiles
        says so (its watch is not alive) and the caller lists only when the directory moved.
        `every`: read every file (the sweep, the safety net for what a watch could miss)."""
        watch = known.watch
        fresh = watch is not None and watch.serial == known.serial and not every
        names = watch.take() if fresh and watch is not None else None
        if names is not None:
            found = self._named_inodes(names, known)
            if found is not None:
                listing, gone = found
                files, changed = self._reread(known, listing, set(listing), gone)
                return files.watched_by(watch), changed
        if watch is None or not watch.alive:
            watch = DirWatch.start(self.directory) or DirWatch.dead(self.directory)
        else:
            watch.take()  # the listing below covers what it says
        # After the watch starts: nothing is missed.
        files, changed = self.read_moved(None if every else known)
        return files.watched_by(watch), changed

    def _named_inodes(
        self, names: Iterable[str], known: RecordFiles
    ) -> tuple[dict[str, int], set[str]] | None:
        """The inodes of the record files among `names` and the known ones gone; None when a
        name cannot be looked at (then the directory is listed)."""
        listing: dict[str, int] = {}
        gone: set[str] = set()
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue  # as _inodes: write_atomic's temporary files are not records
            try:
                listing[name] = os.lstat(self.directory / name).st_ino
            except FileNotFoundError:
                if name in known.inodes:
                    gone.add(name)
            except OSError:
                return None
        return listing, gone

    def _reread(
        self, known: RecordFiles, listing: Mapping[str, int], moved: set[str], gone: Iterable[str]
    ) -> tuple[RecordFiles, dict[str, StaleRecord | None]]:
        """`known` with the `moved` files read again (their inodes from `listing`) and the
        `gone` ones dropped, and what changed by label."""
        if not moved and not gone:
            return known, {}
        fd = self._open() if moved else None
        try:
            return self._reread_in(fd, known, listing, moved, gone)
        finally:
            if fd is not None:
                os.close(fd)

    def _reread_in(
        self,
        fd: int | None,
        known: RecordFiles,
        listing: Mapping[str, int],
        moved: set[str],
        gone: Iterable[str],
    ) -> tuple[RecordFiles, dict[str, StaleRecord | None]]:
        files, problems, inodes = dict(known.files), dict(known.problems), dict(known.inodes)
        changed: dict[str, StaleRecord | None] = {}
        for name in gone:
            inodes.pop(name, None)
            problems.pop(name, None)
            before = files.pop(name, None)
            if before is not None:
                changed[before.label] = None
        for name in moved:
            before = files.pop(name, None)
            problems.pop(name, None)
            inodes[name] = listing[name]
            found = self._read_file(fd, name)
            if isinstance(found, str):
                problems[name] = found
            elif found is None:
                del inodes[name]  # cleared while we listed
            else:
                files[name] = found
                if found.unreadable:
                    problems[name] = found.reason
            after = found if isinstance(found, StaleRecord) else None
            if before is not None and after is None:
                changed[before.label] = None
            elif after is not None and before != after:
                changed[after.label] = after
        return RecordFiles(files, inodes, problems), changed

    def _inodes(self) -> dict[str, int]:
        fd = self._open()
        try:
            with os.scandir(fd) as entries:
                return {
                    e.name: e.inode()
                    for e in entries
                    if e.name.endswith(".json") and not e.name.startswith(".")
                }
        finally:
            os.close(fd)

    def _read_file(self, fd: int | None, name: str) -> StaleRecord | str | None:
        """One record file; a problem line when its name is not a record's; None when it is gone."""
        label = name[: -len(".json")]
        try:
            check_label(label, ValueError)
        except ValueError as e:
            return f"{self.directory / name}: not a record iscsimple writes ({e})"
        assert fd is not None
        return self._get_in(fd, label)


_SERIALS = itertools.count()


@dataclass(frozen=True)
class RecordFiles:
    """The records directory as last read: each record by file name, the inode each name had
    in the listing, and the problem line of each name that is not a readable record."""

    files: Mapping[str, StaleRecord] = field(default_factory=dict)
    inodes: Mapping[str, int] = field(default_factory=dict)
    problems: Mapping[str, str] = field(default_factory=dict)
    # The inotify watch of the directory (StaleRecords.read_watched) and which answer of it this is.
    watch: DirWatch | None = field(default=None, compare=False, repr=False)
    serial: int = field(default_factory=lambda: next(_SERIALS), compare=False, repr=False)

    def watched_by(self, watch: DirWatch) -> RecordFiles:
        """This state, as `watch`'s latest answer (what its next take() is relative to)."""
        if self.watch is not watch:
            self = RecordFiles(self.files, self.inodes, self.problems, watch)
        watch.serial = self.serial
        return self

    @property
    def errors(self) -> list[str]:
        """The problems by file name."""
        return [self.problems[name] for name in sorted(self.problems)]


UNKNOWN = "details unknown"


def _fields_of(record: StaleRecord) -> dict:
    """asdict without its deep copy (every field is a number, a string or None)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


def _record_from(data, label: str) -> StaleRecord:
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    known = {f.name for f in fields(StaleRecord)} - {"unreadable"}
    values = {k: v for k, v in data.items() if k in known}
    if values.get("label") != label:
        raise ValueError(f"it names LABEL {values.get('label')!r}, not {label!r}")
    for name in ("since", "recorded"):
        value = values.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} is not a time")
    for name in ("md_device", "domain_name", "target", "iscsi_device", "local_device", "reason"):
        value = values.get(name)
        if value is not None and (not isinstance(value, str) or not value.isprintable() or len(value) > 4096):
            raise ValueError(f"{name} is not a line of text")
    for name in ("domain_id", "lun"):
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} is not a whole number")
    source = values.pop("since_source", None)
    if source is not None:
        if not isinstance(source, str) or not source.isprintable() or len(source) > 4096:
            raise ValueError("since_source is not a line of text")
        values["since_source"] = source
    if "since" not in values or "reason" not in values:
        raise ValueError("since or reason is missing")
    values.setdefault("md_device", None)
    for name in ("domain_name", "domain_id", "target", "lun", "iscsi_device", "local_device"):
        values.setdefault(name, None)
    return StaleRecord(**values)


def _unreadable(label: str, path: Path, error: Exception) -> StaleRecord:
    """Stale, details unknown: the file's time stands in for when it was written."""
    try:
        since = os.lstat(path).st_mtime
    except OSError:
        since = time.time()
    detail = str(error)
    if not detail.startswith(str(path)):
        detail = f"{path}: {detail}"
    return StaleRecord(
        label=label,
        since=since,
        md_device=None,
        domain_name=None,
        domain_id=None,
        target=None,
        lun=None,
        iscsi_device=None,
        local_device=None,
        reason=f"record unreadable, {UNKNOWN}: {detail}",
        recorded=since,
        unreadable=True,
        since_source="the record file's time (the record is unreadable)",
    )
