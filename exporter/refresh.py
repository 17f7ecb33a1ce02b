"""The agent's snapshot: read by one thread, swapped atomically, served to everyone.

`Refresher` owns the only thread that reads the host. Events and the schedule
call `request(reason)`; bursts (a udev storm while a target logs out) collapse
into one read. After each read it runs the watchers (state-change logging,
health checks, and later actions such as heal) and renders the exposition, then
publishes the result with one reference assignment: a scrape sees the old or
the new snapshot, never a mix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from iscsimple.core.snapshot import HostSnapshot

from .collectors.base import SnapshotCollector
from .exposition import Rendered, render

log = logging.getLogger(__name__)

Watcher = Callable[[HostSnapshot], object]


class Refresher:
    def __init__(
        self,
        read: Callable[[], HostSnapshot],
        collectors: Sequence[SnapshotCollector] = (),
        watchers: Sequence[Watcher] = (),
        min_gap: float = 0.05,
    ):
        self.read = read
        self.collectors = list(collectors)
        self.watchers = list(watchers)
        self.min_gap = min_gap
        self.current: Rendered | None = None
        self.refreshes = 0
        self.last_error: str | None = None
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._done = threading.Condition()
        self._reasons: list[str] = []
        self._snapshot: HostSnapshot | None = None
        self.thread = threading.Thread(target=self._run, name="refresh", daemon=True)

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

    def request(self, reason: str) -> None:
        self._reasons.append(reason)
        self._wanted.set()

    def refresh_now(self) -> Rendered:
        """Read and render in the caller's thread (--once, tests, start-up)."""
        snapshot = self.read()
        self._snapshot = snapshot
        for watcher in self.watchers:
            try:
                watcher(snapshot)
            except Exception:
                log.exception("watcher %r failed", watcher)
        rendered = render(snapshot, self.collectors)
        self.current = rendered
        with self._done:
            self.refreshes += 1
            self._done.notify_all()
        return rendered

    def wait_for_refresh(self, after: int, timeout: float) -> bool:
        """Block until more than `after` refreshes happened (tests, demo)."""
        with self._done:
            return self._done.wait_for(lambda: self.refreshes > after, timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            reasons, self._reasons = self._reasons, []
            log.debug("refreshing: %s", ", ".join(reasons[:5]) or "requested")
            started = time.monotonic()
            try:
                self.refresh_now()
                self.last_error = None
            except Exception as e:  # keep serving the previous snapshot
                self.last_error = str(e)
                log.exception("refresh failed; still serving the previous snapshot")
            # Let a burst of events accumulate instead of re-reading for each.
            self._stop.wait(max(0.0, self.min_gap - (time.monotonic() - started)))
