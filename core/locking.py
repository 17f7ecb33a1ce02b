"""Hotplug locks, compatible with Xen's tools/hotplug/Linux/locking.sh.

Xen's block scripts serialise with `claim_lock NAME` / `release_lock NAME`: open
(O_CREAT) /var/run/xen-hotplug/NAME, flock it, and hold the lock only if the path
still names the file that was locked (the holder releases by unlinking it, so a
waiter may have locked a file that is already gone: it retries). We follow the
same protocol in the same directory, so our locks and Xen's never overlap in
meaning, with one difference: Xen waits forever, we wait until the add's budget
is spent, because libxl kills a hotplug script that runs past 40 s.

Lock names: ``iscsimple-label-LABEL`` for everything touching one mirror (held for a
whole add or remove), ``iscsimple-target-IQN`` around the session decisions of one
target (login, the "is anyone still using it" check, logout). Always label first,
then target, so two operations can never wait on each other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OperationError
from .files import ensure_dir, open_lock_file
from .run import Deadline

log = logging.getLogger(__name__)

# Waiters poll (flock has no timeout); start fast, back off to keep 16 waiters cheap.
_POLL_FIRST = 0.005
_POLL_MAX = 0.05


class LockTimeout(OperationError):
    pass


def label_lock_name(label: str) -> str:
    return f"iscsimple-label-{label}"


def target_lock_name(target: str) -> str:
    # iSCSI names use [a-z0-9.:-] only (core.spec checks), so they are safe file names.
    return f"iscsimple-target-{target}"


@contextmanager
def hotplug_lock(lock_dir: Path, name: str, deadline: Deadline | None = None) -> Iterator[None]:
    """Hold the Xen-style lock `lock_dir/name` for the body; give up when `deadline` is spent."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"bad lock name {name!r}")
    ensure_dir(lock_dir)  # 0755 whatever the umask; refused if others could plant links in it
    path = lock_dir / name
    started = time.monotonic()
    fd = _claim(path, deadline)
    waited = time.monotonic() - started
    if waited > 1:
        log.info("waited %.1f s for lock %s", waited, name)
    try:
        yield
    finally:
        # release_lock: unlink while still holding it, then let go.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _claim(path: Path, deadline: Deadline | None) -> int:
    delay = _POLL_FIRST
    while True:
        fd = open_lock_file(path)  # never through a planted symlink
        try:
            while not _try_flock(fd):
                if deadline is not None and deadline.remaining() <= delay:
                    raise LockTimeout(
                        f"another hotplug operation held the lock {path} for the whole "
                        f"{deadline.seconds:.0f} s budget; retry, and if it persists check for a hung "
                        "block-iscsimple process"
                    )
                time.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
            locked = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder released (unlinked) it after we opened: try the new file


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
