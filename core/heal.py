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

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .atomic import remove_durably, write_atomic
from .bitmap import choose_route, full_route
from .errors import OperationError, StateFileError
from .files import check_dir, load_state_json
from .locking import LockTimeout, hotplug_lock, label_lock_name
from .paths import HostPaths
from .registry import Attachment, Registry
from .run import Deadline, run
from .safety import HealBlocked, HealPlan, ResumePlan, read_view
from .snapshot import ArrayView
from .spec import check_label
from .sysfs import read_bytes, write_attr

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
    else:
        try:  # before --remove: an agent restarted before the --add must still add the leg back
            PendingResumes(paths).put(PendingResume.of(plan, current))  # type: ignore[arg-type]
        except (OSError, OperationError) as e:
            return HealOutcome(FAILED, f"cannot note the resume of {plan.label} before it starts: {e}", plan)
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
        try:
            PendingResumes(paths).clear(plan.label)
        except OSError as e:  # the next agent would add a member md already has: refused, harmless
            log.warning("cannot remove the note of %s's resume: %s", plan.label, e)
        return HealOutcome(STARTED, f"{plan.add_path} recovers from the iSCSI leg (the whole disk)", plan)
    copies = "the chunks written during the outage" if plan.mode == "partial" else "the whole disk"
    return HealOutcome(STARTED, f"{plan.add_path} recovers from the local leg ({copies})", plan)


def _note_new_device(paths: HostPaths, view: ArrayView, plan: HealPlan) -> None:
    """Keep the registry naming the LUN's current device (status, detach)."""
    registry = Registry(paths)
    current = registry.get(view.attachment.id)
    if current is not None:
        registry.put(replace(current, iscsi_device=plan.add))


# -- a resume between its --remove and its --add ----------------------------------------------------

_KERNEL_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}")
_DEV_RE = re.compile(r"[0-9]{1,10}:[0-9]{1,10}")


@dataclass(frozen=True)
class PendingResume:
    """A resume removed (or is about to remove) LABEL's idle spare local leg and has not added it back.

    Kept in STATE/resumes/LABEL.json from before the --remove until the --add ran: an agent
    restarted in between reads it and adds the leg back (md never does; without it the mirror
    stays on its iSCSI leg alone). Tied to one attachment and one array: a detach and a new
    attach make it obsolete.
    """

    label: str
    attachment_id: str
    attachment_created: float
    md_device: str
    member: str  # the local leg's kernel name, as md named it
    dev: str | None  # its major:minor

    @classmethod
    def of(cls, plan: ResumePlan, attachment: Attachment) -> PendingResume:
        return cls(plan.label, attachment.id, attachment.created, plan.md_device, plan.member, plan.dev)

    def applies_to(self, attachment: Attachment, md_device: str | None) -> bool:
        return (self.attachment_id, self.attachment_created, self.md_device) == (
            attachment.id,
            attachment.created,
            md_device,
        )

    @classmethod
    def from_dict(cls, data: object, label: str) -> PendingResume:
        """Checked field by field (the member reaches mdadm's argv); ValueError naming the bad one."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        checks = {
            "label": lambda v: v == label,
            "attachment_id": lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", v),
            "attachment_created": lambda v: (
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            ),
            "md_device": lambda v: isinstance(v, str) and _KERNEL_NAME_RE.fullmatch(v),
            "member": lambda v: isinstance(v, str) and _KERNEL_NAME_RE.fullmatch(v),
            "dev": lambda v: v is None or (isinstance(v, str) and _DEV_RE.fullmatch(v)),
        }
        for name, ok in checks.items():
            if name not in data or not ok(data[name]):
                raise ValueError(f"bad or missing {name}")
        return cls(**{name: data[name] for name in checks})


class PendingResumes:
    def __init__(self, paths: HostPaths):
        self.directory = paths.state / "resumes"

    def path(self, label: str) -> Path:
        check_label(label, ValueError)
        return self.directory / f"{label}.json"

    def put(self, pending: PendingResume) -> None:
        write_atomic(self.path(pending.label), json.dumps(asdict(pending), sort_keys=True), mode=0o644)

    def clear(self, label: str) -> None:
        remove_durably(self.path(label))

    def read_all(self) -> tuple[dict[str, PendingResume], dict[str, str]]:
        """The notes by label, and an error line by label for each that cannot be read (its
        leg may still be out of the array: never dropped)."""
        found: dict[str, PendingResume] = {}
        errors: dict[str, str] = {}
        try:
            check_dir(self.directory)  # a note decides an mdadm --add: only from root's own directory
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return found, errors
        except OSError as e:
            return found, {"": f"{self.directory}: cannot list the resumes in progress: {e.strerror or e}"}
        for name in names:
            path = self.directory / name
            label = name[: -len(".json")] if name.endswith(".json") else ""
            if name.startswith("."):
                continue  # a temporary file of write_atomic
            try:
                check_label(label, ValueError)
            except (ValueError, TypeError):
                errors[name] = f"{path}: not a resume note iscsimple wrote (bad file name)"
                continue
            try:
                found[label] = PendingResume.from_dict(load_state_json(path), label)
            except FileNotFoundError:
                continue
            except StateFileError as e:
                errors[label] = str(e)
            except ValueError as e:
                errors[label] = f"{path}: not a resume note iscsimple wrote: {e}"
        return found, errors


def start_check(paths: HostPaths, md_name: str) -> str | None:
    """Have md compare the two legs ("check" into md/sync_action: it reads both and writes
    neither; when it ends, md/mismatch_cnt holds the sectors found different). Only on an idle
    array with both legs in sync (md would refuse otherwise). None when started, else why not."""
    md = paths.sysfs / "block" / md_name / "md"
    try:
        action = read_bytes(str(md / "sync_action")).strip()
        degraded = read_bytes(str(md / "degraded")).strip()
        if action != b"idle" or degraded != b"0":
            return f"{md_name} is not idle and in sync (sync_action {action.decode(errors='replace')!r}, degraded {degraded.decode(errors='replace')!r})"
        write_attr(md / "sync_action", "check")
    except OSError as e:
        return f"cannot start a check of {md_name}: {e.strerror or e}"
    return None
