"""Atomic, durable file writes for root-owned state."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from .files import UnsafeFileError, check_path, ensure_dir, kind_of


def write_atomic(
    path: Path,
    data: bytes | str,
    mode: int = 0o644,
    fsync: bool = True,
    *,
    owner: tuple[int, int] | None = None,
    private_dir: bool = True,
) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a torn one.

    With fsync the data and the rename are on disk before we return: a record that
    says "the local leg holds the only good copy" must survive a power cut.

    Mode (and `owner`, uid and gid) are set on the temporary file's descriptor before the
    rename, so the file never exists under its name with other ones, and nothing is
    changed through a symlink swapped in meanwhile. A missing directory is created 0755
    whatever the umask; with `private_dir` (root's state) the directory must also be
    root's and not writable by others (files.check_dir), else it is refused.
    """
    path = Path(path)
    check_path(path)
    if isinstance(data, str):
        data = data.encode()
    ensure_dir(path.parent, check=private_dir)
    _refuse_special(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if owner is not None and owner != (os.fstat(f.fileno()).st_uid, os.fstat(f.fileno()).st_gid):
                os.fchown(f.fileno(), *owner)
            os.fchmod(f.fileno(), mode)
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def _refuse_special(path: Path) -> None:
    """The rename would replace whatever is there: never a device, FIFO, socket or directory (a
    typo such as --textfile /dev/null must not turn the device into a file)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise UnsafeFileError(path, f"is {kind_of(st.st_mode)}, not a regular file: refusing to replace it")


def fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_durably(path: Path) -> bool:
    """Unlink `path` and make the removal durable. Returns False if it was already gone."""
    path = Path(path)
    check_path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
