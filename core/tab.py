"""The tab file: which local device mirrors which LABEL.

    # LABEL        LOCAL DEVICE
    vm1-disk       /dev/vg0/vm1-disk
    vm2-disk       MISSING-until-the-lv-is-made

One entry per line, ``#`` starts a comment, blank lines are ignored. A DEVICE
beginning with ``MISSING`` leaves the local leg out. Errors read ``FILE:LINE: message``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FileInputError
from .files import read_problem, read_text
from .spec import MISSING_PREFIX, check_label

TabError = FileInputError  # the one FILE:LINE error type (core.errors), under its old name


@dataclass(frozen=True)
class TabEntry:
    label: str
    device: str | None  # None: MISSING, no local leg
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Tab:
    path: str
    entries: dict[str, TabEntry] = field(default_factory=dict)

    def lookup(self, label: str) -> TabEntry:
        try:
            return self.entries[label]
        except KeyError:
            raise FileInputError(
                self.path,
                None,
                f"no entry for LABEL {label!r}; add a line '{label} /dev/VG/LV' "
                f"(or '{label} MISSING' for a mirror without local leg)",
            ) from None


def parse_tab(text: str, path: Path | str = "<tab>") -> Tab:
    """Parse the whole file; raise the first error with its line."""
    tab, errors = check_tab_text(text, path)
    if errors:
        raise errors[0]
    return tab


def check_tab_text(text: str, path: Path | str = "<tab>") -> tuple[Tab, list[FileInputError]]:
    """Parse every line and collect every error (for `iscsimple check-config`).

    The Tab holds the lines that were good; a line with an error is left out.
    """
    tab = Tab(path=str(path))
    errors: list[FileInputError] = []
    devices: dict[str, TabEntry] = {}
    # Only "\n" ends a line: str.splitlines() would also split on form feeds and
    # other separators and give line numbers no editor shows.
    for number, raw in enumerate(text.split("\n"), start=1):
        try:
            entry = _parse_line(raw, number, path, tab, devices)
        except FileInputError as e:
            errors.append(e)
            continue
        if entry is not None:
            tab.entries[entry.label] = entry
            if entry.device is not None:
                devices[entry.device] = entry
    return tab, errors


def _parse_line(
    raw: str, number: int, path: Path | str, tab: Tab, devices: dict[str, TabEntry]
) -> TabEntry | None:
    line = raw.split("#", 1)[0].strip()
    if not line:
        return None
    bad = next((c for c in line if not c.isprintable() and c not in " \t"), None)
    if bad is not None:
        # str.split() would take some of these for blanks, and a NUL cannot reach the kernel.
        raise FileInputError(
            path,
            number,
            f"control character U+{ord(bad):04X} in {line!r}; write LABEL and DEVICE in plain text",
        )
    fields = line.split()
    if len(fields) != 2:
        raise FileInputError(
            path,
            number,
            f"expected 'LABEL DEVICE' (two columns), found {len(fields)}: {line!r}",
        )
    label, device = fields
    check_label(label, lambda msg: FileInputError(path, number, msg))
    if label in tab.entries:
        first = tab.entries[label]
        raise FileInputError(
            path,
            number,
            f"LABEL {label!r} is already defined on line {first.line}; labels are unique per host",
        )
    if device.startswith(MISSING_PREFIX):
        return TabEntry(label, None, str(path), number)
    if not device.startswith("/"):
        raise FileInputError(
            path,
            number,
            f"DEVICE {device!r} for {label!r} is a relative path; write the absolute path, e.g. /dev/vg0/{label}",
        )
    # "/dev/vg0//a" and "/dev/vg0/a" are one device; symlinks are resolved by check-config on the host.
    device = os.path.normpath(device)
    # Two mirrors writing one local device would destroy both copies.
    if device in devices:
        other = devices[device]
        raise FileInputError(
            path,
            number,
            f"DEVICE {device} is already the local leg of {other.label!r} (line {other.line}); "
            "give each LABEL its own device",
        )
    return TabEntry(label, device, str(path), number)


def read_tab(path: Path | str) -> Tab:
    path = Path(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise FileInputError(
            path, None, "tab file not found; create it with one 'LABEL DEVICE' line per mirrored disk"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise FileInputError(path, None, f"cannot read the tab file: {read_problem(e)}") from None
    return parse_tab(text, path)
