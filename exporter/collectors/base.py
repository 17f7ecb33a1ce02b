"""What every collector shares: reading one pinned snapshot, one-hot gauges, parts.

Collectors follow node_exporter's shape: one per source, each turning parsed
dataclasses (here the core HostSnapshot) into metric families. They never read
the host themselves; the agent reads it once per refresh and every collector of
one exposition renders from that same snapshot.

A collector renders a `Part` of the snapshot: some of its arrays, some of its
sessions, and (`rest`) what belongs to neither. Every family's samples are the
arrays' samples, then the sessions', then the rest's, so the exposition can be
joined from parts rendered at different times: the agent re-renders only the
parts whose views changed (exposition.Renderer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from iscsimple.core.snapshot import ArrayView, HostSnapshot, SessionView

from ..families import Family, counter, gauge

if TYPE_CHECKING:
    from ..health import HealthChecker
    from ..safety import Safety


@dataclass
class Context:
    """What a collector may be built from: the pinned snapshot and the agent's watchers."""

    current: Callable[[], HostSnapshot]
    health: HealthChecker | Any = None
    safety: Safety | Any = None


@dataclass(frozen=True)
class Part:
    arrays: Sequence[ArrayView] = ()
    sessions: Sequence[SessionView] = ()
    rest: bool = False

    @classmethod
    def whole(cls, snapshot: HostSnapshot) -> Part:
        return cls(snapshot.arrays, snapshot.sessions, True)


class SnapshotCollector(Collector):
    """A prometheus_client custom collector rendering from the snapshot `current()` returns."""

    name: str = ""
    # The snapshot sources (HostSnapshot.sources keys) this collector depends on:
    # if one failed, iscsimple_collector_success{collector=name} is 0.
    sources: tuple[str, ...] = ()
    # Which views have samples of their own: arrays, sessions. The renderer asks for a Part of
    # each view of these kinds only (tests check that the others render no sample).
    views: frozenset[str] = frozenset({"arrays", "sessions"})

    def __init__(self, current: Callable[[], HostSnapshot]):
        self.current = current

    @classmethod
    def create(cls, context: Context) -> SnapshotCollector:
        return cls(context.current)

    def collect(self) -> Iterator[Metric]:
        snapshot = self.current()
        return iter(self.families(snapshot, Part.whole(snapshot)))

    def families(self, snapshot: HostSnapshot, part: Part) -> Iterable[Metric]:
        """Every family, in a fixed order, with the samples of `part` only."""
        raise NotImplementedError

    def dirty(self, snapshot: HostSnapshot) -> tuple[set[str] | None, set[str] | None]:
        """What changed since the last call besides the views: labels whose array samples and
        targets whose session samples may differ (None: all). Collectors that render views
        alone have nothing else."""
        return set(), set()


__all__ = ["Context", "Part", "SnapshotCollector", "add_one_hot", "counter", "gauge"]


def add_one_hot(family: Family, labels: list[str], states: Sequence[str], current: str | None) -> None:
    """One sample per known state, 1 for the current one. An unknown state still gets its own
    sample so it is never silently dropped."""
    family.add_one_hot(labels, tuple(states), current)
