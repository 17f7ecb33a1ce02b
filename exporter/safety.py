"""Data safety in the agent: remember stale iSCSI copies, heal them, export both.

Runs after every refresh (events or schedule), in the refresh thread, on the
snapshot just read:

1. `StaleDetector` writes a durable record (core.stale) for each array whose
   iSCSI copy went stale (core.safety.stale_reason) and logs it once.
2. `Healer` clears a record once md says both legs are in sync again (whoever
   did the copy: this agent, `iscsimple resolve`, an operator), and — when the
   policy allows ([heal] enabled, default on) — re-adds a returned iSCSI leg
   write-mostly so it recovers from the local leg. It waits until the session
   and the LUN have looked healthy for `stable_seconds`, doubling that wait after
   each failed or aborted heal (capped), holds the hotplug's label lock while it
   acts, and re-checks everything under the lock before running mdadm.
3. `collectors.safety.SafetyCollector` exports `iscsimple_array_iscsi_stale{label,domain}`,
   `iscsimple_heal_operations_total{result}` and `iscsimple_heal_enabled`.

Crash safety: all state that matters is on disk (the record, the note of a resume
in progress) or in the kernel (the md members). If the agent dies between a heal's
`--remove` and `--add`, the next run sees the leg missing with the record standing
and adds it; between a resume's (core.heal.PendingResumes), the note says which
local leg to add back; if it dies during a recovery, the next run waits for it and
clears the record when it completes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from iscsimple.core.bitmap import UNNAMED_ARRAY, ArrayBitmap, BitmapKicks, array_bitmaps, read_kernel_log
from iscsimple.core.cluster import ClusterGuard, ClusterSettings, ClusterUnreachable, check_before_writing_lun
from iscsimple.core.config import Config, ConfigError, load_config
from iscsimple.core.heal import BUSY, CHANGED, PendingResumes, Runner, execute_heal, start_check
from iscsimple.core.iscsi import IscsiSession
from iscsimple.core.paths import HostPaths
from iscsimple.core.run import Deadline, run
from iscsimple.core.safety import (
    HealBlocked,
    HealPlan,
    failure_lines,
    plan_heal,
    plan_resume,
    recovery_complete,
    stale_record,
)
from iscsimple.core.snapshot import ArrayView, CowMap, HostSnapshot
from iscsimple.core.stale import StaleRecord, StaleRecords

log = logging.getLogger("iscsimple.agent.safety")

BITMAP_RESCAN = 10.0  # seconds between two reads of the bitmaps of degraded arrays
LOCK_WAIT = 2.0  # a hotplug holds the label: try again on the next refresh
HEAL_RESULTS = ("success", "failure", "aborted")  # always exported; skipped_<reason> when seen
HEAL_MODES = ("full", "partial")  # skips are counted with mode "none": no heal ran
RESUME_RESULTS = HEAL_RESULTS
CHECK_RESULTS = ("started", "failed")  # md's compare of the legs after a heal ([heal] check_after)


class StaleDetector:
    """Writes a record the first time an array's iSCSI copy is seen stale; logs it once."""

    def __init__(
        self, records: StaleRecords, clock: Callable[[], float] = time.time, paths: HostPaths | None = None
    ):
        self.records = records
        self.clock = clock
        self.paths = paths  # for the kernel log's time of the fault (core.safety.fault_evidence)
        self.write_failures = 0
        self._announced: set[str] = set()
        self._previous: HostSnapshot | None = None
        self._unwritten: set[str] = set()  # labels whose record could not be written yet
        self._written: set[str] = set()  # labels found stale on the last pass (written or not)
        self._standing: CowMap | None = None  # what the last pass returned (never modified after)
        # Labels whose standing record may have changed on the last pass; None: any may have.
        self.touched: set[str] | None = None

    def observe(self, snapshot: HostSnapshot) -> CowMap:
        """The records standing after this pass (the snapshot's plus those written now).

        When the snapshot is derived from the last one seen, the last pass's records are taken
        over and only the labels whose record the snapshot re-read, or this detector wrote,
        are set again from the snapshot: what a pass costs follows what changed. `touched`
        names them (None after a pass over everything)."""
        changed = snapshot.changed_since(self._previous)
        moved = snapshot.changed_records
        if changed is None or moved is None or self._standing is None:
            standing = CowMap(snapshot.stale_by_label())
            views = snapshot.arrays
            touched: set[str] | None = None
        else:
            # The last pass's records were the parent's plus those written then: these labels
            # are the only ones where they can differ from this snapshot's.
            touched = set(moved) | self._written
            standing = self._standing.derive()
            gone = set()
            for label in touched:
                record = snapshot.stale_record(label)
                if record is not None:
                    standing[label] = record
                else:
                    standing.pop(label, None)
                    gone.add(label)
            # Only a view that changed can have become stale; retry the records not written yet,
            # and look again at the arrays whose record went (cleared while the copy is still stale,
            # or written last pass and not read back yet): as a pass over every view would.
            keys = changed | {k for label in self._unwritten | gone for k in snapshot.ids_of(label)}
            views = [v for v in map(snapshot.by_id, sorted(keys)) if v is not None]
        self._previous = snapshot
        unwritten = set()
        written = set()
        failure_log = functools.cache(
            lambda: failure_lines(read_kernel_log(self.paths)) if self.paths else None
        )
        for view in views:
            if view.label in standing:
                continue
            # The kernel log is read once for all the arrays found stale in this pass (hundreds
            # at an agent's start during a filer outage), and only if one is.
            record = stale_record(view, now=self.clock(), paths=self.paths, failure_log=failure_log)
            if record is None:
                continue
            written.add(view.label)
            try:
                standing[view.label] = self.records.put(record)  # write-once: one already there is kept
            except (OSError, ValueError) as e:
                # Export it anyway: the danger is real even if we could not write it down.
                standing[view.label] = record
                unwritten.add(view.label)
                self.write_failures += 1
                log.error("cannot write the stale record of %s: %s", view.label, e)
        self._unwritten = unwritten
        self._written = written
        self._standing = standing
        if touched is None:
            self._announced &= standing.keys()
            new = standing.keys() - self._announced
        else:
            touched |= written
            self._announced -= {label for label in touched if label not in standing}
            new = {label for label in touched if label in standing and label not in self._announced}
        self.touched = touched
        # Once per record: new ones, those found at start-up, those `remove` wrote.
        for label in sorted(new):
            self._announced.add(label)
            log.warning(
                "STALE iSCSI COPY: %s. Do not migrate, stop or move this VM, nor start it on another "
                "host, until the mirror is healed.",
                standing[label].describe(),
            )
        return standing


