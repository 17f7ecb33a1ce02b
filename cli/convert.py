"""`iscsimple convert-config`: legacy ``iscsimple:`` disk entries → the form stock xl accepts.

    'iscsimple:lun0@iqn.2001-04.com.example:storage+web1,xvda2,w'
 →  'vdev=xvda2,access=w,script=block-iscsimple,target=lun0@iqn.2001-04.com.example:storage+web1'

xl (4.17) knows only the script prefixes iscsi:, nbd:, enbd: and drbd:; any other
``prefix:`` entry is rejected ("unknown value for format"). ``target=`` must come last
because it swallows the rest of the DISKSPEC. Only the string literal of a legacy entry
changes; every other byte of the file (comments, layout, quotes, other entries, line
endings) is kept.
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from iscsimple.core.atomic import write_atomic
from iscsimple.core.errors import FileInputError, InputError, OperationError
from iscsimple.core.files import read_file
from iscsimple.core.spec import SpecError, parse_spec, shorten
from iscsimple.core.xlcfg import XlString, string_lists

LEGACY_PREFIX = "iscsimple:"
SCRIPT = "block-iscsimple"
_ACCESS = frozenset({"w", "rw", "r", "ro"})
_DEVTYPES = {"disk", "cdrom"}


@dataclass(frozen=True)
class Rewrite:
    line: int
    old: str  # the entry's value (between the quotes)
    new: str


@dataclass(frozen=True)
class Conversion:
    path: str
    original: str  # decoded with surrogateescape: undecodable bytes survive the round trip
    converted: str
    rewrites: tuple[Rewrite, ...]

    @property
    def changed(self) -> bool:
        return self.converted != self.original

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.original.splitlines(keepends=True),
                self.converted.splitlines(keepends=True),
                fromfile=f"{self.path}",
                tofile=f"{self.path} (converted)",
            )
        )


def is_legacy(value: str) -> bool:
    return value.lstrip(" \t").startswith(LEGACY_PREFIX)


def legacy_to_xl(value: str) -> str:
    """'iscsimple:SPEC,VDEV[:DEVTYPE][,ACCESS]' → 'vdev=VDEV[,devtype=..],access=..,script=..,target=SPEC'.

    Raises ValueError with a sentence naming the bad part; the spec itself is checked too.
    """
    body = value.lstrip(" \t")[len(LEGACY_PREFIX) :]
    fields = [f.strip(" \t") for f in body.split(",")]
    if len(fields) < 2 or not fields[1]:
        raise ValueError(
            f"legacy entry {shorten(value)!r} has no virtual device; expected iscsimple:SPEC,VDEV,ACCESS"
        )
    if len(fields) > 3:
        raise ValueError(
            f"legacy entry {shorten(value)!r} has {len(fields)} fields; expected iscsimple:SPEC,VDEV,ACCESS"
        )
    spec, vdev = fields[0], fields[1]
    parse_spec(spec)  # SpecError names the bad part
    params = []
    vdev, _, devtype = vdev.partition(":")
    params.append(f"vdev={vdev}")
    if devtype:
        if devtype not in _DEVTYPES:
            raise ValueError(f"device type {devtype!r} in {shorten(value)!r} is neither 'disk' nor 'cdrom'")
        params.append(f"devtype={devtype}")
    if len(fields) == 3 and fields[2]:
        access = fields[2]
        if access not in _ACCESS:
            raise ValueError(f"access {access!r} in {shorten(value)!r} must be one of r, ro, w, rw")
        params.append(f"access={access}")
    # target= swallows the rest of the DISKSPEC, so it goes last.
    params += [f"script={SCRIPT}", f"target={spec}"]
    return ",".join(params)


def convert_text(text: str, path: str = "<cfg>") -> tuple[str, tuple[Rewrite, ...], list[InputError]]:
    """Rewrite every legacy disk entry of one file; returns (new text, rewrites, errors).

    An entry that cannot be converted is left as it is and reported; the caller must not
    write a file with errors.
    """
    try:
        entries = string_lists(text, path=path)
    except FileInputError as e:
        return text, (), [e]
    pieces: list[str] = []
    rewrites: list[Rewrite] = []
    errors: list[InputError] = []
    done = 0
    for entry in entries:
        if not is_legacy(entry.value):
            continue
        try:
            new_value = _convert_entry(entry)
        except (ValueError, SpecError) as e:
            errors.append(FileInputError(path, entry.line, str(e)))
            continue
        pieces += [text[done : entry.start], entry.quote, new_value, entry.quote]
        done = entry.end
        rewrites.append(Rewrite(entry.line, entry.value, new_value))
    pieces.append(text[done:])
    return "".join(pieces), tuple(rewrites), errors


def _convert_entry(entry: XlString) -> str:
    if entry.has_escape:
        raise ValueError(f"entry {shorten(entry.value)!r} holds a backslash escape; convert it by hand")
    new_value = legacy_to_xl(entry.value)
    if entry.quote in new_value:
        raise ValueError(f"entry {shorten(entry.value)!r} would contain its own quote {entry.quote}")
    return new_value


def convert_file(path: Path | str) -> tuple[Conversion | None, list[InputError]]:
    path = Path(path)
    try:
        data = read_file(path)
    except FileNotFoundError:
        return None, [FileInputError(path, None, "no such file; give the path of a domU .cfg file")]
    except OSError as e:
        return None, [
            FileInputError(path, None, f"cannot read it ({e.strerror}); give the path of a domU .cfg file")
        ]
    text = data.decode("utf-8", "surrogateescape")
    converted, rewrites, errors = convert_text(text, str(path))
    return Conversion(str(path), text, converted, rewrites), errors


def backup_path(path: Path, now: float | None = None) -> Path:
    """FILE.bak, or FILE.bak-YYYYMMDDTHHMMSS when FILE.bak already exists (an older backup is kept)."""
    plain = path.with_name(path.name + ".bak")
    if not plain.exists():
        return plain
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(time.time() if now is None else now))
    candidate = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak-{stamp}.{n}")
        n += 1
    return candidate


def write_conversion(conversion: Conversion) -> Path:
    """Keep a backup, then replace the file atomically (through a symlink, keeping mode and owner)."""
    path = Path(os.path.realpath(conversion.path))
    try:
        st = path.stat()
        current = read_file(path).decode("utf-8", "surrogateescape")
    except OSError as e:
        raise OperationError(f"{path}: cannot read it again before writing ({e.strerror})") from None
    if current != conversion.original:
        raise OperationError(f"{path} changed while it was being converted; run convert-config again")
    backup = backup_path(path)
    try:
        _write_like(backup, conversion.original, st)
        _write_like(path, conversion.converted, st)
    except OSError as e:
        raise OperationError(
            f"{path}: cannot write ({e.strerror}); the file is unchanged or backed up at {backup}"
        ) from None
    return backup


def _write_like(path: Path, text: str, st: os.stat_result) -> None:
    """Owner and mode of the original, set on the temporary file before it takes the name."""
    write_atomic(
        path,
        text.encode("utf-8", "surrogateescape"),
        mode=st.st_mode & 0o7777,
        owner=(st.st_uid, st.st_gid),
        private_dir=False,
    )
