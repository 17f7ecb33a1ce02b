"""Writes md arrays, iSCSI sessions and block devices into a sysfs-like tree, laid out as Linux 6.1 does.

The one writer of simulated kernel state: the demo's simulated host
(exporter/simhost.py) and the tests' generated trees (tests/fixturetree.py,
tests/safetybed.py) both write through it, so the readers in core/ meet one
layout, checked against the real captures. The caller says what the attribute
files hold; this module says where files and links go:

- a block device is a directory holding `dev` (and `size`, `uevent`, ...), linked
  from /sys/block/NAME and /sys/class/block/NAME (relative links, as the kernel's);
- an md array is /sys/devices/virtual/block/mdN with `md/` attributes, one
  `md/dev-NAME/` per member (`block` links to the member's device, `rdN` names the
  member in slot N while it is not faulty, `slaves/NAME`);
- an iSCSI session is /sys/devices/platform/hostH/sessionS with `iscsi_session/`,
  `connection*/iscsi_connection/`, `targetH:0:0/H:0:0:LUN/` (SCSI state) and the
  LUN's disk under `block/`, plus the /sys/class/iscsi_* and scsi_* links.

Writes replace a file whole (never half-written for a concurrent reader) and are
skipped when the content is unchanged (the benchmark writes thousands of arrays).
Inside `batch()` nobody reads yet: files are written in place, half the calls.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class MemberFiles:
    """One md member's dev-NAME/ directory."""

    name: str  # kernel name: "sda", "dm-3"
    state: str  # dev-NAME/state flags, e.g. "in_sync,write_mostly"
    slot: int | None  # None: "none" (spare or faulty)
    errors: int = 0
    recovery_start: int | None = None  # None: "none"
    device: str | None = None  # rel path of the member's block device dir; None: no `block` link
    extra: Mapping[str, str] = field(default_factory=dict)  # more attributes (size, offset)


@dataclass(frozen=True)
class LunFiles:
    """One SCSI device of a session (H:0:0:LUN) and its disk."""

    lun: int
    attrs: Mapping[str, str]  # state, vendor, ...
    block: str | None = None  # the disk's kernel name; None: no disk (yet)
    block_attrs: Mapping[str, str] = field(default_factory=dict)  # dev, size, ...


