"""One collector per source of the host snapshot; `default_collectors` lists them in exposition order.

Adding a source (issue 6: stale records, heal actions) = a module here with a
SnapshotCollector subclass, appended to DEFAULT_COLLECTORS.
"""

from __future__ import annotations

from collections.abc import Callable

from iscsimple.core.snapshot import HostSnapshot

from .arrays import ArraysCollector
from .base import SnapshotCollector
from .hotplug import HotplugCollector
from .iscsi import IscsiCollector

DEFAULT_COLLECTORS: tuple[type[SnapshotCollector], ...] = (ArraysCollector, IscsiCollector, HotplugCollector)

__all__ = [
    "DEFAULT_COLLECTORS",
    "ArraysCollector",
    "HotplugCollector",
    "IscsiCollector",
    "SnapshotCollector",
    "default_collectors",
]


def default_collectors(current: Callable[[], HostSnapshot]) -> list[SnapshotCollector]:
    return [cls(current) for cls in DEFAULT_COLLECTORS]
