"""The agent's collectors, registered like node_exporter's: each module registers its class,
and `default_collectors` builds every registered one, in exposition order.

Adding a source = a module here with a SnapshotCollector subclass (a `create(context)` if it
needs more than the snapshot) and one `register` line below.
"""

from __future__ import annotations

from collections.abc import Callable

from iscsimple.core.snapshot import HostSnapshot

from .arrays import ArraysCollector
from .base import Context, Part, SnapshotCollector
from .health import HealthCollector
from .hotplug import HotplugCollector
from .iscsi import IscsiCollector
from .safety import SafetyCollector

REGISTERED: list[type[SnapshotCollector]] = []


def register(cls: type[SnapshotCollector]) -> type[SnapshotCollector]:
    if any(c.name == cls.name for c in REGISTERED):
        raise ValueError(f"collector {cls.name!r} registered twice")
    REGISTERED.append(cls)
    return cls


for _cls in (ArraysCollector, IscsiCollector, HotplugCollector, SafetyCollector, HealthCollector):
    register(_cls)

__all__ = [
    "REGISTERED",
    "ArraysCollector",
    "Context",
    "HealthCollector",
    "HotplugCollector",
    "IscsiCollector",
    "Part",
    "SafetyCollector",
    "SnapshotCollector",
    "default_collectors",
    "register",
]


def default_collectors(
    current: Callable[[], HostSnapshot] | Context, health=None, safety=None
) -> list[SnapshotCollector]:
    """Every registered collector; those needing the health checker or safety are left out
    when they are not given (tests of one source)."""
    context = current if isinstance(current, Context) else Context(current, health, safety)
    needs = {HealthCollector: context.health, SafetyCollector: context.safety}
    return [cls.create(context) for cls in REGISTERED if needs.get(cls, True) is not None]
