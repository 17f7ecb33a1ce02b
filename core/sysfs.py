"""Reading sysfs attribute files: the one place md.py and iscsi.py share.

An attribute is a small text file the kernel fills on read (at most a page). A
reader that runs on every scrape must survive any of them being missing (the
object went away), unreadable or holding garbage: that attribute becomes None
and, if a healthy object always has it, a line in the caller's error list.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from iscsimple.core.errors import OperationError

__all__ = [
    "AttrReader",
    "SysfsError",
    "block_holders",
    "block_size_bytes",
    "open_dir",
    "parse_dev",
    "parse_int",
    "read_bytes",
]

T = TypeVar("T")

_INT = re.compile(r"-?[0-9]{1,20}")
_MAX_ATTR_BYTES = 4096  # sysfs attributes are at most one page
SECTOR = 512  # the unit of a block device's `size`


class SysfsError(OperationError):
    """A sysfs object we were asked for is not there (array stopped, session gone)."""


class AttrReader:
    """Reads the attribute files of one directory; problems with required ones go to `errors`.

    With `dir_fd` (an open descriptor of `directory` or of an ancestor, `relative` being the
    path from there), files are opened relative to it: the kernel then resolves a name or two
    instead of the whole /sys/block/<link>/md/... path for each of ~100k reads per scrape.
    Error messages always name the full path.
    """

    def __init__(self, directory: str, errors: list[str], dir_fd: int | None = None, relative: str = ""):
        self.directory = directory
        self.errors = errors
        self.dir_fd = dir_fd
        self.relative = relative

    def _bytes(self, attr: str, required: bool) -> bytes | None:
        """The file's bytes; None when missing or unreadable (an error line if `required`)."""
        try:
            if self.dir_fd is None:
                return read_bytes(os.path.join(self.directory, attr))
            return read_bytes(self.relative + attr, self.dir_fd)
        except FileNotFoundError:
            if required:
                self.errors.append(f"{os.path.join(self.directory, attr)}: missing")
            return None
        except OSError as e:
            if required:
                self.errors.append(f"{os.path.join(self.directory, attr)}: unreadable: {e.strerror or e}")
            return None

    def text(self, attr: str, required: bool, empty_ok: bool = True, shared: bool = True) -> str | None:
        """The stripped content, or None if missing, unreadable, not text, or empty when not `empty_ok`.

        `shared`: its values repeat across arrays and sessions (a state, a level), so the text is
        remembered and every equal value is one string; not for a text parsed at once (numbers,
        device numbers) or one of a kind (a target's name).

        The kernel writes one line of ASCII: bytes that are not UTF-8 or control characters mean
        the tree is not what we think it is, and that is an error even for an optional attribute."""
        data = self._bytes(attr, required)
        if data is None:
            return None
        return self._text(attr, data, required, empty_ok, shared)

    def _text(self, attr: str, data: bytes, required: bool, empty_ok: bool, shared: bool) -> str | None:
        text = _TEXTS.get(data)
        if text is None:
            text = _checked_text(data, shared)
            if text is None:
                self.errors.append(f"{os.path.join(self.directory, attr)}: not text: {data[:40]!r}")
                return None
        if not text and not empty_ok:
            if required:
                self.errors.append(f"{os.path.join(self.directory, attr)}: empty")
            return None
        return text

    def parsed(
        self, attr: str, required: bool, parse: Callable[[str], T], none_words: tuple[str, ...] = ("none",)
    ) -> T | None:
        """parse(text); None for a missing file, a none word or a value parse rejects (noted in errors)."""
        data = self._bytes(attr, required)
        if data is None:
            return None
        # Most values are plain decimal numbers (or major:minor): taken from the bytes at once,
        # as parse_int / parse_dev would from the decoded text. Anything else goes the long way.
        digits = data.strip()
        if parse is parse_int:
            if digits.isdigit() and len(digits) <= 20:
                return int(digits)  # type: ignore[return-value]
        elif parse is parse_dev:
            major, _, minor = digits.partition(b":")
            if major.isdigit() and minor.isdigit() and len(major) <= 20 and len(minor) <= 20:
                return f"{int(major)}:{int(minor)}"  # type: ignore[return-value]
        text = self._text(attr, data, required, True, False)
        if text is None or text in none_words:
            return None
        try:
            return parse(text)
        except ValueError:
            self.errors.append(f"{os.path.join(self.directory, attr)}: cannot parse {text[:80]!r}")
            return None


# O_NONBLOCK: a FIFO planted in a tree given as --path.sysfs must not block the reader.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC

# Texts already checked, by the bytes read, of the attributes whose values are shared. Most of their
# values repeat across thousands of arrays and sessions ("raid1", "clean", "in_sync",
# "LOGGED_IN"): a look-up instead of a decode, strip and check per file, and one string each
# instead of a copy per array kept in the snapshot. Texts parsed at once (sizes, counters,
# device numbers: mostly different per array) are not added. Bounded, so a tree of ever new
# values cannot grow it.
_TEXTS: dict[bytes, str] = {}
_MAX_TEXTS = 4096


def _checked_text(data: bytes, shared: bool = True) -> str | None:
    """`data` decoded and stripped; None when it is not one printable UTF-8 text."""
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not text.isprintable():
        return None
    if shared and len(_TEXTS) < _MAX_TEXTS:
        _TEXTS[data] = text
    return text


def read_bytes(path: str, dir_fd: int | None = None) -> bytes:
    """One read of an attribute file. os.open/os.read rather than open(): this runs ~100k
    times per scrape on a big host and the file object layers cost more than the syscalls."""
    fd = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
    try:
        return os.read(fd, _MAX_ATTR_BYTES)
    finally:
        os.close(fd)


def write_attr(path: str | os.PathLike, value: str) -> None:
    """Write one sysfs attribute (as `echo value > path`); never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode() + b"\n")
    finally:
        os.close(fd)


def open_dir(path: str) -> int:
    """A descriptor for AttrReader(dir_fd=...); raises FileNotFoundError/NotADirectoryError."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def parse_int(text: str) -> int:
    """A plain decimal sysfs number. Stricter than int(): "1_000", " +5" or 5000 digits are garbage."""
    if not _INT.fullmatch(text):
        raise ValueError(text)
    return int(text)


def parse_dev(text: str) -> str:
    """A `dev` attribute, "8:0", normalised."""
    major, sep, minor = text.partition(":")
    if not sep:
        raise ValueError(text)
    return f"{parse_int(major)}:{parse_int(minor)}"


# -- block devices -------------------------------------------------------------------
# /sys/class/block/NAME rather than /sys/block/NAME: the former also lists partitions.


def block_holders(sysfs: Path, name: str) -> list[str]:
    """What holds block device NAME (md arrays, dm devices), sorted. A device without the
    directory (gone) has none; any other error is raised (OSError): whoever decides whether a
    device is free must not take "cannot tell" for "free"."""
    try:
        return sorted(os.listdir(sysfs / "class" / "block" / name / "holders"))
    except FileNotFoundError:
        return []


def block_size_bytes(sysfs: Path, name: str) -> int | None:
    """The size of block device NAME (sysfs counts 512-byte sectors); None when unknown."""
    try:
        return parse_int(read_bytes(str(sysfs / "class" / "block" / name / "size")).decode().strip()) * SECTOR
    except (OSError, ValueError):
        return None
