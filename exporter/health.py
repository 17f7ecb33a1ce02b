"""Health checks beyond what the kernel says, and plain-words logging of state changes.

`HealthChecker.observe(snapshot)` runs after every refresh (events or schedule)
in the refresh thread, compares with what it saw before and:
- logs each change of a leg, an array or a session once, in words an operator
  can act on;
- flags a resync/recovery that makes no progress for `stall_after` seconds;
- flags write-mostly on the wrong leg (reads would cross the network);
- counts session up/down changes and flags a session that flaps.
Its verdicts are exported by collectors.health from an immutable HealthReport.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from iscsimple.core.snapshot import ArrayView, HostSnapshot, SessionView

log = logging.getLogger("iscsimple.agent")


@dataclass(frozen=True)
class HealthReport:
    stalled: frozenset[str] = frozenset()  # labels
    write_mostly_wrong: frozenset[str] = frozenset()
    flapping: frozenset[tuple[str, str]] = frozenset()  # (target, portal)
    session_changes: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class _SyncProgress:
    """How far one array's resync/recovery got, and since when (stall detection)."""

    ratio: float
    since: float  # monotonic time the ratio last moved (or the sync started)


class HealthChecker:
    def __init__(
        self,
        stall_after: float = 300.0,
        flap_window: float = 600.0,
        flap_changes: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stall_after = stall_after
        self.flap_window = flap_window
        self.flap_changes = flap_changes
        self.clock = clock
        self.report = HealthReport()
        self._previous: HostSnapshot | None = None
        self._progress: dict[str, _SyncProgress] = {}  # by attachment id
        self._changes: dict[tuple[str, str], deque[float]] = {}
        self._change_totals: dict[tuple[str, str], int] = {}
        self._syncing: set[str] = set()  # attachment ids of the arrays that sync
        self._stalled: set[str] = set()
        # (when, attachment id): when that sync is stalled unless it moved; one per syncing array
        # (a sync that moves every poll must not pile up entries), moved on when it comes
        self._deadlines: list[tuple[float, str]] = []
        self._scheduled: set[str] = set()  # attachment ids in _deadlines
        self._wrong: set[str] = set()  # ... that have write-mostly on the wrong leg

    def observe(self, snapshot: HostSnapshot) -> HealthReport:
        now = self.clock()
        previous = self._previous
        changed = snapshot.changed_since(previous)
        if previous is None or changed is None:
            # Every view may be new: look at all of them.
            before = {a.label: a for a in previous.arrays} if previous else {}
            for view in snapshot.arrays:
                _log_array_changes(before.get(view.label), view, first=previous is None)
            for label in before.keys() - {a.label for a in snapshot.arrays}:
                log.info("%s is no longer attached (registry entry gone)", label)
            self._syncing = {v.attachment.id for v in snapshot.arrays if v.syncing}
            self._wrong = {
                v.attachment.id for v in snapshot.arrays if v.md is not None and v.write_mostly_wrong
            }
            targets = {v.target for v in snapshot.sessions} | (
                {v.target for v in previous.sessions} if previous else set()
            )
        else:
            # Derived from the previous snapshot: only the views it names are new.
            for key in changed:
                old, new = previous.by_id(key), snapshot.by_id(key)
                if new is not None:
                    _log_array_changes(old, new, first=False)
                elif old is not None:
                    log.info("%s is no longer attached (registry entry gone)", old.label)
                for ids, member in (
                    (self._syncing, new is not None and new.syncing),
                    (self._wrong, new is not None and new.md is not None and new.write_mostly_wrong),
                ):
                    if member:
                        ids.add(key)
                    else:
                        ids.discard(key)
            targets = set(snapshot.changed_targets or ())
        self._sessions(snapshot, targets, now)
        stalled = self._stalls(snapshot, now, changed)
        wrong = frozenset(v.label for v in map(snapshot.by_id, self._wrong) if v is not None)
        for label in wrong - self.report.write_mostly_wrong:
            log.warning(
                "%s: write-mostly is set on the wrong leg; VM reads go over iSCSI instead of the local disk",
                label,
            )
        flapping = frozenset(k for k, times in self._changes.items() if len(times) >= self.flap_changes)
        for target, portal in flapping - self.report.flapping:
            log.warning(
                "session to %s (%s) is flapping: %d up/down changes in %.0f minutes",
                target,
                portal,
                len(self._changes[(target, portal)]),
                self.flap_window / 60,
            )
        for target, portal in self.report.flapping - flapping:
            log.info("session to %s (%s) stopped flapping", target, portal)
        report = HealthReport(stalled, wrong, flapping, dict(self._change_totals))
        if report != self.report:  # the same object while nothing moved: collectors re-render nothing
            self.report = report
        self._previous = snapshot
        return self.report

    def _sessions(self, snapshot: HostSnapshot, targets: set[str], now: float) -> None:
        first = self._previous is None
        for target in targets:
            before = {s.portal: s for s in self._previous.session_views(target)} if self._previous else {}
            for view in snapshot.session_views(target):
                key = (view.target, view.portal)
                old = before.get(view.portal)
                if old is None and first:
                    if not view.up:
                        log.warning(
                            "session to %s (%s) is %s", view.target, view.portal, _session_words(view)
                        )
                elif old is not None and old.state != view.state:
                    _log_session_change(old, view)
                    if old.up != view.up:
                        self._changes.setdefault(key, deque()).append(now)
                        self._change_totals[key] = self._change_totals.get(key, 0) + 1
        for key in list(self._changes):
            times = self._changes[key]
            while times and now - times[0] > self.flap_window:
                times.popleft()

    def _stalls(self, snapshot: HostSnapshot, now: float, changed: frozenset[str] | None) -> frozenset[str]:
        """Syncs without progress for stall_after. A snapshot derived from the previous one is
        looked at only where it changed (a sync that moved, started or ended) and where a
        deadline came (a sync whose progress has not moved for stall_after): a refresh costs the
        same at any number of syncing arrays. Any other snapshot: every syncing array, and every
        array that was."""
        # Not derived: any view may differ. Progress and deadlines stand where the ratio is the same.
        keys = changed if changed is not None else self._syncing | self._progress.keys()
        for key in sorted(keys):
            view = snapshot.by_id(key)
            if view is None or not view.syncing:  # stopped syncing, or gone
                old = view or (self._previous.by_id(key) if self._previous else None)
                if self._progress.pop(key, None) is not None and old is not None:
                    self._stalled.discard(old.label)
                continue
            ratio = view.sync_completed_ratio
            progress = self._progress.get(key)
            if progress is None or ratio != progress.ratio:
                self._progress[key] = _SyncProgress(ratio, now)
                self._stalled.discard(view.label)
                if key not in self._scheduled:  # else its deadline moves when it comes
                    self._scheduled.add(key)
                    heapq.heappush(self._deadlines, (now + self.stall_after, key))
        while self._deadlines and self._deadlines[0][0] <= now:
            _, key = heapq.heappop(self._deadlines)
            view = snapshot.by_id(key)
            progress = self._progress.get(key)
            if view is None or progress is None or not view.syncing:
                self._scheduled.discard(key)  # ended, or gone
                continue
            if progress.since + self.stall_after > now:  # it moved since: its deadline is later
                heapq.heappush(self._deadlines, (progress.since + self.stall_after, key))
                continue
            self._scheduled.discard(key)  # stalled: a move schedules it again
            self._stalled.add(view.label)
            if view.label not in self.report.stalled:
                log.warning(
                    "%s: %s has made no progress for %.0f s (stuck at %.1f%%)",
                    view.label,
                    view.sync_action,
                    now - progress.since,
                    progress.ratio * 100,
                )
        return frozenset(self._stalled)


def _session_words(view: SessionView) -> str:
    if view.session is None:
        return "gone (the registry expects it: arrays on this target have no iSCSI leg)"
    return {
        "LOGGED_IN": "LOGGED_IN",
        "FAILED": "FAILED (connection lost; the kernel queues I/O until recovery_tmo)",
        "FREE": "FREE (recovery timed out; I/O to its LUNs fails)",
    }.get(view.state or "", str(view.state))


def _log_session_change(old: SessionView, new: SessionView) -> None:
    level = logging.INFO if new.up else logging.WARNING
    log.log(level, "session to %s (%s): %s -> %s", new.target, new.portal, old.state, _session_words(new))


def _log_array_changes(old: ArrayView | None, new: ArrayView, first: bool) -> None:
    """Log what changed; on the agent's first look, log only what needs attention."""
    vm = f"{new.label} (VM {new.domain})" if new.domain else new.label
    old_local_only, old_unprotected = False, False
    if old is None:
        if not first:
            log.info("%s attached: iSCSI leg %s, local leg %s", vm, new.iscsi.state, new.local.state)
    else:
        for leg_old, leg_new in ((old.iscsi, new.iscsi), (old.local, new.local)):
            if leg_old.state != leg_new.state:
                log.info("%s: %s leg %s -> %s", vm, leg_new.role, leg_old.state, leg_new.state)
        if old.sync_action != new.sync_action:
            if new.syncing:
                log.info("%s: md started %s", vm, new.sync_action)
            else:
                log.info("%s: md %s finished or stopped (now %s)", vm, old.sync_action, new.sync_action)
        old_local_only, old_unprotected = old.local_only, old.unprotected
    if new.local_only and not old_local_only:
        log.warning(
            "%s runs on its LOCAL leg alone: iSCSI leg %s, session %s. The iSCSI copy is going stale; "
            "do not migrate, stop or re-attach this VM elsewhere until the mirror is healed",
            vm,
            new.iscsi.state,
            new.session.state if new.session else "gone",
        )
    elif old_local_only and not new.local_only:
        log.info("%s no longer runs on its local leg alone", vm)
    if new.unprotected and not old_unprotected:
        log.warning("%s is unprotected: local leg %s, the VM depends on iSCSI alone", vm, new.local.state)
    elif old_unprotected and not new.unprotected:
        log.info("%s is protected again: local leg in sync", vm)
    if new.recovery_stopped and not (old is not None and old.recovery_stopped):
        log.warning(
            "%s: the local leg's recovery from iSCSI stopped (an iSCSI outage cut it) and md does not "
            "restart it; the VM depends on iSCSI alone until it is resumed",
            vm,
        )
