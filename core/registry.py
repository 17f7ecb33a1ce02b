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
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .atomic import remove_durably, write_atomic
from .paths import HostPaths

log = logging.getLogger(__name__)

LEG_ISCSI = "iscsi"
LEG_LOCAL = "local"

STATE_ATTACHING = "attaching"
STATE_ATTACHED = "attached"
STATE_DETACHING = "detaching"

_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class OperationResult:
    operation: str  # add | remove | attach | detach | heal | resolve
    result: str  # success | failure
    seconds: float
    at: float
    error: str | None = None


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
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}  # tolerate newer writers
        if values.get("last") is not None:
            values["last"] = OperationResult(**values["last"])
        return cls(**values)


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
        if not _ID_RE.fullmatch(attachment_id):
            raise ValueError(f"bad attachment id {attachment_id!r}")
        return self.directory / f"{attachment_id}.json"

    def get(self, attachment_id: str) -> Attachment | None:
        try:
            return Attachment.from_dict(json.loads(self._file(attachment_id).read_text()))
        except FileNotFoundError:
            return None

    def put(self, attachment: Attachment) -> Attachment:
        attachment = replace(attachment, updated=time.time())
        write_atomic(self._file(attachment.id), attachment.to_json(), mode=0o644, fsync=False)
        return attachment

    def remove(self, attachment_id: str) -> bool:
        return remove_durably(self._file(attachment_id))

    def list(self) -> list[Attachment]:
        """Every readable attachment; a corrupt file is logged and skipped, never fatal."""
        attachments = []
        for path in self._files():
            try:
                attachments.append(Attachment.from_dict(json.loads(path.read_text())))
            except FileNotFoundError:
                continue  # removed while we listed
            except (ValueError, TypeError) as e:
                log.warning("ignoring unreadable registry entry %s: %s", path, e)
        return attachments

    def _files(self) -> Iterator[Path]:
        try:
            entries = sorted(self.directory.iterdir())
        except FileNotFoundError:
            return
        for path in entries:
            if path.suffix == ".json" and not path.name.startswith("."):
                yield path

    def by_label(self, label: str) -> Attachment | None:
        return next((a for a in self.list() if a.label == label), None)

    def using_target(self, target: str, exclude: str | None = None) -> list[Attachment]:
        return [a for a in self.list() if a.target == target and a.id != exclude]

    # -- hotplug statistics -------------------------------------------------

    @contextmanager
    def _stats_lock(self):
        self.paths.state.mkdir(parents=True, exist_ok=True)
        with open(self.paths.state / ".hotplug-stats.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def read_stats(self) -> HotplugStats:
        try:
            return HotplugStats.from_dict(json.loads(self.stats_path.read_text()))
        except FileNotFoundError:
            return HotplugStats()
        except (ValueError, TypeError) as e:
            log.warning("ignoring unreadable %s: %s", self.stats_path, e)
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
        with self._stats_lock():
            stats = self.read_stats()
            stats.count(operation, result, seconds)
            write_atomic(self.stats_path, json.dumps(asdict(stats), indent=1, sort_keys=True), fsync=False)


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
    def from_dict(cls, data: dict) -> HotplugStats:
        return cls(
            totals={
                str(op): {str(r): int(n) for r, n in res.items()}
                for op, res in data.get("totals", {}).items()
            },
            last_seconds={str(k): float(v) for k, v in data.get("last_seconds", {}).items()},
            last_at={str(k): float(v) for k, v in data.get("last_at", {}).items()},
        )
