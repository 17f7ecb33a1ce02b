"""The agent's snapshot: read by one thread, swapped atomically, served to everyone.

`Refresher` owns the only thread that reads the host. Events call `request(reason,
changes)` naming what changed; the schedule calls `request_poll()` (look at what the
kernel does not announce) and, rarely, asks for a full sweep. Bursts (a udev storm
while a target logs out) collapse into one update whose changes are the union. Each
update derives the next HostSnapshot from the previous one, re-reading only what
changed; then the watchers run (state-change logging, health checks, data safety) and
the exposition is rendered from cached per-array pieces, and the result is published
with one reference assignment: a scrape sees the old or the new snapshot, never a mix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from iscsimple.core.snapshot import EVERYTHING, Changes, HostSnapshot

from .collectors.base import SnapshotCollector
from .exposition import Rendered, Renderer

log = logging.getLogger(__name__)


class Watcher(Protocol):
    """Acts on each new snapshot in the refresh thread (health checks, data safety)."""

    def observe(self, snapshot: HostSnapshot, /) -> object: ...


# read(previous snapshot or None, what changed) -> the new snapshot
Read = Callable[[HostSnapshot | None, Changes], HostSnapshot]
Poll = Callable[[HostSnapshot], Changes]


class Refresher:
    def __init__(
        self,
        read: Read,
        collectors: Sequence[SnapshotCollector] = (),
        watchers: Sequence[Watcher] = (),
        min_gap: float = 0.05,
        poll: Poll | None = None,
    ):
        self.read = read
        self.watchers = list(watchers)
        self.min_gap = min_gap
        self.poll = poll
        self.renderer = Renderer(collectors)
        self.current: Rendered | None = None
        self.refreshes = 0
        # CPU seconds of the last refresh_now by phase, in its thread: update, watchers, render.
        self.cpu: dict[str, float] = {}
        self.last_error: str | None = None
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._done = threading.Condition()
        self._pending_lock = threading.Lock()
        self._reasons: list[str] = []
        self._changes = Changes()
        self._poll_wanted = False
        self._snapshot: HostSnapshot | None = None
        self.thread = threading.Thread(target=self._run, name="refresh", daemon=True)

    @property
    def collectors(self) -> list[SnapshotCollector]:
        return self.renderer.collectors

    @collectors.setter
    def collectors(self, collectors: Sequence[SnapshotCollector]) -> None:
        self.renderer = Renderer(collectors)

    def snapshot(self) -> HostSnapshot:
        """The snapshot being rendered (collectors call this; pinned during one render)."""
        if self._snapshot is None:
            raise RuntimeError("no snapshot yet")
        return self._snapshot

    def start(self) -> Refresher:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()

    def request(self, reason: str, changes: Changes = EVERYTHING) -> None:
        """Re-read what `changes` names (by default everything) as soon as possible."""
        with self._pending_lock:
            self._reasons.append(reason)
            self._changes = self._changes | changes
        self._wanted.set()

    def request_poll(self, reason: str = "schedule") -> None:
        """Look at what the kernel does not announce (sync progress, session states)."""
        with self._pending_lock:
            self._reasons.append(reason)
            self._poll_wanted = True
        self._wanted.set()

    def refresh_now(self, changes: Changes = EVERYTHING) -> Rendered:
        """Update and render in the caller's thread (--once, tests, start-up)."""
        previous = self._snapshot
        cpu = dict.fromkeys(("update", "watchers", "render"), 0.0)
        snapshot = self._observed(self._timed(cpu, self.read, previous, changes), cpu)
        if previous is None:
            # The watchers' first look writes what the snapshot reads back (a stale record per
            # array found local-only: hundreds at a start during a filer outage). Read it now,
            # before the first render, rather than re-rendering those arrays on the next refresh.
            snapshot = self._observed(self._timed(cpu, self.read, snapshot, Changes()), cpu)
        started = time.thread_time()
        rendered = self.renderer.render(snapshot)
        cpu["render"] = time.thread_time() - started
        self.cpu = cpu
        self.current = rendered
        with self._done:
            self.refreshes += 1
            self._done.notify_all()
        return rendered

    @staticmethod
    def _timed(
        cpu: dict[str, float], read: Read, previous: HostSnapshot | None, changes: Changes
    ) -> HostSnapshot:
        started = time.thread_time()
        try:
            return read(previous, changes)
        finally:
            cpu["update"] += time.thread_time() - started

    def _observed(self, snapshot: HostSnapshot, cpu: dict[str, float]) -> HostSnapshot:
        started = time.thread_time()
        self._snapshot = snapshot
        for watcher in self.watchers:
            try:
                watcher.observe(snapshot)
            except Exception:
                log.exception("watcher %r failed", watcher)
        cpu["watchers"] += time.thread_time() - started
        return snapshot

    def wait_for_refresh(self, after: int, timeout: float) -> bool:
        """Block until more than `after` refreshes happened (tests, demo)."""
        with self._done:
            return self._done.wait_for(lambda: self.refreshes > after, timeout)

    def _take(self) -> tuple[list[str], Changes, bool]:
        with self._pending_lock:
            reasons, self._reasons = self._reasons, []
            changes, self._changes = self._changes, Changes()
            poll, self._poll_wanted = self._poll_wanted, False
        return reasons, changes, poll

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            reasons, changes, poll = self._take()
            log.debug("refreshing: %s", ", ".join(reasons[:5]) or "requested")
            started = time.monotonic()
            try:
                if poll and self.poll is not None and self._snapshot is not None:
                    changes = changes | self.poll(self._snapshot)
                if changes or self._snapshot is None or poll:
                    self.refresh_now(changes)
                self.last_error = None
            except Exception as e:  # keep serving the previous snapshot
                self.last_error = str(e)
                log.exception("refresh failed; still serving the previous snapshot")
            # Let a burst of events accumulate instead of re-reading for each.
            self._stop.wait(max(0.0, self.min_gap - (time.monotonic() - started)))
