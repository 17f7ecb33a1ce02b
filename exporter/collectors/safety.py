"""Data safety (exporter/safety.py): stale iSCSI copies, the heals of them, the write-intent
bitmaps, and what the other hosts' cross-host guards ask about (core/cluster.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client.core import Metric

from iscsimple.core.registry import Attachment, vm_name
from iscsimple.core.safety import migrate_blockers
from iscsimple.core.snapshot import HostSnapshot, changed_keys
from iscsimple.core.stale import StaleRecord

from ..safety import Safety
from .base import Context, Part, SnapshotCollector, counter, gauge


class SafetyCollector(SnapshotCollector):
    name = "safety"
    sources = ("registry", "stale")
    views = frozenset({"arrays"})

    def __init__(self, current: Callable[[], HostSnapshot], safety: Safety):
        super().__init__(current)
        self.safety = safety
        self._rendered: Mapping[str, StaleRecord] | None = None  # the standing records rendered last
        self._host_of: tuple[object, str] | None = None
        # The records of labels without an array, and the plain (unmirrored) attachments: the
        # snapshot and records they were found in, so a refresh looks only at what changed.
        self._orphans: tuple[HostSnapshot, Mapping[str, StaleRecord], list[str]] | None = None
        self._plain: tuple[tuple[Attachment, ...], list[Attachment]] | None = None
        self._last_changed: tuple[Mapping, Mapping, set[str]] | None = None
        # Whether the records directory could not be read when the arrays were rendered last: every
        # array's safe_to_migrate depends on it, though no view changes with it.
        self._records_unknown: bool | None = None

    def _host(self) -> str:
        # ClusterSettings.host asks the kernel each time (gethostname): once per setting here.
        settings = self.safety.healer.cluster
        if self._host_of is None or self._host_of[0] is not settings:
            self._host_of = (settings, settings.host)
        return self._host_of[1]

    @classmethod
    def create(cls, context: Context) -> SafetyCollector:
        return cls(context.current, context.safety)

    def dirty(self, snapshot: HostSnapshot) -> tuple[set[str] | None, set[str] | None]:
        standing = self.safety.standing_for(snapshot)
        before, self._rendered = self._rendered, standing
        bitmaps = self.safety.bitmap_changes
        unknown, self._records_unknown = self._records_unknown, snapshot.records_error is not None
        if before is None or bitmaps is None or unknown != self._records_unknown:
            return None, set()
        # The records carried over from pass to pass share their layers: what changed is found
        # from those, not by comparing every standing record.
        return self._changed(before, standing) | bitmaps, set()

    def _changed(self, before: Mapping[str, StaleRecord], after: Mapping[str, StaleRecord]) -> set[str]:
        """changed_keys(before, after), once per pair (dirty and the orphans ask for the same)."""
        last = self._last_changed
        if last is None or last[0] is not before or last[1] is not after:
            last = self._last_changed = (before, after, changed_keys(before, after))
        return last[2]

    def families(self, snapshot: HostSnapshot, part: Part) -> Iterable[Metric]:
        standing = self.safety.standing_for(snapshot)
        stale = gauge(
            "iscsimple_array_iscsi_stale",
            "1 while a stale-copy record stands for this LABEL: the local leg holds writes its iSCSI copy "
            "lacks, on this host only. Do not migrate, stop or move the VM, nor start it on another "
            "host, until the mirror is healed (the record is cleared then).",
            ["label", "domain"],
        )
        for view in part.arrays:
            if snapshot.array(view.label) is view:  # one sample per LABEL
                stale.add_metric([view.label, view.domain], 1.0 if view.label in standing else 0.0)
        for label in self._orphaned(snapshot, standing) if part.rest else ():
            # VM stopped or host rebooted: the record still matters
            record = standing[label]
            domain = vm_name(record.domain_name, record.domain_id, numbered="{}")
            stale.add_metric([label, domain], 1.0)
        yield stale
        yield from self._cluster_families(snapshot, part, standing)

        healer = self.safety.healer
        operations = counter(
            "iscsimple_heal_operations_total",
            "Heals of stale iSCSI copies by result: success (leg re-added, recovering from the local "
            "leg), failure (an mdadm call failed), aborted (the leg failed again before its recovery "
            "completed), skipped_<reason> (held back: session down, device not ready, backoff, ...); "
            "mode: full (the whole disk), partial (only the chunks the write-intent bitmap marks), "
            "none (skipped).",
            labels=["result", "mode"],
        )
        for (result, mode), count in sorted(healer.counts.items()) if part.rest else ():
            operations.add_metric([result, mode], float(count))
        yield operations
        resumes = counter(
            "iscsimple_recovery_resumes_total",
            "Restarts of a local leg's recovery from iSCSI that an iSCSI outage had stopped (the leg left "
            "as an idle spare, iscsimple_array_recovery_stopped): success (spare removed and added again, "
            "it recovers from the iSCSI leg), failure (an mdadm call failed), aborted (stopped again before "
            "it completed), skipped_<reason> (held back: session down, device not ready, backoff, ...).",
            labels=["result"],
        )
        for result, count in sorted(healer.resumes.items()) if part.rest else ():
            resumes.add_metric([result], float(count))
        yield resumes
        checks = counter(
            "iscsimple_heal_checks_total",
            "Compares of the two legs md was asked for when a heal completed ([heal] check_after): "
            "started, failed (md was busy or the request failed). What a check found: "
            "iscsimple_array_mismatch_sectors.",
            labels=["result"],
        )
        for result, count in sorted(healer.checks.items()) if part.rest else ():
            checks.add_metric([result], float(count))
        yield checks
        enabled = gauge(
            "iscsimple_heal_enabled",
            "1 when the agent re-adds a returned iSCSI leg by itself ([heal] enabled in the config); 0: "
            "stale copies wait for `iscsimple resolve`.",
            [],
        )
        if part.rest:
            enabled.add_metric([], 1.0 if healer.enabled else 0.0)
        yield enabled
        yield from self._bitmaps(snapshot, part)

    def _orphaned(self, snapshot: HostSnapshot, standing: Mapping[str, StaleRecord]) -> list[str]:
        """The standing records' labels that have no array, sorted. Found again only when the
        set of arrays changed (a derived snapshot that did not reorder its arrays has the same
        labels); otherwise only the labels whose record changed are looked at."""
        cached = self._orphans
        if cached is None or not (
            cached[0] is snapshot
            or (snapshot.changed_since(cached[0]) is not None and not snapshot.reordered)
        ):
            orphans = [label for label in sorted(standing) if snapshot.array(label) is None]
        elif cached[1] is standing:
            orphans = cached[2]
        else:
            moved = self._changed(cached[1], standing)
            if moved:
                kept = set(cached[2]) - moved
                kept.update(label for label in moved if label in standing and snapshot.array(label) is None)
                orphans = sorted(kept)
            else:
                orphans = cached[2]
        self._orphans = (snapshot, standing, orphans)
        return orphans

    def _plain_attachments(self, snapshot: HostSnapshot) -> list[Attachment]:
        if self._plain is None or self._plain[0] is not snapshot.attachments:
            self._plain = (snapshot.attachments, [a for a in snapshot.attachments if a.label is None])
        return self._plain[1]

    def _bitmaps(self, snapshot: HostSnapshot, part: Part) -> Iterable[Metric]:
        state = self.safety.state
        by_label = state.bitmap_by_label if state.taken == snapshot.taken else {}
        active = gauge(
            "iscsimple_array_bitmap",
            "1 while md keeps the write-intent bitmap file this host built the mirror with (a heal can "
            "then copy only what changed in an outage); 0: none, or md dropped it (its kernel log says "
            "so; /proc/mdstat still shows it): every heal copies the whole disk.",
            ["label"],
        )
        dirty = gauge(
            "iscsimple_array_out_of_sync_bytes",
            "While the mirror is degraded: chunks its bitmap marks as written since the iSCSI leg last "
            "had them, times the chunk size (what a partial heal copies). 0 when not degraded.",
            ["label"],
        )
        eta = gauge(
            "iscsimple_array_heal_eta_seconds",
            "While the iSCSI leg recovers: the marked bytes the recovery has still to copy, divided by "
            "md's current speed.",
            ["label"],
        )
        for view in part.arrays:
            b = by_label.get(view.label) if view.md is not None else None
            if b is None or snapshot.array(view.label) is not view:
                continue
            active.add_metric([b.label], 1.0 if b.active else 0.0)
            if b.out_of_sync_bytes is not None:
                dirty.add_metric([b.label], float(b.out_of_sync_bytes))
            if b.heal_eta_seconds is not None:
                eta.add_metric([b.label], b.heal_eta_seconds)
        yield active
        yield dirty
        yield eta

    def _cluster_families(
        self, snapshot: HostSnapshot, part: Part, standing: Mapping[str, StaleRecord]
    ) -> Iterable[Metric]:
        """What the other hosts' guards ask Prometheus about (core/cluster.py), and the guard's health."""
        host = self._host()
        lun_labels = ["host", "target", "lun", "label", "domain"]
        since = gauge(
            "iscsimple_lun_stale_since_seconds",
            "Present while a stale-copy record stands for the mirror of this target and LUN on this host: "
            "when (Unix time) the local leg started holding writes the iSCSI copy lacks. Other hosts' "
            "attach refuses this LUN while it is reported (cross-host guard).",
            lun_labels,
        )
        # A record with its array's part (cached with it), then those of arrays gone. Samples are
        # added while the part's views are iterated, each in its view's turn (exposition splits
        # the samples of several views by turn).
        for view in part.arrays:
            if snapshot.array(view.label) is view:
                _add_since(since, host, view.label, standing.get(view.label))
        for label in self._orphaned(snapshot, standing) if part.rest else ():
            _add_since(since, host, label, standing[label])
        yield since
        attached = gauge(
            "iscsimple_lun_attached",
            "1 for each iSCSI LUN attached on this host (a mirror or a plain disk). Another host's heal "
            "or resolve never writes onto a LUN reported here.",
            lun_labels,
        )
        # A mirror's LUN with its array (cached with it), then the plain LUNs.
        for view in part.arrays:
            _add_attached(attached, host, view.attachment)
        for a in self._plain_attachments(snapshot) if part.rest else ():
            _add_attached(attached, host, a)
        yield attached
        safe = gauge(
            "iscsimple_array_safe_to_migrate",
            "1 when the VM using this mirror may move to another host now: the iSCSI leg is in sync, "
            "its session is up and no stale record stands (`iscsimple migrate-check` says why not).",
            ["label", "domain"],
        )
        records_error = snapshot.records_error
        for view in part.arrays:
            blocked = migrate_blockers(view, standing.get(view.label), records_error)
            safe.add_metric([view.label, view.domain], 0.0 if blocked else 1.0)
        yield safe
        readable = gauge(
            "iscsimple_stale_records_readable",
            "1 when the agent's last read of the stale-copy records directory (records/stale) succeeded. "
            "0: it cannot tell whether an iSCSI copy is stale beyond the records it read before, so no "
            "array is safe to migrate (iscsimple_array_safe_to_migrate 0) until it can; the agent's log "
            "and `iscsimple status` say why.",
            [],
        )
        if part.rest:
            readable.add_metric([], 0.0 if records_error is not None else 1.0)
        yield readable
        probe = self.safety.probe
        configured = gauge(
            "iscsimple_cluster_guard_configured",
            "1 when [cluster] prometheus_url is set: attach asks Prometheus whether another host holds "
            "newer writes of the LUN. 0: the cross-host guard is off.",
            [],
        )
        if part.rest:
            configured.add_metric([], 1.0 if probe.settings.configured else 0.0)
        yield configured
        if probe.settings.configured and probe.reachable is not None:
            reachable = gauge(
                "iscsimple_cluster_guard_reachable",
                "1 when the guard's Prometheus answered the last probe (every 30 s). 0: attaches follow "
                "[cluster] on_unreachable (refuse by default).",
                [],
            )
            if part.rest:
                reachable.add_metric([], 1.0 if probe.reachable else 0.0)
            yield reachable
            if probe.seconds is not None:
                seconds = gauge(
                    "iscsimple_cluster_guard_query_seconds",
                    "How long the guard's last probe query to Prometheus took.",
                    [],
                )
                if part.rest:
                    seconds.add_metric([], probe.seconds)
                yield seconds


def _add_since(since, host: str, label: str, record: StaleRecord | None) -> None:
    if record is not None and record.target is not None:
        domain = vm_name(record.domain_name, record.domain_id, numbered="{}")
        since.add_metric([host, record.target, str(record.lun or 0), label, domain], record.since)


def _add_attached(attached, host: str, a: Attachment) -> None:
    if a.target is not None:
        attached.add_metric([host, a.target, str(a.lun), a.label or "", a.domain_name or ""], 1.0)
