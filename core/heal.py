"""Carry out a heal decided by core.safety: the one place that runs mdadm on a running mirror.

The agent's healer (its own policy: stable time, backoff, parallel limit) and
`iscsimple resolve --keep local` (the operator's say-so) both call
`execute_heal`. It holds LABEL's hotplug lock, reads the array again, decides
again (a hotplug may have stopped or rebuilt the array since the caller looked),
runs the plan's mdadm calls only if the decision is unchanged, and keeps the
registry naming the LUN's current device. Whatever goes wrong comes back as a
`HealOutcome`, never as an exception, so every caller counts and logs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .bitmap import choose_route, full_route
from .errors import OperationError
from .locking import LockTimeout, hotplug_lock, label_lock_name
from .paths import HostPaths
from .registry import Registry
from .run import Deadline, run
from .safety import HealBlocked, HealPlan, ResumePlan, read_view
from .snapshot import ArrayView

log = logging.getLogger(__name__)

MDADM_TIMEOUT = 30.0  # one mdadm call; --add on a LUN that just came back may be slow

Runner = Callable[..., object]

STARTED = "started"  # the mdadm calls ran: the leg recovers (HealPlan: iSCSI from local; ResumePlan: local from iSCSI)
CHANGED = "changed"  # the array or the LUN changed since the caller planned: nothing done
BUSY = "busy"  # a hotplug operation holds the label: nothing done
FAILED = "failed"  # a step failed (mdadm, the lock file, the registry); `detail` says which


@dataclass(frozen=True)
class HealOutcome:
    result: str  # STARTED, CHANGED, BUSY or FAILED
    detail: str
    plan: HealPlan | ResumePlan

    @property
    def started(self) -> bool:
        return self.result == STARTED


def execute_heal(
    paths: HostPaths,
    view: ArrayView,
    plan: HealPlan | ResumePlan,
    deadline: Deadline,
    *,
    runner: Runner = run,
    lock_dir: Path | None = None,
) -> HealOutcome:
    """Run `plan` (decided from `view`) under LABEL's hotplug lock, waiting for it until `deadline`."""
    try:
        with hotplug_lock(lock_dir or paths.locks, label_lock_name(plan.label), deadline):
            return execute_locked(paths, view, plan, runner=runner)
    except LockTimeout as e:
        return HealOutcome(BUSY, str(e), plan)
    except OSError as e:  # the lock directory (read-only, full, ...)
        return HealOutcome(FAILED, f"cannot take the lock of {plan.label}: {e.strerror or e}", plan)


def execute_locked(
    paths: HostPaths, view: ArrayView, plan: HealPlan | ResumePlan, *, runner: Runner = run
) -> HealOutcome:
    """`execute_heal` for a caller that already holds LABEL's hotplug lock."""
    try:
        current = Registry(paths).get(view.attachment.id)
        fresh = read_view(paths, current) if current else None
    except (OSError, ValueError, OperationError) as e:
        return HealOutcome(FAILED, f"cannot read {plan.label} again before healing it: {e}", plan)
    again: HealPlan | ResumePlan | HealBlocked | None = (
        plan.replan(fresh, paths.sysfs, paths.devfs) if fresh else None
    )
    decided = full_route(plan) if isinstance(plan, HealPlan) else plan
    if again != decided:
        why = again.detail if isinstance(again, HealBlocked) else "the array or its LUN changed"
        return HealOutcome(CHANGED, why, plan)
    if isinstance(plan, HealPlan):
        # Partial (re-add, only the bitmap's dirty chunks) only when proven now, under the lock.
        plan = choose_route(paths, decided)
    log.warning("healing %s", plan.describe())
    for argv in plan.commands():
        try:
            runner(argv, timeout=MDADM_TIMEOUT)
        except (OperationError, OSError) as e:
            return HealOutcome(FAILED, str(e), plan)
    if plan.renamed:
        try:
            _note_new_device(paths, view, plan)
        except (OSError, ValueError) as e:
            return HealOutcome(
                FAILED,
                f"{plan.add_path} was added, but the registry still names {view.attachment.iscsi_device}: "
                f"cannot update it: {e}",
                plan,
            )
    if isinstance(plan, ResumePlan):
        return HealOutcome(STARTED, f"{plan.add_path} recovers from the iSCSI leg (the whole disk)", plan)
    copies = "the chunks written during the outage" if plan.mode == "partial" else "the whole disk"
    return HealOutcome(STARTED, f"{plan.add_path} recovers from the local leg ({copies})", plan)


def _note_new_device(paths: HostPaths, view: ArrayView, plan: HealPlan) -> None:
    """Keep the registry naming the LUN's current device (status, detach)."""
    registry = Registry(paths)
    current = registry.get(view.attachment.id)
    if current is not None:
        registry.put(replace(current, iscsi_device=plan.add))
