"""The registry of attachments: what iscsimple attached, for whom, and how.

One JSON file per attachment under ``STATE/attachments/`` (default
/run/iscsimple: volatile on purpose, like the arrays it describes), each written
atomically. The hotplug script writes it; the CLI and the agent read it through
this module. Hotplug statistics live beside it in ``hotplug-stats.json``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .atomic import remove_durably, write_atomic
from .errors import InputError, StateFileError
from .files import ensure_dir, load_state_json, load_state_json_at, open_lock_file
from .paths import HostPaths
from .spec import SpecError, check_label, parse_spec

log = logging.getLogger(__name__)

LEG_ISCSI = "iscsi"
LEG_LOCAL = "local"

STATE_ATTACHING = "attaching"
STATE_ATTACHED = "attached"
STATE_DETACHING = "detaching"

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,250}")  # ID.json: a file name (255 bytes at most)


@dataclass(frozen=True)
class OperationResult:
    operation: str  # add | remove | attach | detach | heal | resolve
    result: str  # success | failure
    seconds: float
    at: float
    error: str | None = None


def vm_name(
    domain_name: str | None, domain_id: int | None, *, unknown: str = "", numbered: str = "domain {}"
) -> str:
    """Who a disk belongs to: the VM's name, else its domid as `numbered` ("domain 7"; "{}" for a
    metric label), else `unknown` (attached from the CLI, or the name was never known)."""
    if domain_name:
        return domain_name
    return numbered.format(domain_id) if domain_id is not None else unknown


@dataclass(frozen=True)
class Attachment:
    id: str  # "vbd-<domid>-<devid>" under Xen, "cli-<label or target-lun>" from the CLI
    spec: str
    lun: int
    target: str | None  # None: no iSCSI leg
    label: str | None  # None: a plain LUN handed to Xen without a mirror
    state: str = STATE_ATTACHING
    portal: str | None = None
    iscsi_device: str | None = None  # kernel name, e.g. "sda"
    local_device: str | None = None  # path from the tab file, e.g. "/dev/vg0/vm1"
    local_kernel_name: str | None = None  # e.g. "dm-3": how md names the member
    md_device: str | None = None  # kernel name, e.g. "md127" or "md_vm1-disk"
    md_path: str | None = None  # "/dev/md/LABEL"
    write_mostly_leg: str | None = None  # LEG_ISCSI normally; LEG_LOCAL after `resolve --keep local`
    source_leg: str | None = None  # which leg the array was built from
    domain_id: int | None = None
    domain_name: str | None = None
    vbd: str | None = None  # the guest's device, e.g. "xvda2"
    xenbus_path: str | None = None
    we_logged_in: bool = False  # this attach created the iSCSI session
    # open-iscsi replacement timeout (s) the attach chose for the session: what `status` shows
    replacement_timeout: int | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    last: OperationResult | None = None

    @property
    def device_path(self) -> str | None:
        """What Xen gets: the md device for a mirror, the LUN's device otherwise."""
        if self.label is not None:
            return self.md_path
        return f"/dev/{self.iscsi_device}" if self.iscsi_device else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Attachment:
        """Checked field by field: these values reach iscsiadm/mdadm argv and file paths.

        Raises ValueError naming the first bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        known = _ATTACHMENT_FIELDS
        # Tolerate newer writers. The texts that repeat across thousands of entries (states, legs,
        # portals) become one string each instead of one per entry kept in every snapshot; the
        # others (ids, labels, devices) are one per entry anyway, and interning them would only
        # grow the interpreter's table of interned strings.
        values = {
            k: sys.intern(v) if k in _REPEATED_TEXTS and type(v) is str and len(v) <= 64 else v
            for k, v in data.items()
            if k in known
        }
        for name in ("id", "spec", "lun", "target", "label"):
            if name not in values:
                raise ValueError(f"no {name!r}")
        for name, value in values.items():
            problem = _FIELD_CHECKS[name](value)
            if problem:
                raise ValueError(f"{name} {_short(value)}: {problem}")
        if values.get("last") is not None:
            values["last"] = _operation_result(values["last"])
        return cls(**values)


_ATTACHMENT_FIELDS = frozenset(f.name for f in fields(Attachment))
_REPEATED_TEXTS = frozenset({"state", "portal", "write_mostly_leg", "source_leg", "vbd"})


# -- checks of what a registry entry may hold (it is read back as untrusted input) ----------------

_KERNEL_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}")
_STATE_RE = re.compile(r"[a-z_]{1,32}")
_MAX_TEXT = 4096


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value, *, optional: bool = True) -> str | None:
    if value is None:
        return None if optional else "missing"
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if "\0" in value or len(value) > _MAX_TEXT:
        return "holds a NUL byte or is too long"
    return None


def _shown(value, *, optional: bool = True) -> str | None:
    """Text status and the metrics show as is: no control character (an escape sequence from a
    VM's name would reach the operator's terminal)."""
    problem = _text(value, optional=optional)
    if problem or value is None:
        return problem
    return None if value.isprintable() else "holds a control character"


def _kernel_name(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _KERNEL_NAME_RE.fullmatch(value):
        return "is not a kernel device name (like sda, dm-3, md127)"
    return None


def _absolute_path(value) -> str | None:
    problem = _text(value)
    if problem or value is None:
        return problem
    if (
        not value.isprintable()
        or not value.startswith("/")
        or os.path.normpath(value) != value
        or value.startswith("//")
    ):
        return "is not a normalised absolute path"
    return None


def _count(value, *, optional: bool = True, positive: bool = False) -> str | None:
    if value is None:
        return None if optional else "missing"
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < (1 if positive else 0)
        or value >= 2**64
    ):
        return "must be a whole number" + (" above 0" if positive else " of 0 or more")
    return None


def _time(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "must be a time in seconds"
    return None


def _target(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return "must be a string"
    try:
        spec = parse_spec(value)
    except SpecError as e:
        return str(e)
    return None if spec.target == value else "is not an iSCSI target name"


def _label(value) -> str | None:
    if value is None:
        return None
    try:
        check_label(value, ValueError)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def portal_problem(value) -> str | None:
    """Why `value` is not a portal iscsiadm may be given (None: it is one, or None)."""
    problem = _text(value)
    if problem or value is None:
        return problem
    bad = not value or not value.isprintable() or value.startswith("-") or " " in value
    return "is not a portal (host[:port])" if bad else None


def _one_of(*allowed):
    return lambda value: None if value in allowed else f"must be one of {', '.join(map(str, allowed))}"


_FIELD_CHECKS = {
    "id": lambda v: None if isinstance(v, str) and _ID_RE.fullmatch(v) else "is not an attachment id",
    "spec": lambda v: _shown(v, optional=False),
    "lun": lambda v: _count(v, optional=False),
    "target": _target,
    "label": _label,
    "state": lambda v: None if isinstance(v, str) and _STATE_RE.fullmatch(v) else "is not a state name",
    "portal": portal_problem,
    "iscsi_device": _kernel_name,
    "local_device": _absolute_path,
    "local_kernel_name": _kernel_name,
    "md_device": _kernel_name,
    "md_path": _absolute_path,
    "write_mostly_leg": _one_of(None, LEG_ISCSI, LEG_LOCAL),
    "source_leg": _one_of(None, LEG_ISCSI, LEG_LOCAL),
    "domain_id": _count,
    "domain_name": _shown,
    "vbd": _shown,
    "xenbus_path": _shown,
    "we_logged_in": lambda v: None if isinstance(v, bool) else "must be true or false",
    "replacement_timeout": lambda v: _count(v, positive=True),
    "created": _time,
    "updated": _time,
    "last": lambda v: None if v is None or isinstance(v, dict) else "must be an object",
}


def _operation_result(data: dict) -> OperationResult:
    known = {f.name for f in fields(OperationResult)}
    values = {k: v for k, v in data.items() if k in known}
    for name in ("operation", "result"):
        if not isinstance(values.get(name), str):
            raise ValueError(f"last.{name} must be a string")
    for name in ("seconds", "at"):
        if _time(values.get(name)):
            raise ValueError(f"last.{name} must be a time in seconds")
    if _text(values.get("error")):
        raise ValueError("last.error must be a string")
    return OperationResult(**values)


@dataclass(frozen=True)
class TargetUsers:
    attachments: list[Attachment]
    unreadable: list[str]  # error lines of registry entries that cannot be read


def _cannot_tell(what: str, errors: list[str]) -> str:
    more = f" (and {len(errors) - 1} more unreadable entries)" if len(errors) > 1 else ""
    return (
        f"cannot tell {what}: {errors[0]}{more}; if the disk it described is detached "
        "('iscsimple status' lists what is attached), remove that file and retry"
    )


class BadAttachmentId(InputError, ValueError):
    pass


@dataclass(frozen=True)
class RegistryRead:
    """Every readable attachment, and one line per entry that is not (never silently dropped)."""

    attachments: list[Attachment]
    errors: list[str]


def attachment_id_for_xenbus(xenbus_path: str) -> str:
    """backend/vbd/<domid>/<devid> → vbd-<domid>-<devid>."""
    parts = xenbus_path.strip("/").split("/")
    if len(parts) >= 4 and parts[-4] == "backend":
        return f"{parts[-3]}-{parts[-2]}-{parts[-1]}"
    if len(parts) >= 3:
        return "-".join(parts[-3:])
    return "-".join(parts)


class Registry:
    def __init__(self, paths: HostPaths):
        self.paths = paths
        self.directory = paths.state / "attachments"
        self.stats_path = paths.state / "hotplug-stats.json"

    def _file(self, attachment_id: str) -> Path:
        if not isinstance(attachment_id, str) or not _ID_RE.fullmatch(attachment_id):
            raise BadAttachmentId(
                f"bad attachment id {_short(attachment_id)}: at most 250 letters, digits, '.', '_' and '-' "
                "(from XENBUS_PATH backend/vbd/DOMID/DEVID or the spec)"
            )
        return self.directory / f"{attachment_id}.json"

    def get(self, attachment_id: str) -> Attachment | None:
        """The entry, None when there is none; a corrupt one is a StateFileError naming the file."""
        path = self._file(attachment_id)
        try:
            return self._load(path)
        except FileNotFoundError:
            return None

    def _load(self, path: Path) -> Attachment:
        return self._entry(str(path), path.name, load_state_json(path))

    def _entry(self, path: str, name: str, data: object) -> Attachment:
        try:
            attachment = Attachment.from_dict(data)
        except (ValueError, TypeError) as e:
            raise StateFileError(f"{path}: not a registry entry iscsimple wrote: {e}") from None
        if f"{attachment.id}.json" != name:
            raise StateFileError(f"{path}: holds the entry of {_short(attachment.id)}, not of its own name")
        return attachment

    def put(self, attachment: Attachment) -> Attachment:
        attachment = replace(attachment, updated=time.time())
        try:  # never write an entry that would not be read back (a bad root makes a bad md_path)
            Attachment.from_dict(json.loads(attachment.to_json()))
        except (ValueError, TypeError) as e:
            raise StateFileError(f"refusing to register {attachment.id}: {e}") from None
        self._ensure_dirs()
        write_atomic(self._file(attachment.id), attachment.to_json(), mode=0o644, fsync=False)
        return attachment

    def _ensure_dirs(self) -> None:
        ensure_dir(self.paths.state)
        ensure_dir(self.directory)

    def remove(self, attachment_id: str) -> bool:
        return remove_durably(self._file(attachment_id))

    def list(self) -> list[Attachment]:
        """Every readable attachment; a corrupt entry is logged (read_all reports them)."""
        read = self.read_all()
        for error in read.errors:
            log.warning("unreadable registry entry: %s", error)
        return read.attachments

    def read_all(self) -> RegistryRead:
        """Every attachment, and an error line for each entry that cannot be used.

        The agent reads thousands at start-up: each is opened relative to the directory, and
        the listing's file type stands for the stat before the open (load_state_json_at)."""
        attachments, errors = [], []
        directory = str(self.directory)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return RegistryRead([], [])
        try:
            with os.scandir(dir_fd) as listing:
                entries = sorted(
                    (e for e in listing if e.name.endswith(".json") and not e.name.startswith(".")),
                    key=lambda e: e.name,
                )
            for entry in entries:
                path = f"{directory}/{entry.name}"
                try:
                    attachments.append(self._entry(path, entry.name, load_state_json_at(dir_fd, entry, path)))
                except FileNotFoundError:
                    continue  # removed while we listed
                except StateFileError as e:
                    errors.append(str(e))
        finally:
            os.close(dir_fd)
        return RegistryRead(attachments, errors)

    def by_label(self, label: str) -> Attachment | None:
        """The attachment of LABEL. Raises StateFileError when an entry is unreadable: it may be
        LABEL's, and a mirror attached twice would have two writers (never read as "free")."""
        read = self.read_all()
        found = next((a for a in read.attachments if a.label == label), None)
        if read.errors:
            raise StateFileError(_cannot_tell(f"whether {label} is attached", read.errors))
        return found

    def using_target(self, target: str, exclude: str | None = None) -> list[Attachment]:
        """The attachments on `target`. Raises StateFileError when an entry is unreadable (it may
        use the target: an attach must not take its LUN); `users_of` for callers that must go on."""
        users = self.users_of(target, exclude)
        if users.unreadable:
            raise StateFileError(_cannot_tell(f"which disks use {target}", users.unreadable))
        return users.attachments

    def users_of(self, target: str, exclude: str | None = None) -> TargetUsers:
        """The readable attachments on `target`, and the entries that cannot be read (any may use it)."""
        read = self.read_all()
        return TargetUsers(
            [a for a in read.attachments if a.target == target and a.id != exclude], read.errors
        )

    # -- hotplug statistics -------------------------------------------------

    @contextmanager
    def _stats_lock(self):
        ensure_dir(self.paths.state)
        fd = open_lock_file(self.paths.state / ".hotplug-stats.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read_stats(self) -> HotplugStats:
        """The statistics; a missing or corrupt file counts from zero (with a warning), never fails."""
        try:
            return HotplugStats.from_dict(load_state_json(self.stats_path))
        except FileNotFoundError:
            return HotplugStats()
        except StateFileError as e:  # its message names the file
            log.warning("ignoring unreadable hotplug statistics: %s", e)
            return HotplugStats()
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("ignoring unreadable hotplug statistics %s: %s", self.stats_path, e)
            return HotplugStats()

    @contextmanager
    def timed_operation(self, operation: str) -> Iterator[None]:
        """Count the block as one `operation`, success or failure, with its duration (the agent exports these)."""
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.record_operation(operation, "failure", time.monotonic() - started)
            raise
        self.record_operation(operation, "success", time.monotonic() - started)

    def record_operation(self, operation: str, result: str, seconds: float) -> None:
        """Count one operation. Statistics never fail an operation: a problem is a warning."""
        try:
            with self._stats_lock():
                stats = self.read_stats()
                stats.count(operation, result, seconds)
                write_atomic(
                    self.stats_path, json.dumps(asdict(stats), indent=1, sort_keys=True), fsync=False
                )
        except Exception as e:
            log.warning("cannot record the hotplug statistics in %s: %s", self.stats_path, e)


@dataclass
class HotplugStats:
    # operation → result → count, e.g. {"add": {"success": 3, "failure": 1}}
    totals: dict[str, dict[str, int]] = field(default_factory=dict)
    # operation → seconds the last one took
    last_seconds: dict[str, float] = field(default_factory=dict)
    last_at: dict[str, float] = field(default_factory=dict)

    def count(self, operation: str, result: str, seconds: float) -> None:
        per_result = self.totals.setdefault(operation, {})
        per_result[result] = per_result.get(result, 0) + 1
        self.last_seconds[operation] = round(seconds, 6)
        self.last_at[operation] = time.time()

    @classmethod
    def from_dict(cls, data) -> HotplugStats:
        """Raises ValueError for anything but what `count` writes (a whole file is trusted or not)."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")

        def mapping(name: str) -> dict:
            value = data.get(name, {})
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be an object")
            return value

        def number(value, whole: bool = False):
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
                raise ValueError(f"{_short(value)} is not a {'count' if whole else 'number'}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{_short(value)} is not a count or time")
            return value

        totals = {}
        for op, per_result in mapping("totals").items():
            if not isinstance(per_result, dict):
                raise ValueError(f"totals.{op} must be an object")
            totals[op] = {r: number(n, whole=True) for r, n in per_result.items()}
        return cls(
            totals=totals,
            last_seconds={k: float(number(v)) for k, v in mapping("last_seconds").items()},
            last_at={k: float(number(v)) for k, v in mapping("last_at").items()},
        )
