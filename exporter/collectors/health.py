"""The health checker's verdicts (exporter/health.py): stalled syncs, write-mostly on the
wrong leg, flapping sessions."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import Metric

from iscsimple.core.snapshot import HostSnapshot

from ..health import HealthChecker, HealthReport
from .base import Context, Part, SnapshotCollector, counter, gauge


class HealthCollector(SnapshotCollector):
    """Exports the HealthReport of the snapshot just observed."""

    name = "health"
    sources = ()

    def __init__(self, current: Callable[[], HostSnapshot], checker: HealthChecker):
        super().__init__(current)
        self.checker = checker
        self._rendered: HealthReport | None = None

    @classmethod
    def create(cls, context: Context) -> HealthCollector:
        return cls(context.current, context.health)

    def dirty(self, snapshot: HostSnapshot) -> tuple[set[str] | None, set[str] | None]:
        report, before = self.checker.report, self._rendered
        self._rendered = report
        if before is None:
            return None, None
        if report is before:
            return set(), set()
        labels = set(report.stalled ^ before.stalled) | set(
            report.write_mostly_wrong ^ before.write_mostly_wrong
        )
        keys = set(report.flapping ^ before.flapping)
        for key in report.session_changes.keys() | before.session_changes.keys():
            if report.session_changes.get(key) != before.session_changes.get(key):
                keys.add(key)
        return labels, {target for target, _ in keys}

    def families(self, snapshot: HostSnapshot, part: Part) -> Iterable[Metric]:
        report = self.checker.report
        stalled = gauge(
            "iscsimple_array_sync_stalled",
            "1 when the array's resync/recovery has not advanced for the agent's stall time: the mirror "
            "will not become whole by itself. Check the leg being written and the md log in dmesg.",
            ["label"],
        )
        wrong = gauge(
            "iscsimple_array_write_mostly_wrong",
            "1 when write-mostly is on the wrong leg (the local one): VM reads cross the network. Fix it "
            "with: echo -writemostly > /sys/block/MD/md/dev-LOCAL/state, then writemostly on the iSCSI leg.",
            ["label"],
        )
        flapping = gauge(
            "iscsimple_iscsi_session_flapping",
            "1 when the session went up/down repeatedly within the agent's flap window: a bad network "
            "path or target; mirrors on it may go in and out of local-only.",
            ["target", "portal"],
        )
        changes = counter(
            "iscsimple_iscsi_session_changes",
            "Session up/down changes the agent saw (catches flaps shorter than the scrape interval).",
            labels=["target", "portal"],
        )
        for view in part.arrays:
            if view.md is None:
                continue
            stalled.add_metric([view.label], 1.0 if view.label in report.stalled else 0.0)
            wrong.add_metric([view.label], 1.0 if view.label in report.write_mostly_wrong else 0.0)
        for view in part.sessions:
            key = (view.target, view.portal)
            flapping.add_metric(list(key), 1.0 if key in report.flapping else 0.0)
            changes.add_metric(list(key), float(report.session_changes.get(key, 0)))
        return stalled, wrong, flapping, changes
