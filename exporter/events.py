"""Kernel events that make the agent re-read the host at once.

- udev (pyudev): block devices and iSCSI/SCSI objects appearing, going or
  changing (a LUN going offline, a session being torn down, an md array built).
- /proc/mdstat: md bumps an event counter on every array change (a leg failed,
  recovery started or ended) and wakes pollers with POLLPRI|POLLERR, which is how
  `mdadm --monitor` waits (select() on exceptfds). The file must then be read
  again (from the start) to re-arm the notification.
Each watcher runs in its own daemon thread and only calls `on_event(reason, changes)`,
naming what changed (udev: the device; mdstat: the arrays whose lines differ), so the
refresher re-reads only that; it coalesces bursts.

The kernel announces neither a resync's progress nor an iSCSI session's state change
by uevent, so `ChangePoll` (run by the refresher on its schedule) looks at the two cheap
places that show them: /proc/mdstat (diffed per array; also the net under a missed md
event) and each session's `state`. A session's failure is logged by the kernel, though
(`connection1:0: detected conn error (1020)`, then `session1: session recovery timed out
after 5 secs`): `KernelLogWatcher` follows /dev/kmsg and has that session re-read at once
and a few times in the next seconds (its state turns FAILED a moment after the message),
so an outage shows within the second instead of at the next poll. md logs, too, when it
drops an array's write-intent bitmap ("md127: kicking failed bitmap file ... from array!") while
/proc/mdstat still shows it: the watcher notes that in the agent's `BitmapKicks` (read from the
whole kernel log once when it starts) and has the array re-read.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, Self

from iscsimple.core.bitmap import BitmapKicks, parse_kmsg_record, read_kernel_log_at
from iscsimple.core.files import open_regular, read_file
from iscsimple.core.iscsi import read_session_states
from iscsimple.core.mdstat import MAX_MDSTAT_BYTES, changed_arrays
from iscsimple.core.snapshot import Changes, HostSnapshot

log = logging.getLogger(__name__)

UDEV_SUBSYSTEMS = ("block", "scsi", "iscsi_session", "iscsi_connection")


class Monitor(Protocol):
    """The part of pyudev.Monitor the watcher uses (tests inject a fake)."""

    def poll(self, timeout: float | None = None) -> Any: ...

    # pyudev's Monitor also has fileno(): the watcher then sleeps in poll() until an event or
    # stop(); a monitor without one is asked with a one-second timeout.


def udev_monitor() -> Monitor | None:
    """A pyudev monitor on the subsystems we care about, or None where udev cannot be watched."""
    try:
        import pyudev

        context = pyudev.Context()
        # Events processed by udevd when it runs (device links exist by then), else raw kernel uevents.
        source = "udev" if os.path.exists("/run/udev/control") else "kernel"
        monitor = pyudev.Monitor.from_netlink(context, source=source)
        for subsystem in UDEV_SUBSYSTEMS:
            monitor.filter_by(subsystem)
        monitor.start()
        return monitor
    except Exception as e:  # no netlink in this sandbox/container: the schedule still refreshes
        log.warning("cannot watch udev events (%s); relying on /proc/mdstat and the schedule", e)
        return None


OnEvent = Callable[[str, Changes], None]


class MdstatDiff:
    """Which arrays' lines of /proc/mdstat changed since the last read.

    Shared by the md event watcher and the refresher's poll (under a lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._text: bytes | None = None
        self._lock = threading.Lock()
        self._unseen: set[str] = set()  # arrays whose lines changed since the last latest()

    def latest(self) -> tuple[bytes | None, set[str]]:
        """The text last read (None: none yet) and the arrays whose lines changed since the
        previous call: the agent's bitmap pass reads its arrays' lines here instead of reading
        /proc/mdstat again (the kernel writes every array's lines for each read)."""
        with self._lock:
            unseen, self._unseen = self._unseen, set()
            return self._text, unseen

    def read(self) -> set[str]:
        try:
            text = read_file(self.path, max_bytes=MAX_MDSTAT_BYTES)
        except OSError:
            return set()
        return self.changed(text)

    def changed(self, text: bytes | str) -> set[str]:
        if isinstance(text, str):
            text = text.encode("utf-8", "replace")
        with self._lock:
            before, self._text = self._text, text
        if before is None:
            return set()
        changed = changed_arrays(before, text)
        if changed:
            with self._lock:
                self._unseen |= changed
        return changed


