"""Opening the files iscsimple reads and the directories it keeps root-owned state in.

Every file iscsimple reads is untrusted. A FIFO, a device or a socket given as a
tab, config or domU .cfg must be refused before a byte is read (reading a FIFO
blocks a hotplug script past libxl's 40 s); a symlink planted in a state directory
must not be followed (root would read or write wherever it points); a NUL byte in
a path is a clear error, not a ValueError. Directories of root-owned state are
created with explicit modes whatever the umask (xl's umask is not ours to choose)
and refused when another user could plant files in them.

Failures are OSErrors with a sentence in `strerror`, so every caller's existing
``except OSError`` turns them into its own one-line message.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import OperationError, StateFileError

# An operator's files (tab, config, domU .cfg) are a few KiB; state files far less.
MAX_INPUT_BYTES = 4 * 1024 * 1024
MAX_STATE_BYTES = 1024 * 1024

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


class UnsafeFileError(OperationError, OSError):
    """Not a file we read: a special file, a symlink where none is followed, a NUL in the path, too big,
    a state directory others could write. An OSError for callers that wrap read failures in their
    own message, an OperationError (one sentence, exit 1) for those that do not."""

    def __init__(self, path: Path | str, reason: str, code: int = errno.EINVAL):
        super().__init__(code, reason, _printable(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_path(path: Path | str) -> None:
    """Refuse a path with a NUL byte (the kernel cannot be given one)."""
    if "\0" in os.fspath(path):
        raise UnsafeFileError(path, "the path contains a NUL byte")


def read_file(path: Path | str, *, follow_symlinks: bool = True, max_bytes: int = MAX_INPUT_BYTES) -> bytes:
    """The content of a regular file; anything else is refused before it is read.

    stat first (so opening a device never happens), then open non-blocking and check the
    opened file again (it may have been swapped in between). `follow_symlinks=False` for
    state files: a symlink there is refused, not followed.
    """
    check_path(path)
    st = os.stat(path, follow_symlinks=follow_symlinks)
    _require_regular(path, st.st_mode)
    return _open_and_read(path, path, None, follow_symlinks, max_bytes)


_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _open_and_read(
    path: Path | str, name: Path | str, dir_fd: int | None, follow_symlinks: bool, max_bytes: int
) -> bytes:
    """Open `name` (relative to dir_fd when given) non-blocking, check that the opened file is
    regular (it may have been swapped since it was looked at) and read at most max_bytes of it;
    `path` names it in errors."""
    flags = _READ_FLAGS if follow_symlinks else _READ_FLAGS | os.O_NOFOLLOW
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:
            raise UnsafeFileError(
                path, "is a symbolic link; links are not followed here", errno.ELOOP
            ) from None
        raise
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise UnsafeFileError(
                    path, f"is larger than {max_bytes} bytes; not a file iscsimple wrote or expects"
                )
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_regular(path: Path | str):
    """A binary file object on a regular file, for a reader that keeps it open (poll on
    /proc/mdstat): a FIFO, device or directory is refused before it could block."""
    check_path(path)
    _require_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _require_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_text(path: Path | str, **options) -> str:
    """read_file decoded as UTF-8 (UnicodeDecodeError for anything else)."""
    return read_file(path, **options).decode("utf-8")


def read_problem(error: OSError | UnicodeDecodeError) -> str:
    """A read failure in words, without the path (callers put it first)."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"
    return error.strerror or str(error)


def load_state_json(path: Path) -> object:
    """One state file's JSON: a regular file (no symlink followed, no FIFO), bounded, parsed.

    FileNotFoundError passes through (callers decide what absent means); everything else
    is a StateFileError naming the file and the problem.
    """
    return _state_json(path, lambda: read_file(path, follow_symlinks=False, max_bytes=MAX_STATE_BYTES))


def load_state_json_at(dir_fd: int, entry: os.DirEntry, path: str) -> object:
    """load_state_json of a directory entry listed by os.scandir(dir_fd), opened relative to
    dir_fd. The listing's file type stands for read_file's stat before the open (nothing but
    a regular file is opened); the opened file is checked again, as there."""
    return _state_json(path, lambda: _read_entry(dir_fd, entry, path))


# The largest whole number a state file holds (an inode, a ctime in ns, a count): beyond it a
# number is garbage, and turned into a float (a time check, a metric) it would raise OverflowError.
MAX_STATE_INT = 2**64


