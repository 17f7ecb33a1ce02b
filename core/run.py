"""Running external commands: argv lists only, and never without a time bound.

A hotplug must finish within libxl's 40 s budget even when the iSCSI target is
dead, so every call takes a timeout and an optional overall Deadline; on expiry
the whole process group is killed (libxl would not kill our children for us).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import OperationError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


class CommandError(OperationError):
    """A command exited non-zero (or could not be started)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, message: str | None = None):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
        super().__init__(message or f"{' '.join(argv)} failed: {detail}")


class CommandTimeout(CommandError):
    """A command killed at its time limit. `spent`: why the limit was shorter than the command's
    own timeout, when an overall Deadline cut it (what was left of a budget): then the budget,
    not the command's peer, is what ran out, and messages must say so."""

    def __init__(self, argv: Sequence[str], timeout: float, stderr: str = "", spent: str | None = None):
        if spent:
            message = f"{' '.join(argv)} did not finish in the {timeout:.1f} s left and was killed: {spent}"
        else:
            message = f"{' '.join(argv)} did not finish within {timeout:.0f} s and was killed"
        super().__init__(argv, None, stderr, message)
        self.timeout = timeout
        self.spent = spent


class DeadlineExceeded(OperationError):
    pass


class Deadline:
    """An overall time budget shared by several steps.

    `not_after` (a `clock` reading) caps it, `why` saying what the cap is: a hotplug's
    budget counts from its own start, but libxl's 40 s count from its fork of the script,
    and on a loaded dom0 the interpreter's start-up alone can take seconds of them.
    """

    def __init__(
        self, seconds: float, clock=time.monotonic, *, not_after: float | None = None, why: str = ""
    ):
        self._clock = clock
        self.seconds = seconds
        self.expires = clock() + seconds
        self._spent = f"the {seconds:.0f} s budget is spent"
        if not_after is not None and not_after < self.expires:
            self.expires = not_after
            self._spent = why or self._spent

    @property
    def spent(self) -> str:
        """What it means when this deadline has passed, in words."""
        return self._spent

    def remaining(self) -> float:
        return self.expires - self._clock()

    def reserving(self, seconds: float) -> Deadline:
        """The same deadline less `seconds` kept back (to undo what the steps did), at least 0.1 s from now."""
        earlier = copy.copy(self)
        earlier.expires = max(self.expires - seconds, self._clock() + 0.1)
        return earlier

    def bound(self, timeout: float, what: str = "the operation") -> float:
        """The smaller of `timeout` and what is left; raise if nothing is left."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded(f"gave up on {what}: {self._spent}")
        return min(timeout, left)


def process_started() -> float:
    """When this process was forked, as a `time.monotonic()` reading; now if unknown.

    The kernel counts a process's start in clock ticks of CLOCK_BOOTTIME
    (/proc/self/stat, field 22); a launcher that `exec`s keeps its fork's start.
    """
    now = time.monotonic()
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read(4096)
        # The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
        start_ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    # A nonsensical age (a clock set oddly, a foreign /proc) must not spend or extend the budget.
    return now - age if 0 <= age <= 3600 else now


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    deadline: Deadline | None = None,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Result:
    if isinstance(argv, str):  # a shell string would be split wrongly and invites injection
        raise TypeError("run() takes an argv list, not a string")
    argv = [str(a) for a in argv]
    limit = deadline.bound(timeout, argv[0]) if deadline else timeout
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Output is untrusted text: a byte that is not UTF-8 (a name from xenstore or a filer's
            # discovery) becomes U+FFFD, never a UnicodeDecodeError out of run().
            encoding="utf-8",
            errors="replace",
            env=dict(env) if env is not None else None,
            start_new_session=True,  # so a timeout can kill the command and everything it started
        )
    except OSError as e:
        raise CommandError(argv, None, str(e), f"cannot run {argv[0]}: {e.strerror or e}") from None
    try:
        stdout, stderr = proc.communicate(input, timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stderr = _reap_after_kill(proc)
        log.warning("timed out after %.1f s: %s", limit, " ".join(argv))
        spent = deadline.spent if deadline is not None and limit < timeout else None
        raise CommandTimeout(argv, limit, stderr or "", spent) from None
    seconds = time.monotonic() - started
    log.debug("ran in %.2f s, exit %d: %s", seconds, proc.returncode, " ".join(argv))
    result = Result(tuple(argv), proc.returncode, stdout, stderr, seconds)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, stderr)
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# A killed command is normally gone at once; one stuck in the kernel (D state, e.g.
# mdadm --stop on an array with I/O queued to a dead iSCSI session) or a grandchild
# that left our process group and holds the pipes could keep us waiting forever.
REAP_GRACE = 1.0


def _reap_after_kill(proc: subprocess.Popen) -> str:
    """What the killed command wrote to stderr, waiting at most REAP_GRACE; never blocks longer."""
    try:
        _, stderr = proc.communicate(timeout=REAP_GRACE)
        return stderr or ""
    except subprocess.TimeoutExpired:
        log.warning("pid %d did not exit after SIGKILL; leaving it behind", proc.pid)
        for pipe in (proc.stdout, proc.stderr, proc.stdin):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        return ""
