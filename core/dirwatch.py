"""Which names in one directory changed since the last look (Linux inotify).

Listing a directory to find what changed costs what the directory holds; the kernel's
inotify queue says which names were created, replaced, written, removed or changed
attributes, in the time it takes to read a few bytes. A `DirWatch` answers `take()`
with the names touched since the previous call, or None when it cannot tell: the
queue overflowed, the directory itself was removed or renamed, the watch is gone.
Then the caller lists the directory as before (and starts a new watch first, so that
nothing between the listing and the next look is missed).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import weakref
from pathlib import Path

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MODIFY = 0x00000002
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

NAMES = IN_ATTRIB | IN_CLOSE_WRITE | IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
# The watch no longer says everything about the directory: list it again.
LOST = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_Q_OVERFLOW | IN_IGNORED
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

_libc = None


def _inotify():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return _libc


class DirWatch:
    """The names changed in one directory since the last `take()`; see the module doc."""

    def __init__(self, fd: int, directory: Path):
        self.fd = fd
        self.directory = directory
        self.alive = fd >= 0
        self.serial = -1  # which state of its user the next take() is relative to (the user's mark)
        self._close = weakref.finalize(self, os.close, fd) if fd >= 0 else None

    @classmethod
    def dead(cls, directory: Path) -> DirWatch:
        """A watch that could not be started: says only that (take() is None)."""
        return cls(-1, directory)

    @classmethod
    def start(cls, directory: Path) -> DirWatch | None:
        """A watch on `directory` (not following a symlink), or None when there cannot be one
        (no inotify, the per-user limit of instances or watches reached, no such directory)."""
        try:
            libc = _inotify()
        except (OSError, AttributeError):
            return None
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return None
        mask = NAMES | LOST | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            os.close(fd)
            return None
        return cls(fd, directory)

    def take(self) -> set[str] | None:
        """The names touched since the last call; None when the watch cannot tell (then it is
        dead: start another before listing the directory)."""
        if not self.alive:
            return None
        names: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self.close()
                return None
            offset = 0
            while offset + _EVENT.size <= len(data):
                _, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                if mask & LOST:
                    self.close()
                    return None
                if length:
                    name = data[offset : offset + length].split(b"\0", 1)[0]
                    names.add(os.fsdecode(name))
                offset += length

    def close(self) -> None:
        self.alive = False
        if self._close is not None:
            self._close()