def _state_int(text: str) -> int:
    value = int(text)
    if not -MAX_STATE_INT < value < MAX_STATE_INT:
        raise ValueError(f"number {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _state_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 reads as inf
        raise ValueError(f"number {text[:24]} is out of range")
    return value


def _state_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number")  # iscsimple never writes NaN or Infinity


def _state_json(path: Path | str, read) -> object:
    """Strict JSON: a number out of range or NaN/Infinity is a corrupt file, not a value every
    reader would have to check against OverflowError."""
    try:
        return json.loads(
            read(), parse_int=_state_int, parse_float=_state_float, parse_constant=_state_constant
        )
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise StateFileError(f"{path}: unreadable: {read_problem(e)}") from None
    except (ValueError, RecursionError) as e:
        raise StateFileError(f"{path}: not valid JSON: {str(e)[:80]}") from None


def load_state_json_in(dir_fd: int, name: str, path: Path | str) -> object:
    """load_state_json of file `name` in the directory open as dir_fd (open_state_dir): no
    symlink followed, neither to the file nor to its directory. `path` names it in errors."""
    return _state_json(path, lambda: _read_named(dir_fd, name, path))


def _read_named(dir_fd: int, name: str, path: Path | str) -> bytes:
    check_path(name)
    _require_regular(path, os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    return _open_and_read(path, name, dir_fd, False, MAX_STATE_BYTES)


def _read_entry(dir_fd: int, entry: os.DirEntry, path: str) -> bytes:
    check_path(path)
    if not entry.is_file(follow_symlinks=False):
        _require_regular(path, entry.stat(follow_symlinks=False).st_mode)
    return _open_and_read(path, entry.name, dir_fd, False, MAX_STATE_BYTES)


def _require_regular(path: Path | str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
        raise UnsafeFileError(path, f"is {kind_of(mode)}, not a regular file", code)


# -- directories of root-owned state --------------------------------------------------------------


def trusted_uids() -> frozenset[int]:
    """Who may own a state directory: root, and whoever runs us (the same in production)."""
    return frozenset({0, os.geteuid()})


def ensure_dir(
    path: Path | str, mode: int = 0o755, *, trusted: Iterable[int] | None = None, check: bool = True
) -> Path:
    """Create `path` (and missing parents) with exactly `mode`, whatever the umask; check it.

    With `check` (root's state), the directory is accepted only if it is a real directory (not a symlink), owned by
    a trusted user and not writable by group or others: otherwise another user could plant
    the symlinks and files root then follows. Raises UnsafeFileError naming the problem.
    """
    path = Path(path)
    check_path(path)
    missing = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            pass  # made by a concurrent hotplug: checked below like any existing one
        else:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, mode)  # mkdir's mode is masked by the umask
            finally:
                os.close(fd)
    if check:
        check_dir(path, trusted=trusted)
    return path


def check_dir(path: Path | str, *, trusted: Iterable[int] | None = None) -> None:
    """Refuse a state directory that is a symlink, not a directory, foreign-owned or writable by others."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFileError(path, f"is {kind_of(st.st_mode)}, expected a directory for iscsimple's state")
    owners = trusted_uids() if trusted is None else frozenset(trusted)
    if st.st_uid not in owners:
        raise UnsafeFileError(
            path,
            f"is owned by uid {st.st_uid}, not root; refusing to keep root's state there "
            f"(chown root: {_printable(path)})",
            errno.EPERM,
        )
    if st.st_mode & 0o022:
        raise UnsafeFileError(
            path,
            f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); refusing to keep "
            f"root's state there (chmod go-w {_printable(path)})",
            errno.EPERM,
        )


def open_state_dir(path: Path | str, levels: int = 0) -> int:
    """A descriptor of state directory `path` to read, never reached through a symlink (ensure_dir's
    read side): `path` and its `levels` parents (the directories iscsimple makes above it) are each
    opened O_NOFOLLOW relative to the one above, so a planted link is refused, not followed.

    FileNotFoundError passes through (callers decide what absent means); a symlink or anything
    but a directory there is an UnsafeFileError naming it."""
    path = Path(path)
    check_path(path)
    chain = [*reversed(path.parents[:levels]), path] if levels else [path]
    fd = os.open(chain[0].parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for directory in chain:
            try:
                child = os.open(
                    directory.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as e:
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                mode = os.stat(directory.name, dir_fd=fd, follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    raise UnsafeFileError(
                        directory,
                        "is a symbolic link; iscsimple's state directories are never reached through one "
                        "(put a real directory there)",
                        errno.ELOOP,
                    ) from None
                raise UnsafeFileError(
                    directory,
                    f"is {kind_of(mode)}, expected a directory for iscsimple's state",
                    errno.ENOTDIR,
                ) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_lock_file(path: Path | str, mode: int = 0o600) -> int:
    """A lock file's descriptor: created with `mode`, never through a symlink, always a regular file."""
    check_path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFileError(
                path, "is a symbolic link; refusing to lock through it", errno.ELOOP
            ) from None
        raise
    try:
        _require_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _printable(path: Path | str) -> str:
    return os.fspath(path).replace("\0", "\\0")


# How close to a file's mtime a stat must be to trust "unchanged": within one timestamp tick a
# second write can leave the same mtime (the racy-git problem), so such a file is read again.
_RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class FileSignature:
    """What a stat says of a file, to tell whether it must be read again."""

    stat: tuple[int, int, int, int] | None  # (inode, size, mtime_ns, ctime_ns); None: absent
    checked_ns: int

    @classmethod
    def of(cls, path: Path | str, follow_symlinks: bool = True) -> FileSignature:
        now = time.time_ns()
        try:
            st = os.stat(path, follow_symlinks=follow_symlinks)
        except OSError:
            return cls(None, now)
        return cls((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), now)

    def moved_since(self, old: FileSignature | None) -> bool:
        if old is None or old.stat != self.stat:
            return True
        return old.stat is not None and old.checked_ns - max(old.stat[2], old.stat[3]) < _RACY_NS