@dataclass
class _HealAttempts:
    """What the healer remembers about one label (lost on restart, which is safe: see module doc)."""

    ready_since: float | None = None  # when a heal first looked possible (monotonic)
    failures: int = 0  # failed or aborted heals since the last completed one
    healing_since: float | None = None  # we re-added the leg; its recovery runs
    mode: str = "full"  # of the heal that runs (full copy, or partial from the bitmap)
    last_skip: str | None = None
    # A resume's local member (kernel name, major:minor): if its --remove ran and its --add did not,
    # the next resume only adds it back.
    resumed_member: tuple[str, str | None] | None = None


class Healer:
    def __init__(
        self,
        paths: HostPaths,
        records: StaleRecords,
        *,
        enabled: bool = True,
        stable_seconds: float = 30.0,
        backoff_max_seconds: float = 3600.0,
        max_parallel: int = 4,
        check_after: bool = False,
        runner: Runner = run,
        lock_dir: Path | None = None,  # default: paths.locks, where the hotplug locks a label
        lock_wait: float = LOCK_WAIT,
        clock: Callable[[], float] = time.monotonic,
        cluster: ClusterSettings | None = None,
        cluster_guard: ClusterGuard | None = None,
    ):
        self.paths = paths
        self.records = records
        self.enabled = enabled
        self.cluster = cluster or ClusterSettings()
        self.cluster_guard = cluster_guard
        self.stable_seconds = stable_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.max_parallel = max_parallel
        self.check_after = check_after
        self.checks: dict[str, int] = dict.fromkeys(CHECK_RESULTS, 0)
        self.runner = runner
        self.lock_dir = lock_dir or paths.locks
        self.lock_wait = lock_wait
        self.clock = clock
        self.counts: dict[tuple[str, str], int] = {(r, m): 0 for r in HEAL_RESULTS for m in HEAL_MODES}
        self._progress: dict[str, _HealAttempts] = {}
        # Labels plan_heal held back, with the view it judged: the same view gets the same verdict.
        self._blocked: dict[str, ArrayView] = {}
        # Stopped recoveries of local legs (iSCSI -> local) the healer restarts: counted apart.
        self.resumes: dict[str, int] = dict.fromkeys(RESUME_RESULTS, 0)
        self._resume_progress: dict[str, _HealAttempts] = {}
        # Resumes an earlier run of the agent left between --remove and --add (and unreadable notes).
        self._resume_notes = PendingResumes(paths)
        self._pending, self._pending_errors = self._resume_notes.read_all()
        for problem in self._pending_errors.values():
            log.error(
                "%s; a resume may have taken that local leg out of its array: it is added back from the "
                "registry's local device if it is still missing",
                problem,
            )
        self._recovering = 0  # iSCSI legs recovering in the snapshot being handled
        self._local_recovering = 0  # local legs recovering (resumes count against max_parallel)
        # Kept up to date from the views each snapshot changed, so a refresh costs what changed.
        self._tracked: HostSnapshot | None = None
        self._local_recovering_ids: set[str] = set()
        self._stopped_ids: set[str] = set()  # attachments whose view is recovery_stopped
        # Standing labels whose iSCSI leg recovers (or waits as a spare), kept up to date the same way.
        self._observed: HostSnapshot | None = None
        self._seen_standing = False
        self._recovering_labels: set[str] = set()
        self._waiting: set[str] = set()  # standing labels not held back by their array's state

    def wait_for(self, label: str) -> float:
        """Seconds the session and LUN must look healthy before the next heal of `label`."""
        return self._backoff(self._progress.get(label, _HealAttempts()))

    def _backoff(self, progress: _HealAttempts) -> float:
        return min(self.stable_seconds * 2**progress.failures, self.backoff_max_seconds)

    def observe(
        self, snapshot: HostSnapshot, standing: Mapping[str, StaleRecord], touched: set[str] | None = None
    ) -> CowMap:
        """Clear records of healed arrays, heal what may be healed; returns the records still standing.
        `touched`: the labels whose standing record may differ from the last pass's (None: any)."""
        standing = standing.derive() if isinstance(standing, CowMap) else CowMap(dict(standing))
        views = self._views_to_consider(snapshot, standing, touched)
        # A filer that returns serves every stale leg of the host at once: copy a few at a time.
        self._recovering = len(self._recovering_labels)
        # The labels whose record may have gone since the last pass: any, or those touched.
        maybe_gone = set(self._progress) - standing.keys() if touched is None else touched
        for label in maybe_gone:
            if label not in standing:
                self._progress.pop(label, None)
                self._blocked.pop(label, None)
                self._waiting.discard(label)
        # An initial recovery (iSCSI -> local) an outage stopped: no record, the other direction.
        self._track(snapshot)
        self._local_recovering = len(self._local_recovering_ids)
        self._forget_detached_resumes(snapshot)
        candidates = set(self._stopped_ids)
        for label in (*self._resume_progress, *self._pending, *self._pending_errors):
            candidates |= snapshot.ids_of(label)
        for key in sorted(candidates, key=lambda k: snapshot.position(k) or 0):
            view = snapshot.by_id(key)
            if view is not None and view.label not in standing:
                self._consider_resume(view, list(snapshot.target_sessions(view.attachment.target)))
        for view in views:
            if recovery_complete(view):
                if self._cleared(view, standing) and self.enabled and self.check_after:
                    self._check(view)
                continue
            if self._blocked.get(view.label) is view:
                continue  # held back by the array's state, and that state has not changed
            self._consider(view, list(snapshot.target_sessions(view.attachment.target)))
        self._seen_standing = True
        return standing

    def _views_to_consider(
        self, snapshot: HostSnapshot, standing: Mapping[str, StaleRecord], touched: set[str] | None
    ) -> list[ArrayView]:
        """The standing records' views that may need an action, by label: those whose view or
        record changed, and those not held back by their array's state (they wait for time to
        pass: stable session, backoff, a free heal slot). A held-back view that did not change
        gets the same verdict, so a pass costs what changed, not how many records stand."""
        changed = snapshot.changed_since(self._observed)
        self._observed = snapshot
        if changed is None or snapshot.reordered or touched is None or not self._seen_standing:
            labels: set[str] = set(standing)
            self._recovering_labels = set()
            self._waiting = labels - self._blocked.keys()
        else:
            labels = {v.label for v in map(snapshot.by_id, changed) if v is not None}
            labels |= touched
            for label in touched:
                if label in standing and label not in self._blocked:
                    self._waiting.add(label)
                else:
                    self._waiting.discard(label)
            labels |= self._waiting
        views = []
        for label in sorted(labels):
            view = snapshot.array(label)
            if view is not None and label in standing:
                views.append(view)
                if view.iscsi.state in ("recovering", "spare"):
                    self._recovering_labels.add(label)
                    continue
            self._recovering_labels.discard(label)
        return views

    # -- one array -----------------------------------------------------------------------------

    def _cleared(self, view: ArrayView, standing: CowMap) -> bool:
        try:
            self.records.clear(view.label)
        except OSError as e:
            log.error("cannot clear the stale record of %s: %s", view.label, e)
            return False
        del standing[view.label]
        self._progress.pop(view.label, None)
        self._waiting.discard(view.label)
        log.warning(
            "healed: the iSCSI copy of %s (%s) is in sync with the local leg again; stale record cleared",
            view.label,
            view.domain or "no VM",
        )
        return True

    def _check(self, view: ArrayView) -> None:
        """[heal] check_after: md compares the legs just healed; iscsimple_array_mismatch_sectors
        says what it found once it ends."""
        assert view.md is not None  # recovery_complete: the array runs
        problem = start_check(self.paths, view.md.name)
        if problem is None:
            self.checks["started"] += 1
            log.warning("checking %s after its heal: md compares both legs (%s)", view.label, view.md.name)
        else:
            self.checks["failed"] += 1
            log.error("not checking %s after its heal: %s", view.label, problem)

    def _consider(self, view: ArrayView, sessions: list[IscsiSession]) -> None:
        progress = self._progress.setdefault(view.label, _HealAttempts())
        now = self.clock()
        if progress.healing_since is not None and view.iscsi.state in ("faulty", "missing"):
            progress.healing_since = None
            progress.ready_since = None
            progress.failures += 1
            self._count("aborted", progress.mode)
            log.warning(
                "heal of %s aborted: the iSCSI leg is %s again before its recovery completed; "
                "next attempt after %.0f s of a healthy session",
                view.label,
                view.iscsi.state,
                self.wait_for(view.label),
            )
        plan = plan_heal(view, self.paths.sysfs, self.paths.devfs, enabled=self.enabled, sessions=sessions)
        self._blocked.pop(view.label, None)
        self._waiting.add(view.label)
        if isinstance(plan, HealBlocked):
            self._blocked[view.label] = view
            self._waiting.discard(view.label)
            if plan.reason != "in_progress":
                progress.ready_since = None
                self._skip(view.label, progress, plan.reason, plan.detail)
            return
        if progress.ready_since is None:
            progress.ready_since = now
        wait = self.wait_for(view.label)
        if now - progress.ready_since < wait:
            if progress.failures:
                self._skip(
                    view.label,
                    progress,
                    "backoff",
                    f"{progress.failures} failed heal(s): waiting for {wait:.0f} s of a healthy session",
                )
            return
        if self._recovering >= self.max_parallel:
            self._skip(
                view.label,
                progress,
                "queued",
                f"{self._recovering} iSCSI legs already recover ([heal] max_parallel = {self.max_parallel})",
            )
            return
        if not self._lun_free_elsewhere(view, plan, progress):
            return
        if self._heal(view, plan, progress):
            self._recovering += 1

    def _lun_free_elsewhere(self, view: ArrayView, plan: HealPlan, progress: _HealAttempts) -> bool:
        """A heal writes the local leg onto the LUN: never while another host's mirror uses it."""
        verdict = check_before_writing_lun(self.cluster, plan.target, plan.lun, guard=self.cluster_guard)
        if verdict.outcome == "unreachable_proceeded":
            self._count("cluster_unreachable_proceeded")
        if verdict.allowed:
            return True
        progress.ready_since = None
        reason = "in_use_elsewhere" if verdict.outcome == "refused" else "cluster_unreachable"
        if progress.last_skip != reason:
            log.error("not healing %s: %s", view.label, verdict.reason)
        self._skip(view.label, progress, reason, verdict.reason)
        return False

    def _heal(self, view: ArrayView, plan: HealPlan, progress: _HealAttempts) -> bool:
        outcome = execute_heal(
            self.paths, view, plan, Deadline(self.lock_wait), runner=self.runner, lock_dir=self.lock_dir
        )
        if outcome.result == BUSY:
            self._skip(view.label, progress, "busy", "a hotplug operation holds the label; will retry")
            return False
        if outcome.result == CHANGED:
            self._skip(view.label, progress, "changed", "the array changed under us; will look again")
            progress.ready_since = None
            return False
        if not outcome.started:
            progress.failures += 1
            progress.ready_since = None
            self._count("failure", outcome.plan.mode)
            log.error(
                "heal of %s (%s) failed: %s; next attempt after %.0f s of a healthy session",
                view.label,
                outcome.plan.mode,
                outcome.detail,
                self.wait_for(view.label),
            )
            return False
        progress.healing_since = self.clock()
        progress.mode = outcome.plan.mode
        progress.last_skip = None
        self._count("success", outcome.plan.mode)
        log.warning(
            "heal of %s started, %s: %s; the stale record is cleared when it is in sync (%s)",
            view.label,
            outcome.plan.mode,
            outcome.detail,
            outcome.plan.route_reason,
        )
        return True

    def _skip(
        self,
        label: str,
        progress: _HealAttempts,
        reason: str,
        detail: str,
        counts: dict[str, int] | None = None,
    ) -> None:
        """Count and log a held-back heal (or resume) once per change of reason, not on every refresh."""
        if progress.last_skip == reason:
            return
        progress.last_skip = reason
        if counts is None:
            self._count(f"skipped_{reason}")
            log.info("not healing %s yet: %s", label, detail)
        else:
            counts[f"skipped_{reason}"] = counts.get(f"skipped_{reason}", 0) + 1
            log.info("not resuming the recovery of %s's local leg yet: %s", label, detail)

    # -- a local leg whose recovery from iSCSI an outage stopped ------------------------------

    def _track(self, snapshot: HostSnapshot) -> None:
        """The attachments whose local leg recovers or whose recovery stopped, from the views
        that changed since the last snapshot (all of them when it is not derived from that one)."""
        changed = snapshot.changed_since(self._tracked)
        self._tracked = snapshot
        if changed is None:
            self._local_recovering_ids = {
                v.attachment.id for v in snapshot.arrays if v.local.state == "recovering"
            }
            self._stopped_ids = {v.attachment.id for v in snapshot.arrays if v.recovery_stopped}
            return
        for key in changed:
            view = snapshot.by_id(key)
            for ids, member in (
                (self._local_recovering_ids, view is not None and view.local.state == "recovering"),
                (self._stopped_ids, view is not None and view.recovery_stopped),
            ):
                if member:
                    ids.add(key)
                else:
                    ids.discard(key)

    def _consider_resume(self, view: ArrayView, sessions: list[IscsiSession]) -> None:
        """The local leg's copy from iSCSI was cut by an outage and md will not restart it: once the
        session is back and has looked healthy for the heal's stable time, start it again (iSCSI ->
        local only; the local leg is incomplete). Same policy as a heal: backoff, parallel limit,
        the label's lock, a re-check under it."""
        if view.md is None or view.local.state == "in_sync":
            self._resume_progress.pop(view.label, None)
            self._drop_resume_note(view.label)
            return
        progress = self._resume_progress.setdefault(view.label, _HealAttempts())
        self._recall_resume(view, progress)
        removed = progress.resumed_member if view.local.state == "missing" else None
        if not view.recovery_stopped and removed is None:
            return  # recovering (ours, or md's own): keep the failure count in case it is cut again
        if progress.healing_since is not None:
            progress.healing_since = None
            progress.failures += 1
            self.resumes["aborted"] += 1
            log.warning(
                "the resumed recovery of %s's local leg stopped again before it completed; next attempt "
                "after %.0f s of a healthy session",
                view.label,
                self._backoff(progress),
            )
        plan = plan_resume(
            view, self.paths.sysfs, self.paths.devfs, enabled=self.enabled, sessions=sessions, removed=removed
        )
        if isinstance(plan, HealBlocked):
            progress.ready_since = None
            self._skip(view.label, progress, plan.reason, plan.detail, self.resumes)
            return
        now = self.clock()
        if progress.ready_since is None:
            progress.ready_since = now
        if now - progress.ready_since < self._backoff(progress):
            return
        if self._local_recovering >= self.max_parallel:
            detail = f"{self._local_recovering} local legs already recover ([heal] max_parallel = {self.max_parallel})"
            self._skip(view.label, progress, "queued", detail, self.resumes)
            return
        progress.resumed_member = (plan.member, plan.dev)
        outcome = execute_heal(
            self.paths, view, plan, Deadline(self.lock_wait), runner=self.runner, lock_dir=self.lock_dir
        )
        if outcome.result in (BUSY, CHANGED):
            progress.ready_since = None
            self._skip(view.label, progress, outcome.result, outcome.detail, self.resumes)
            return
        progress.ready_since = None
        if not outcome.started:
            progress.failures += 1
            self.resumes["failure"] += 1
            log.error(
                "resuming the recovery of %s's local leg failed: %s; next attempt after %.0f s of a healthy "
                "session",
                view.label,
                outcome.detail,
                self._backoff(progress),
            )
            return
        progress.healing_since, progress.last_skip = now, None
        self._local_recovering += 1
        self.resumes["success"] += 1
        log.warning(
            "resumed the recovery of %s (%s): an iSCSI outage had stopped it; %s",
            view.label,
            view.domain or "no VM",
            outcome.detail,
        )

    def _recall_resume(self, view: ArrayView, progress: _HealAttempts) -> None:
        """What an earlier run of the agent noted about a resume of this label (once)."""
        label = view.label
        note = self._pending.pop(label, None)
        if note is not None:
            if view.md is not None and note.applies_to(view.attachment, view.md.name):
                progress.resumed_member = progress.resumed_member or (note.member, note.dev)
                log.warning(
                    "a resume of %s's local leg was interrupted after removing %s: adding it back once the "
                    "iSCSI leg allows",
                    label,
                    note.member,
                )
            else:  # the disk was detached and attached again since: another array
                self._drop_resume_note(label)
        problem = self._pending_errors.pop(label, None)
        if problem is None or progress.resumed_member is not None:
            return
        member = view.attachment.local_kernel_name
        if member is None:
            self._skip(
                label,
                progress,
                "note_unreadable",
                f"{problem}; the registry does not name the local leg either: add it back by hand "
                f"(mdadm {view.attachment.md_path} --add LOCAL-DEVICE) if it is missing, then delete that file",
                self.resumes,
            )
            return
        progress.resumed_member = (member, None)

    def _drop_resume_note(self, label: str) -> None:
        self._pending.pop(label, None)
        self._pending_errors.pop(label, None)
        try:
            self._resume_notes.clear(label)
        except (OSError, ValueError) as e:
            log.warning("cannot remove the note of %s's resume: %s", label, e)

    def _forget_detached_resumes(self, snapshot: HostSnapshot) -> None:
        """Notes of labels no longer attached: their array is gone (only when the registry was read whole)."""
        if not (self._pending or self._pending_errors):
            return
        source = snapshot.sources.get("registry")
        if source is None or not source.ok:
            return
        for label in [*self._pending, *self._pending_errors]:
            if label and snapshot.array(label) is None:
                self._drop_resume_note(label)

    def _count(self, result: str, mode: str = "none") -> None:
        self.counts[(result, mode)] = self.counts.get((result, mode), 0) + 1

    @property
    def results(self) -> dict[str, int]:
        """Counts by result, whatever the mode."""
        totals: dict[str, int] = {}
        for (result, _), count in self.counts.items():
            totals[result] = totals.get(result, 0) + count
        return totals


