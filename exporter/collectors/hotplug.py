"""What the hotplug script recorded about its own operations (registry hotplug-stats.json)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import Metric

from iscsimple.core.registry import HotplugStats
from iscsimple.core.snapshot import HostSnapshot

from .base import Part, SnapshotCollector, counter, gauge


class HotplugCollector(SnapshotCollector):
    name = "hotplug"
    sources = ("hotplug",)
    views: frozenset[str] = frozenset()

    def families(self, snapshot: HostSnapshot, part: Part) -> Iterable[Metric]:
        total = counter(
            "iscsimple_hotplug_operations",
            "Hotplug operations block-iscsimple ran since boot, by result. A growing failure count means "
            "VMs fail to start or stop: see the hotplug-error in xenstore and the xl log.",
            labels=["operation", "result"],
        )
        last = gauge(
            "iscsimple_hotplug_last_duration_seconds",
            "How long the last hotplug operation took. libxl gives a hotplug script 40 s before it fails "
            "the device: values near that mean VM starts are about to fail.",
            ["operation"],
        )
        stats = snapshot.hotplug if part.rest else HotplugStats()
        for operation, results in sorted(stats.totals.items()):
            for result in sorted({"success", "failure", *results}):
                total.add_metric([operation, result], float(results.get(result, 0)))
        for operation, seconds in sorted(stats.last_seconds.items()):
            last.add_metric([operation], seconds)
        return total, last
