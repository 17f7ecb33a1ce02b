"""What every collector shares: reading one pinned snapshot, one-hot gauges.

Collectors follow node_exporter's shape: one per source, each turning parsed
dataclasses (here the core HostSnapshot) into metric families. They never read
the host themselves; the agent reads it once per refresh and every collector of
one exposition renders from that same snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from iscsimple.core.snapshot import HostSnapshot


class SnapshotCollector(Collector):
    """A prometheus_client custom collector rendering from the snapshot `current()` returns."""

    name: str = ""
    # The snapshot sources (HostSnapshot.sources keys) this collector depends on:
    # if one failed, iscsimple_collector_success{collector=name} is 0.
    sources: tuple[str, ...] = ()

    def __init__(self, current: Callable[[], HostSnapshot]):
        self.current = current

    def collect(self) -> Iterator[Metric]:
        return iter(self.families(self.current()))

    def families(self, snapshot: HostSnapshot) -> Iterable[Metric]:
        raise NotImplementedError


def gauge(name: str, documentation: str, labels: Sequence[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


def add_one_hot(
    family: GaugeMetricFamily, labels: list[str], states: Sequence[str], current: str | None
) -> None:
    """One sample per known state, 1 for the current one. An unknown state still gets its own
    sample so it is never silently dropped."""
    for state in states:
        family.add_metric([*labels, state], 1.0 if state == current else 0.0)
    if current is not None and current not in states:
        family.add_metric([*labels, current], 1.0)