class ClusterProbe:
    """Whether the cross-host guard's Prometheus answers, and how fast; run off the refresh thread
    (the agent schedules it), so a dead Prometheus never slows a refresh."""

    INTERVAL = 30.0

    def __init__(self, settings: ClusterSettings, guard: ClusterGuard | None = None):
        self.settings = settings
        self.guard = guard or ClusterGuard(settings)
        self.reachable: bool | None = None  # None: not probed yet
        self.seconds: float | None = None

    def run(self) -> None:
        if not self.settings.configured:
            return
        try:
            self.seconds = self.guard.probe()
            if self.reachable is False:
                log.warning("cluster guard: Prometheus at %s answers again", self.settings.prometheus_url)
            self.reachable = True
        except ClusterUnreachable as e:
            if self.reachable is not False:
                log.error("cluster guard: %s", e)
            self.reachable = False
            self.seconds = None


@dataclass
class SafetyState:
    """What the collector renders: the records standing after the last pass over a snapshot."""

    taken: float | None = None
    standing: Mapping[str, StaleRecord] = field(default_factory=dict)
    bitmap_by_label: dict[str, ArrayBitmap] = field(default_factory=dict)

    @property
    def bitmaps(self) -> list[ArrayBitmap]:
        return list(self.bitmap_by_label.values())