class ChangePoll:
    """The scheduled look for what the kernel does not announce (run in the refresh thread).

    /proc/mdstat is compared on every poll, and the session directory listed (a session that
    appears or goes). Every session's `state` (one file per session) is read on every poll too,
    unless `announced()` says the kernel log is being followed: the kernel announces no session
    state change by uevent, but logs each failure of a logged-in session (`detected conn error`:
    FAILED; `session recovery timed out`: FREE) and the KernelLogWatcher re-reads that session at
    once. Then each poll reads only the sessions not LOGGED_IN (a session that logs in again is
    logged by no kernel line: it shows at the next poll), and every session's state once per
    `sessions_every` polls and at the next poll after `want_sessions()` (kernel log records were
    lost)."""

    def __init__(self, sysfs: Path, mdstat: MdstatDiff | None, sessions_every: int = 1):
        self.sysfs = sysfs
        self.mdstat = mdstat
        self.sessions_every = sessions_every
        self.announced: Callable[[], bool] | None = None
        self._polls_since_sessions = 0
        self._sessions_wanted = False

    def want_sessions(self) -> None:
        """Read every session's state on the next poll."""
        self._sessions_wanted = True

    def __call__(self, snapshot: HostSnapshot) -> Changes:
        md = self.mdstat.read() if self.mdstat is not None else set()
        self._polls_since_sessions += 1
        known = {s.name: s.state for s in snapshot.iscsi.sessions}
        announced = self.announced is not None and self.announced()
        skip: frozenset[str] | set[str] = frozenset()
        if announced and not self._sessions_wanted and self._polls_since_sessions < self.sessions_every:
            skip = {name for name, state in known.items() if state == "LOGGED_IN"}
        else:
            self._polls_since_sessions = 0
            self._sessions_wanted = False
        states = read_session_states(self.sysfs, skip)
        sessions = {
            n
            for n in known.keys() | states.keys()
            if (n not in states if n in skip else known.get(n, "?") != states.get(n, "?"))
        }
        return Changes(md=frozenset(md), sessions=frozenset(sessions))


class _Watcher:
    """A daemon thread running `_run` until `stop()`. A watcher waits in poll() with its wake
    descriptor among the others, so it sleeps until something happens or it is stopped: an idle
    agent's threads do not wake on a timer (each wake-up costs CPU on every host, all day)."""

    name = "watcher"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._wake_read = self._wake_write = -1  # made by start(), closed when the thread ends
        self._wake_lock = threading.Lock()  # no write to a descriptor number closed and reused
        self.thread = threading.Thread(target=self._wrapped_run, name=self.name, daemon=True)

    def start(self) -> Self:
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._wake_lock:
            if self._wake_write >= 0:
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                    os.write(self._wake_write, b"x")

    def _poller(self, fd: int, mask: int) -> select.poll:
        """A poll set of `fd` and the wake descriptor."""
        poller = select.poll()
        poller.register(fd, mask)
        poller.register(self._wake_read, select.POLLIN)
        return poller

    def _wrapped_run(self) -> None:
        try:
            self._run()
        finally:
            self._stop.set()
            with self._wake_lock:
                os.close(self._wake_read)
                os.close(self._wake_write)
                self._wake_read = self._wake_write = -1

    def _run(self) -> None:
        raise NotImplementedError