class SysfsTree:
    def __init__(self, sysfs: Path):
        self.sysfs = Path(sysfs)
        self._root = str(sysfs)
        self._written: dict[str, str] = {}  # rel path → content ("link:" + path → target)
        self._batch = 0

    # -- primitives ------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self._batch += 1
        try:
            yield
        finally:
            self._batch -= 1

    @property
    def batching(self) -> bool:
        return self._batch > 0

    def put(self, rel: str, text: str) -> None:
        """Write one attribute file (`rel` below sysfs) unless it already holds `text`."""
        if self._written.get(rel) == text:
            return
        path = f"{self._root}/{rel}"
        parent, _, name = rel.rpartition("/")
        if parent not in self._written:
            os.makedirs(f"{self._root}/{parent}", exist_ok=True)
            self._written[parent] = ""
        data = text.encode()
        if self._batch:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, data)
            os.close(fd)
        else:
            tmp = f"{self._root}/{parent}/.{name}.new"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, data)
            os.close(fd)
            os.replace(tmp, path)
        self._written[rel] = text

    def attrs(self, rel_dir: str, values: Mapping[str, str]) -> None:
        """One file per attribute, each value a line."""
        for name, value in values.items():
            self.put(f"{rel_dir}/{name}", f"{value}\n")

    def link(self, link_rel: str, target_rel: str) -> None:
        """The symlink sysfs/link_rel → sysfs/target_rel, relative as the kernel's are."""
        link = self.sysfs / link_rel
        target = os.path.relpath(self.sysfs / target_rel, link.parent)
        key = f"link:{link_rel}"
        if self._written.get(key) == target and link.is_symlink():
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(target)
        self._written[key] = target

    def unlink(self, link_rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.sysfs / link_rel).unlink()
        self._written.pop(f"link:{link_rel}", None)

    def remove(self, rel_dir: str) -> None:
        """Remove a directory and forget what was written below it."""
        shutil.rmtree(self.sysfs / rel_dir, ignore_errors=True)
        prefix = rel_dir.rstrip("/") + "/"
        for key in [
            k for k in self._written if k == rel_dir or k.startswith(prefix) or k.startswith("link:" + prefix)
        ]:
            del self._written[key]

    def real(self, link_rel: str) -> str | None:
        """Where a link of the tree points, as a path relative to sysfs (None: no such link)."""
        link = self.sysfs / link_rel
        if not os.path.lexists(link):
            return None
        return os.path.relpath(os.path.realpath(link), os.path.realpath(self.sysfs))

    # -- block devices ---------------------------------------------------------------------

    def block_device(self, rel_dir: str, name: str, attrs: Mapping[str, str]) -> None:
        """A disk at `rel_dir` with `attrs` (dev, size, uevent, ...), linked from block/ and class/block/."""
        self.attrs(rel_dir, attrs)
        self.link(f"block/{name}", rel_dir)
        self.link(f"class/block/{name}", rel_dir)

    def remove_block_device(self, name: str) -> None:
        self.unlink(f"block/{name}")
        self.unlink(f"class/block/{name}")

    # -- md arrays -------------------------------------------------------------------------

    def md_array(
        self,
        name: str,
        disk_attrs: Mapping[str, str],
        md_attrs: Mapping[str, str],
        members: Sequence[MemberFiles],
        *,
        slaves: bool = True,
    ) -> str:
        """The array `name` with its members; members no longer listed are removed. Returns md/'s rel path."""
        base = f"devices/virtual/block/{name}"
        md = f"{base}/md"
        self.attrs(base, disk_attrs)
        os.makedirs(self.sysfs / md, exist_ok=True)
        self.attrs(md, md_attrs)
        wanted = {f"dev-{m.name}" for m in members}
        for m in members:
            dev = f"{md}/dev-{m.name}"
            self.attrs(
                dev,
                {
                    "state": m.state,
                    "slot": "none" if m.slot is None else str(m.slot),
                    "errors": str(m.errors),
                    "recovery_start": "none" if m.recovery_start is None else str(m.recovery_start),
                    **m.extra,
                },
            )
            if m.device is not None:
                self.link(f"{dev}/block", m.device)
                if slaves:
                    self.link(f"{base}/slaves/{m.name}", m.device)
        mddir = self.sysfs / md
        for child in list(mddir.iterdir()):
            if child.name.startswith("dev-") and child.name not in wanted:
                self.remove(f"{md}/{child.name}")
                self.unlink(f"{base}/slaves/{child.name[4:]}")
            elif child.name.startswith("rd") and child.is_symlink():
                self.unlink(f"{md}/{child.name}")
        for m in members:
            if m.slot is not None and "faulty" not in m.state.split(","):
                self.link(f"{md}/rd{m.slot}", f"{md}/dev-{m.name}")
        self.link(f"block/{name}", base)
        return md

    def remove_md_array(self, name: str) -> None:
        self.unlink(f"block/{name}")
        self.remove(f"devices/virtual/block/{name}")

    # -- iSCSI sessions --------------------------------------------------------------------

    def iscsi_session(
        self,
        host: int,
        sid: int,
        session_attrs: Mapping[str, str],
        connection_attrs: Mapping[str, str],
        luns: Sequence[LunFiles],
        *,
        host_attrs: Mapping[str, Mapping[str, str]] | None = None,
        lun_links: bool = False,
    ) -> str:
        """Session `sid` on SCSI host `host`; LUNs no longer listed are removed. Returns the session's
        rel path. `host_attrs`: {"iscsi_host": {...}, "scsi_host": {...}} for the host's class dirs;
        `lun_links`: also /sys/class/scsi_device/H:0:0:L."""
        platform = f"devices/platform/host{host}"
        session = f"{platform}/session{sid}"
        attrs = f"{session}/iscsi_session/session{sid}"
        self.attrs(attrs, session_attrs)
        self.link(f"{attrs}/device", session)
        self.link(f"class/iscsi_session/session{sid}", attrs)
        connection = f"{session}/connection{sid}:0/iscsi_connection/connection{sid}:0"
        self.attrs(connection, connection_attrs)
        self.link(f"class/iscsi_connection/connection{sid}:0", connection)
        for kind, values in (host_attrs or {}).items():
            self.attrs(f"{platform}/{kind}/host{host}", values)
            self.link(f"class/{kind}/host{host}", f"{platform}/{kind}/host{host}")
        target = f"{session}/target{host}:0:0"
        present = set()
        for lun in luns:
            hctl = f"{host}:0:0:{lun.lun}"
            present.add(hctl)
            device = f"{target}/{hctl}"
            os.makedirs(self.sysfs / device, exist_ok=True)
            self.attrs(device, lun.attrs)
            if lun_links:
                self.link(f"class/scsi_device/{hctl}", f"{device}/scsi_device/{hctl}")
            if lun.block is not None:
                disk = f"{device}/block/{lun.block}"
                os.makedirs(self.sysfs / disk, exist_ok=True)
                self.block_device(disk, lun.block, lun.block_attrs)
        tdir = self.sysfs / target
        if tdir.is_dir():
            for child in tdir.iterdir():
                if child.name not in present and ":" in child.name:  # a LUN that went away
                    for disk in (child / "block").glob("*"):
                        self.remove_block_device(disk.name)
                    self.unlink(f"class/scsi_device/{child.name}")
                    self.remove(f"{target}/{child.name}")
        return session

    def remove_iscsi_session(self, host: int, sid: int, blocks: Sequence[str] = ()) -> None:
        for name in blocks:
            self.remove_block_device(name)
        for link in (
            f"class/iscsi_session/session{sid}",
            f"class/iscsi_connection/connection{sid}:0",
            f"class/iscsi_host/host{host}",
            f"class/scsi_host/host{host}",
        ):
            self.unlink(link)
        self.remove(f"devices/platform/host{host}")