class Safety:
    """The agent's watcher (observe each snapshot) and the source of SafetyCollector."""

    def __init__(
        self,
        detector: StaleDetector,
        healer: Healer,
        probe: ClusterProbe | None = None,
        kicks: BitmapKicks | None = None,
    ):
        self.detector = detector
        self.healer = healer
        self.probe = probe or ClusterProbe(healer.cluster)
        self.kicks = kicks or BitmapKicks()  # the agent's kernel log watcher fills it
        self._kicks_mark = 0
        self.state = SafetyState()
        self._records_error: str | None = None  # the records directory's error said last
        self._bitmap_errors: set[str] = set()
        self._bitmap_by_label: dict[str, ArrayBitmap] = {}
        self._bitmap_error_of: dict[str, str] = {}  # the errors among them, by label
        self._bitmaps_seen: HostSnapshot | None = None
        self._bitmaps_scanned = float("-inf")
        self._degraded: set[str] = set()  # attachment ids of degraded arrays
        self.bitmap_changes: set[str] | None = None  # labels whose bitmap moved on the last pass
        self.clock = time.monotonic
        # The agent's md event reader (MdstatDiff.latest): the /proc/mdstat text it read last and
        # the arrays whose lines changed since. None: each pass reads /proc/mdstat itself.
        self.mdstat: Callable[[], tuple[bytes | None, set[str]]] | None = None

    @classmethod
    def for_host(cls, paths: HostPaths, *, heal: bool = True, **healer_options) -> Safety:
        """Read the heal policy from the config file; an unreadable config disables healing
        (the operator may have meant to turn it off) but never detection."""
        try:
            config = load_config(paths.config)
        except ConfigError as e:
            log.error("%s; automatic heal is off until the configuration is fixed", e)
            config = Config(heal_enabled=False)
        options = {
            "stable_seconds": config.heal_stable_seconds,
            "backoff_max_seconds": config.heal_backoff_max_seconds,
            "max_parallel": config.heal_max_parallel,
            "check_after": config.heal_check_after,
            "cluster": config.cluster,
            **healer_options,
        }
        records = StaleRecords(paths)
        return cls(
            StaleDetector(records, paths=paths),
            Healer(paths, records, enabled=heal and config.heal_enabled, **options),
            ClusterProbe(options["cluster"]),
        )

    def observe(self, snapshot: HostSnapshot) -> None:
        self._say_records_error(snapshot.records_error)
        standing = self.detector.observe(snapshot)
        standing = self.healer.observe(snapshot, standing, self.detector.touched)
        computed = self._bitmaps(snapshot)
        for b in computed:
            if b.error and b.error not in self._bitmap_errors:
                log.error("write-intent bitmap of %s: %s (its heals copy the whole disk)", b.label, b.error)
        bitmaps = self.state.bitmap_by_label
        if self.bitmap_changes is None or self.bitmap_changes:  # only when one moved
            self._bitmap_errors = set(self._bitmap_error_of.values())
            bitmaps = dict(self._bitmap_by_label)
        self.state = SafetyState(snapshot.taken, standing, bitmaps)

    def _say_records_error(self, error: str | None) -> None:
        """An error line when the records directory cannot be read (once per error), a line when
        it can again: iscsimple_stale_records_readable says the same."""
        if error == self._records_error:
            return
        if error is not None:
            log.error(
                "cannot read the stale-copy records (%s): whether an iSCSI copy is stale is unknown beyond "
                "the records read before; no array is safe to migrate until they can be read",
                error,
            )
        else:
            log.warning("the stale-copy records can be read again")
        self._records_error = error

    def _bitmaps(self, snapshot: HostSnapshot) -> list[ArrayBitmap]:
        """Bitmaps of the arrays that changed, and of the degraded ones whose bitmap is in use
        (it fills up as the VM writes) every BITMAP_RESCAN seconds; all of them when the snapshot is not
        derived from the last one seen. `bitmap_changes` names the labels whose result moved."""
        changed = snapshot.changed_since(self._bitmaps_seen)
        self._bitmaps_seen = snapshot
        now = self.clock()
        if changed is None:
            keys = [v.attachment.id for v in snapshot.arrays]
            self._bitmap_by_label = {}
            self._bitmap_error_of = {}
            self.bitmap_changes = None
        else:
            keys = set(changed)
            if now - self._bitmaps_scanned >= BITMAP_RESCAN:
                keys |= self._degraded
            self.bitmap_changes = set()
        if changed is None or now - self._bitmaps_scanned >= BITMAP_RESCAN:
            self._bitmaps_scanned = now
        # The arrays whose /proc/mdstat lines moved since the last pass: their bitmap line may
        # have changed though their view did not (the text read when the view did was older).
        text, moved = self.mdstat() if self.mdstat is not None else (None, set())
        if moved and changed is not None:
            keys |= {key for name in moved for key in snapshot.ids_with_md(name)}
        kicked, self._kicks_mark = self.kicks.since(self._kicks_mark)
        if kicked and changed is not None:  # md keeps the array's /proc/mdstat lines as they were
            keys |= {
                v.attachment.id
                for v in snapshot.arrays
                if v.md is not None and (v.md.name in kicked or UNNAMED_ARRAY in kicked)
            }
        views = []
        for key in keys:
            view = snapshot.by_id(key)
            if view is None or view.md is None:
                self._degraded.discard(key)
                label = view.label if view is not None else None
                if label is not None and label in self._bitmap_by_label and snapshot.array(label) is view:
                    del self._bitmap_by_label[label]
                    self._bitmap_error_of.pop(label, None)
                    if self.bitmap_changes is not None:
                        self.bitmap_changes.add(label)
                continue
            views.append(view)
        computed = array_bitmaps(self.healer.paths, views, self.kicks.last_seqs(), text) if views else []
        # Only a bitmap in use fills up as the VM writes: a degraded array without one (or whose
        # bitmap is not active) is read again when its view changes, not every BITMAP_RESCAN.
        for view, b in zip(views, computed, strict=True):
            if view.md is not None and view.md.degraded and (b.active or b.error):
                self._degraded.add(view.attachment.id)
            else:
                self._degraded.discard(view.attachment.id)
        for b in computed:
            if self._bitmap_by_label.get(b.label) != b:
                self._bitmap_by_label[b.label] = b
                if b.error:
                    self._bitmap_error_of[b.label] = b.error
                else:
                    self._bitmap_error_of.pop(b.label, None)
                if self.bitmap_changes is not None:
                    self.bitmap_changes.add(b.label)
        return computed

    def standing_for(self, snapshot: HostSnapshot) -> Mapping[str, StaleRecord]:
        state = self.state
        if state.taken == snapshot.taken:
            return state.standing
        return snapshot.stale_by_label()
