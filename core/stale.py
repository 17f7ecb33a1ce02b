"""Durable records of iSCSI copies that went stale.

When md fails the iSCSI leg of a running mirror, every later write reaches only
the local leg. From then on the iSCSI copy is stale, and building the array from
it again (the normal attach) would silently overwrite the newer local data. The
agent writes one record per LABEL here, on local disk, fsynced; the hotplug
refuses to attach a LABEL that has one; heal or `iscsimple resolve` clear it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .atomic import remove_durably, write_atomic
from .paths import HostPaths
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

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since))
        vm = self.domain_name or (
            f"domain {self.domain_id}" if self.domain_id is not None else "an unknown VM"
        )
        return f"since {when} the local leg of {self.label} ({vm}) holds writes its iSCSI copy lacks ({self.reason})"


class StaleRecords:
    def __init__(self, paths: HostPaths):
        self.directory = paths.records / "stale"

    def path(self, label: str) -> Path:
        check_label(label, ValueError)
        return self.directory / f"{label}.json"

    def get(self, label: str) -> StaleRecord | None:
        try:
            data = json.loads(self.path(label).read_text())
        except FileNotFoundError:
            return None
        known = {f.name for f in fields(StaleRecord)}
        return StaleRecord(**{k: v for k, v in data.items() if k in known})

    def put(self, record: StaleRecord) -> None:
        """Write once: the first sighting is the one that matters, so an existing record is kept."""
        if self.get(record.label) is None:
            write_atomic(
                self.path(record.label), json.dumps(asdict(record), indent=1, sort_keys=True), mode=0o600
            )

    def clear(self, label: str) -> bool:
        return remove_durably(self.path(label))

    def list(self) -> list[StaleRecord]:
        # Only "no records yet" is empty; an unreadable directory must surface, not look like "no stale copies".
        try:
            names = sorted(
                n[: -len(".json")]
                for n in os.listdir(self.directory)
                if n.endswith(".json") and not n.startswith(".")
            )
        except FileNotFoundError:
            return []
        return [r for r in (self.get(n) for n in names) if r is not None]