class UdevWatcher(_Watcher):
    name = "udev"

    def __init__(self, monitor: Monitor, on_event: OnEvent):
        self.monitor = monitor
        self.on_event = on_event
        super().__init__()

    def _run(self) -> None:
        fileno = getattr(self.monitor, "fileno", None)
        poller = self._poller(fileno(), select.POLLIN) if fileno is not None else None
        while not self._stop.is_set():
            try:
                devices = self._wait(poller, fileno() if fileno is not None else -1)
            except Exception as e:
                log.warning("udev monitor failed (%s); relying on the schedule", e)
                return
            for device in devices:
                self._event(device)

    def _wait(self, poller: select.poll | None, fd: int) -> list:
        """The next devices the monitor has (none when stopped)."""
        if poller is None:  # a monitor without a descriptor: look at the stop flag every second
            device = self.monitor.poll(timeout=1.0)
            return [] if device is None else [device]
        events = poller.poll()  # the monitor's socket or the wake descriptor
        if self._stop.is_set():
            return []
        if any(f == fd and mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for f, mask in events):
            raise OSError(f"the udev monitor's socket reports an error (poll events {events})")
        devices = []
        while (device := self.monitor.poll(timeout=0)) is not None:
            devices.append(device)
        return devices

    def _event(self, device) -> None:
        action = getattr(device, "action", None) or "change"
        name = getattr(device, "sys_name", None) or "?"
        subsystem = getattr(device, "subsystem", None) or "?"
        log.debug("udev: %s %s %s", action, subsystem, name)
        changes = Changes(devices=frozenset({name})) if name != "?" else Changes(everything=True)
        self.on_event(f"udev {action} {subsystem} {name}", changes)


class MdstatWatcher(_Watcher):
    """Waits for md events on /proc/mdstat the way mdadm --monitor does."""

    name = "mdstat"

    def __init__(
        self,
        path: Path,
        on_event: OnEvent,
        opener: Callable[[], Any] | None = None,
        poll_timeout: float | None = None,
        diff: MdstatDiff | None = None,
    ):
        self.path = Path(path)
        self.on_event = on_event
        self.diff = diff or MdstatDiff(self.path)
        self.opener = opener or (lambda: open_regular(self.path))
        self.poll_timeout = poll_timeout
        super().__init__()

    def _run(self) -> None:
        try:
            f = self.opener()
        except OSError as e:
            log.info("not watching %s for md events: %s", self.path, e.strerror or e)
            return
        with f:
            self.diff.changed(_rearm(f))
            poller = self._poller(f.fileno(), select.POLLPRI | select.POLLERR)
            timeout = None if self.poll_timeout is None else self.poll_timeout * 1000
            while not self._stop.is_set():
                events = poller.poll(timeout)
                if self._stop.is_set():
                    return
                if not any(
                    fd == f.fileno() and mask & (select.POLLPRI | select.POLLERR) for fd, mask in events
                ):
                    continue
                changed = self.diff.changed(_rearm(f))
                if changed:
                    self.on_event("md event (/proc/mdstat)", Changes(md=frozenset(changed)))


def _rearm(f) -> bytes:
    """Reading mdstat from the start acknowledges the event (md_seq_start stores the counter)."""
    with contextlib.suppress(OSError, ValueError):
        f.seek(0)
    return f.read(MAX_MDSTAT_BYTES) or b""


# What the kernel logs when an iSCSI connection fails and when its session gives up (the
# replacement timeout): scsi_transport_iscsi's iscsi_conn_error_event and session recovery.
_CONN_ERROR = re.compile(r"\bconnection([0-9]{1,9}):[0-9]{1,9}: detected conn error")
_RECOVERY_TIMED_OUT = re.compile(r"\bsession([0-9]{1,9}): session recovery timed out")
# Seconds after such a message to re-read the session again: the state it reports changes
# a moment later (the kernel blocks the session in a work item), and a re-read is cheap.
FOLLOW_UPS = (0.05, 0.2, 0.5, 1.0, 2.0)


def sessions_in_kernel_log(text: str) -> set[str]:
    """The iSCSI sessions that kernel log records (as /dev/kmsg gives them) say failed."""
    found = {f"session{m[1]}" for m in _CONN_ERROR.finditer(text)}
    found.update(f"session{m[1]}" for m in _RECOVERY_TIMED_OUT.finditer(text))
    return found


