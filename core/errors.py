"""The project's error types.

Every failure an operator can see is one of these, so the CLI and the hotplug
script can turn it into an exit code and a sentence, never a traceback.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

MAX_MESSAGE = 1000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(message: str) -> str:
    """`message` as one printable line: a newline or escape sequence that came in with a path or
    a value is shown escaped (xl shows hotplug-error as is; logs are read line by line)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], message)


def os_problem(error: OSError) -> str:
    """An OSError in words: the file and what the system said (no errno noise)."""
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


def time_text(seconds: float, *, utc: bool = False) -> str:
    """A time in seconds since the epoch as a date, local or UTC; one that no date can show (a
    corrupt record's, a wrong Prometheus sample's) in words instead of an OverflowError."""
    try:
        if utc:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.6g} s after 1970 (not a date: the time is out of range)"


class IscsimpleError(Exception):
    """Base of every error iscsimple reports to a person."""

    exit_code = 1


class InputError(IscsimpleError):
    """The input is wrong (a spec, a tab line, a config value): fix it and retry. CLI exit 2."""

    exit_code = 2


class OperationError(IscsimpleError):
    """An operation failed on the host (a command, a device, a timeout). CLI exit 1."""

    exit_code = 1


class FileInputError(InputError):
    """Bad input found in a file: ``FILE:LINE: message`` (``FILE: message`` when no line applies).

    The one error of every file parser (tab, iscsimple.toml, domU .cfg, convert-config), so
    check-config can collect them and editors can jump to the line.
    """

    def __init__(self, path: Path | str, line: int | None, message: str):
        if len(message) > MAX_MESSAGE:  # a file's line is echoed: keep the error readable
            message = message[:MAX_MESSAGE] + "…"
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.message = message


class StateFileError(OperationError):
    """A file of iscsimple's own state (registry entry, record, marker) is unreadable or corrupt.

    State files are input like any other: a local user, a full disk or an old version may
    have left anything there. The message names the file and what is wrong with it.
    """
