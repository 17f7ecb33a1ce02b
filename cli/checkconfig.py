"""`iscsimple check-config`: every error of the tab file, iscsimple.toml and the domU
disk entries, as ``FILE:LINE: message``, before a VM start finds them one at a time.

Parsing is core's (tab, spec, config, xlcfg); this module only walks the files,
collects, and adds the checks that need more than one file: a LABEL used by two disk
entries, a LUN given to two VMs, a LABEL without a tab line, a local device named twice
under different names (symlinks).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from iscsimple.core.config import check_config
from iscsimple.core.errors import FileInputError
from iscsimple.core.files import read_file, read_problem
from iscsimple.core.paths import HostPaths
from iscsimple.core.spec import DiskSpec, SpecError, parse_spec, shorten
from iscsimple.core.tab import Tab, check_tab_text
from iscsimple.core.xlcfg import parse_diskspec, string_lists

from .convert import SCRIPT, is_legacy, legacy_to_xl


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    labels_with_errors: set[str] = field(default_factory=set)

    @property
    def summary(self) -> str:
        return "; ".join(self.checked) or "nothing to check"


@dataclass(frozen=True)
class DiskUse:
    where: str  # FILE:LINE
    spec: DiskSpec


def check_all(paths: HostPaths, cfgs: list[Path], *, tab_given: bool = False) -> Report:
    report = Report()
    tab = _check_tab(paths, report, required=tab_given)
    _check_config(paths, report)
    uses: list[DiskUse] = []
    for cfg in cfgs:
        uses += _check_cfg(cfg, report)
    _check_uses(uses, tab, paths, report)
    if cfgs:
        report.checked.append(f"{len(uses)} iscsimple disk entries in {len(cfgs)} domU config file(s)")
    return report


def _check_tab(paths: HostPaths, report: Report, required: bool) -> Tab | None:
    path = paths.tab
    try:
        text = read_file(path).decode("utf-8")
    except FileNotFoundError:
        message = f"{path}: tab file not found; create it with one 'LABEL DEVICE' line per mirrored disk"
        (report.errors if required else report.warnings).append(message)
        return None
    except (OSError, UnicodeDecodeError) as e:
        report.errors.append(
            f"{path}: cannot read the tab file ({read_problem(e)}); check the path and encoding"
        )
        return None
    tab, errors = check_tab_text(text, path)
    report.errors += [str(e) for e in errors]
    # A LABEL on a line with an error is known, just not usable: no "has no line" for it later.
    lines = text.split("\n")
    for e in errors:
        fields = lines[e.line - 1].split("#", 1)[0].split() if e.line else []
        if fields:
            report.labels_with_errors.add(fields[0])
    _check_local_devices(tab, paths, report)
    report.checked.append(f"tab {path}: {len(tab.entries)} label(s)")
    return tab


def _host_path(device: str, paths: HostPaths) -> Path:
    """/dev/vg0/x under the (possibly injected) devfs."""
    if device.startswith("/dev/"):
        return paths.devfs / device[len("/dev/") :]
    return Path(device)


def _check_local_devices(tab: Tab, paths: HostPaths, report: Report) -> None:
    """On this host: does each device exist, is it a block device, is one named twice via symlinks?"""
    seen: dict[str, str] = {}
    for entry in tab.entries.values():
        if entry.device is None:
            continue
        host_path = _host_path(entry.device, paths)
        try:
            st = host_path.stat()
        except OSError:
            report.warnings.append(
                f"{entry.where}: DEVICE {entry.device} does not exist on this host; "
                f"attaching {entry.label} fails until it does"
            )
            continue
        if not stat.S_ISBLK(st.st_mode):
            report.errors.append(
                f"{entry.where}: DEVICE {entry.device} is not a block device; name an LV or a disk"
            )
            continue
        real = os.path.realpath(host_path)
        if real in seen:
            report.errors.append(
                f"{entry.where}: DEVICE {entry.device} is the same device as the local leg of {seen[real]}; "
                "give each LABEL its own device"
            )
        else:
            seen[real] = f"{entry.label!r} ({entry.where})"


def _check_config(paths: HostPaths, report: Report) -> None:
    try:
        os.lstat(paths.config)
    except FileNotFoundError:
        report.checked.append(f"config {paths.config}: absent, defaults apply")
        return
    except OSError:
        pass  # check_config says what is wrong with the path
    config, errors = check_config(paths.config)
    if errors:
        report.errors += [str(e) for e in errors]
        return
    report.checked.append(
        f"config {paths.config}: {len(config.target_replacement_timeout)} per-target timeout(s)"
    )


def _check_cfg(cfg: Path, report: Report) -> list[DiskUse]:
    try:
        text = read_file(cfg).decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        report.errors.append(f"{cfg}: no such file; give the path of a domU .cfg file")
        return []
    except OSError as e:
        report.errors.append(f"{cfg}: cannot read it ({read_problem(e)}); give the path of a domU .cfg file")
        return []
    if "\r" in text:
        line = text[: text.index("\r")].count("\n") + 1
        report.errors.append(
            f"{cfg}:{line}: carriage return (Windows line ending); xl rejects the file: convert it with dos2unix"
        )
    try:
        entries = string_lists(text, path=str(cfg))
    except FileInputError as e:
        report.errors.append(str(e))
        return []
    uses = []
    for entry in entries:
        where = f"{cfg}:{entry.line}"
        value = entry.value
        if is_legacy(value):
            try:
                value = legacy_to_xl(value)
            except (ValueError, SpecError) as e:
                report.errors.append(f"{where}: {e}")
                continue
            report.errors.append(
                f"{where}: legacy disk entry {shorten(entry.value)!r}; stock xl rejects it: "
                f"run 'iscsimple convert-config {cfg} --write'"
            )
        disk = parse_diskspec(value)
        swallowed = _swallowed_script(disk.target)
        if disk.script is None and swallowed is not None:
            # xl's target= takes the rest of the entry: the script= after it is part of the spec,
            # and xl would hand the whole string to its default block script.
            report.errors.append(
                f"{where}: target= comes before script={swallowed}; target= must come last (xl takes the "
                "whole rest of the entry as the spec, so this disk would not use block-iscsimple): "
                "move target=SPEC to the end"
            )
            continue
        if disk.script is None or os.path.basename(disk.script) != SCRIPT:
            continue
        if disk.target is None or "target" not in disk.params:
            report.errors.append(
                f"{where}: script={disk.script} without target=; end the entry with target=SPEC"
            )
            continue
        if not disk.vdev:
            report.errors.append(f"{where}: no vdev= (the guest's device, e.g. vdev=xvda2); add one")
        try:
            spec = parse_spec(disk.target)
        except SpecError as e:
            hint = ""
            if "," in disk.target and "=" in disk.target:
                hint = " (target= must come last: xl takes the whole rest of the entry as the spec)"
            report.errors.append(f"{where}: {e}{hint}")
            continue
        uses.append(DiskUse(where, spec))
    return uses


def _swallowed_script(target: str | None) -> str | None:
    """The script=block-iscsimple that a target= written too early swallowed, if any."""
    if target is None:
        return None
    for part in target.split(",")[1:]:
        key, eq, value = part.strip().partition("=")
        if key == "script" and eq and os.path.basename(value.strip()) == SCRIPT:
            return value.strip()
    return None


def _check_uses(uses: list[DiskUse], tab: Tab | None, paths: HostPaths, report: Report) -> None:
    labels: dict[str, str] = {}
    luns: dict[tuple[str, int], str] = {}
    for use in uses:
        spec = use.spec
        if spec.label is not None:
            if spec.label in labels:
                report.errors.append(
                    f"{use.where}: LABEL {spec.label!r} is also used at {labels[spec.label]}; two disks on one "
                    "mirror destroy each other's data: give each disk its own LABEL"
                )
            else:
                labels[spec.label] = use.where
            if (
                tab is not None
                and spec.label not in tab.entries
                and spec.label not in report.labels_with_errors
            ):
                report.errors.append(
                    f"{use.where}: LABEL {spec.label!r} has no line in {tab.path}; "
                    f"add '{spec.label} /dev/VG/LV' (or '{spec.label} MISSING')"
                )
            elif (
                tab is not None
                and spec.label in tab.entries
                and tab.entries[spec.label].device is None
                and spec.target is None
            ):
                report.errors.append(
                    f"{use.where}: both legs of {spec.label!r} are MISSING (spec and {tab.entries[spec.label].where}); "
                    "at least one must be a device"
                )
        if spec.target is not None:
            key = (spec.target, spec.lun)
            if key in luns:
                report.errors.append(
                    f"{use.where}: lun{spec.lun}@{spec.target} is also used at {luns[key]}; "
                    "two VMs writing one LUN destroy each other's data"
                )
            else:
                luns[key] = use.where
    if tab is None and labels:
        report.warnings = [w for w in report.warnings if not w.startswith(f"{paths.tab}: tab file not found")]
        report.errors.append(
            f"{paths.tab}: tab file not found but {len(labels)} disk entr{'y names' if len(labels) == 1 else 'ies name'} a LABEL; "
            "create it with one 'LABEL DEVICE' line per mirrored disk"
        )