class KernelLogWatcher(_Watcher):
    """Follows /dev/kmsg (new records only) for iSCSI session failures and, given `kicks`, for
    bitmaps md dropped (those it also reads from the records logged before it started)."""

    name = "kmsg"

    def __init__(
        self,
        path: Path,
        on_event: OnEvent,
        opener: Callable[[], int] | None = None,
        poll_timeout: float | None = None,
        follow_ups: tuple[float, ...] = FOLLOW_UPS,
        kicks: BitmapKicks | None = None,
        on_lost: Callable[[], None] | None = None,
    ):
        self.path = Path(path)
        self.kicks = kicks
        self.on_event = on_event
        self.opener = opener or self._open
        self.poll_timeout = poll_timeout
        self.follow_ups = follow_ups
        self.on_lost = on_lost  # records were overwritten before we read them
        self._following = False
        super().__init__()

    def following(self) -> bool:
        """True while the kernel log is open and read (session failures are announced)."""
        return self._following and self.thread.is_alive() and not self._stop.is_set()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISCHR(os.fstat(fd).st_mode):  # never read a disk or wait on a FIFO named so
            os.close(fd)
            raise OSError(errno.EINVAL, "not a character device")
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_END)  # what happened before the agent started is in the snapshot
        return fd

    def _run(self) -> None:
        try:
            fd = self.opener()
        except OSError as e:
            log.info(
                "not watching %s for iSCSI session failures (%s); the poll sees them",
                self.path,
                e.strerror or e,
            )
            return
        due: dict[str, list[float]] = {}  # session -> when to re-read it again
        self._following = True
        try:
            self._read_earlier_kicks()
            poller = self._poller(fd, select.POLLIN)
            while not self._stop.is_set():
                now = time.monotonic()
                waits = [times[0] - now for times in due.values()]
                if self.poll_timeout is not None:
                    waits.append(self.poll_timeout)
                events = poller.poll(max(0.0, min(waits)) * 1000 if waits else None)
                if self._stop.is_set():
                    return
                readable = any(f == fd for f, _ in events)
                failed, kicked = self._read(fd) if readable else (set(), set())
                if kicked:
                    self.on_event("kernel log: md dropped a bitmap", Changes(md=frozenset(kicked)))
                now = time.monotonic()
                if failed:
                    for name in failed:
                        due[name] = [now + delay for delay in self.follow_ups]
                    self.on_event("kernel log: iSCSI connection failed", Changes(sessions=frozenset(failed)))
                again = {name for name, times in due.items() if times[0] <= now}
                for name in again:
                    due[name] = [t for t in due[name] if t > now]
                    if not due[name]:
                        del due[name]
                if again - failed:
                    self.on_event("kernel log: follow-up", Changes(sessions=frozenset(again - failed)))
        finally:
            self._following = False
            os.close(fd)

    def _read_earlier_kicks(self) -> None:
        """Kicks logged before the agent started (the follow descriptor is already at the end, so
        nothing logged from now on is missed). The snapshot has the sessions' state already."""
        if self.kicks is None:
            return
        klog = read_kernel_log_at(self.path)
        kicked = self.kicks.note_log(klog.messages) if klog is not None else set()
        if kicked:
            self.on_event("kernel log: md dropped a bitmap (before start)", Changes(md=frozenset(kicked)))

    def _read(self, fd: int) -> tuple[set[str], set[str]]:
        """The sessions that new records say failed, and the arrays whose bitmap md dropped."""
        failed: set[str] = set()
        kicked: set[str] = set()
        while True:
            try:
                record = os.read(fd, 8192)  # /dev/kmsg gives one record per read
            except BlockingIOError:
                break
            except BrokenPipeError:  # records were overwritten before we read them: go on
                if self.on_lost is not None:
                    self.on_lost()  # a failure may be among them
                continue
            except OSError as e:
                log.warning("reading %s failed (%s); the poll still sees session failures", self.path, e)
                self._stop.set()
                break
            if not record:  # end of file: not a kernel log after all
                self._stop.set()
                break
            text = record.decode("utf-8", "replace")
            failed |= sessions_in_kernel_log(text)
            parsed = parse_kmsg_record(text.partition("\n")[0]) if self.kicks is not None else None
            if parsed is not None:
                kicked |= self.kicks.note_log([(parsed[0], parsed[2])])  # type: ignore[union-attr]
        return failed, kicked
