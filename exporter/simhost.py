"""A simulated Xen host: a generated /proc and /sys tree plus the iscsimple registry.

`SimulatedHost` writes files the way Linux 6.1 shows them (compare with the real
captures in ``shared/fixtures/kernel-6.1-raid1-iscsi``): md arrays built without
metadata under ``/sys/devices/virtual/block/mdN`` with ``dev-*/state`` flags and
``rdN`` links, ``/proc/mdstat`` with the same line formats, iSCSI sessions under
``/sys/devices/platform/hostH/sessionS`` with ``/sys/class/iscsi_*`` links, and
the registry written by `iscsimple.core.registry` as the hotplug script does. So
the same readers read it unchanged, and the agent, the benchmark and the
end-to-end alert test can play outages without a kernel.

`SimulatedHost.mdadm` is a runner (core.run.run's contract) for the mdadm calls
a heal makes, acting on this simulated kernel: the agent's own Healer runs
against it in ``iscsimple-agent --demo`` (exporter/demo.py plays the story).
Device nodes under its /dev are empty regular files (no root needed); the heal's
checks accept those, and never a block node with another device number.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import LEG_ISCSI, STATE_ATTACHED, Attachment, Registry
from iscsimple.core.run import CommandError, Result

from .sysfstree import LunFiles, MemberFiles, SysfsTree

log = logging.getLogger("iscsimple.demo")

DEFAULT_PORTAL = "192.0.2.10:3260"
INITIATOR = "iqn.1993-08.org.debian:01:5ca1ab1e0001"
SECTOR = 512


def _sd_name(index: int) -> str:
    """The kernel's sd naming: sda..sdz, sdaa..sdzz, sdaaa... (sd_format_disk_name)."""
    letters = ""
    index += 1
    while index > 0:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "sd" + letters


@dataclass
class _Lun:
    lun: int
    device: str  # "sdb"
    minor: int
    size_bytes: int
    state: str = "running"


@dataclass
class _Session:
    target: str
    portal: str
    sid: int
    host: int
    state: str = "LOGGED_IN"
    luns: dict[int, _Lun] = field(default_factory=dict)

    @property
    def dir(self) -> str:
        return f"devices/platform/host{self.host}/session{self.sid}"


@dataclass
class _Member:
    name: str  # kernel name: "sdb", "dm-3"
    leg: str  # "iscsi" | "local"
    desc_nr: int
    slot: int | None
    flags: list[str]
    recovery_start: int | None = None  # sectors; None prints "none"
    errors: int = 0


@dataclass
class _Array:
    label: str
    md: str  # "md127"
    minor: int
    size_bytes: int
    attachment_id: str
    target: str
    lun: int
    members: list[_Member] = field(default_factory=list)  # newest first, as md lists them
    sync_action: str = "idle"
    last_sync_action: str = "none"
    done_sectors: int = 0
    speed_kib: int = 0

    @property
    def sectors(self) -> int:
        return self.size_bytes // SECTOR

    def member(self, leg: str) -> _Member | None:
        return next((m for m in self.members if m.leg == leg), None)

    @property
    def degraded(self) -> int:
        return 2 - sum(1 for m in self.members if "in_sync" in m.flags)


class SimulatedHost:
    """A host's kernel state and iscsimple registry, written under `root`."""

    def __init__(self, root: Path, on_change: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.paths = HostPaths(
            procfs=self.root / "proc",
            sysfs=self.root / "sys",
            devfs=self.root / "dev",
            state=self.root / "run" / "iscsimple",
            records=self.root / "var" / "lib" / "iscsimple",
            tab=self.root / "etc" / "xen" / "scripts" / "block-iscsimple-tab.conf",
            config=self.root / "etc" / "iscsimple" / "iscsimple.toml",
            locks=self.root / "run" / "xen-hotplug",
        )
        self.registry = Registry(self.paths)
        self.tree = SysfsTree(self.paths.sysfs)
        self.devtree = SysfsTree(self.paths.devfs)  # udev's and LVM's links: /dev/md/LABEL, /dev/vg/lv
        # Called with a short description after every change, like a kernel uevent
        # or an md event; the demo wires it to the agent's refresh.
        self.on_change = on_change
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._arrays: dict[str, _Array] = {}
        self._next_sid = 1
        self._next_host = 0
        self._sd_used: set[int] = set()  # sd index numbers: the kernel reuses the lowest free one
        self._dm_by_device: dict[str, str] = {}  # LVs outlive attachments: same dm-N each time
        self._tab_labels: set[str] = set()
        self._md_minors: set[int] = set()
        self._batch = 0
        self._mdstat_dirty = False
        self._session_disks: dict[int, set[str]] = {}  # sid → its LUNs' disks written last
        for d in (self.paths.procfs, self.paths.sysfs / "block", self.paths.devfs, self.paths.state):
            d.mkdir(parents=True, exist_ok=True)
        for cls in ("iscsi_session", "iscsi_connection", "iscsi_host", "scsi_host", "scsi_device"):
            (self.paths.sysfs / "class" / cls).mkdir(parents=True, exist_ok=True)
        self.paths.records.mkdir(parents=True, exist_ok=True)
        self.paths.tab.parent.mkdir(parents=True, exist_ok=True)
        self.paths.tab.write_text("# LABEL  local device (written by the simulated host)\n")
        self._write_mdstat()

    # -- public API (kept stable: the end-to-end alert test uses it) -----------

    def add_target(self, target: str, portal: str = DEFAULT_PORTAL) -> None:
        """Log in to `target`: a LOGGED_IN session without LUNs yet."""
        with self._lock:
            if target in self._sessions:
                return
            session = _Session(target, portal, self._next_sid, self._next_host)
            self._next_sid += 1
            self._next_host += 1
            self._sessions[target] = session
            self._write_session(session)
        self._changed(f"logged in to {target}")

    def attach(
        self,
        label: str,
        domain: str,
        target: str,
        lun: int,
        size_bytes: int = 64 << 20,
        vbd: str = "xvda",
        local_device: str | None = None,
        domain_id: int | None = None,
    ) -> None:
        """What `block-iscsimple add` leaves behind: registry entry and a RAID1 whose
        iSCSI leg is in sync and write-mostly while the local leg recovers from 0."""
        with self._lock:
            if label in self._arrays:
                raise ValueError(f"{label} is already attached")
            if target not in self._sessions:
                self.add_target(target)
            session = self._sessions[target]
            sd = session.luns.get(lun)
            if sd is None:
                index = next(i for i in range(len(self._sd_used) + 1) if i not in self._sd_used)
                self._sd_used.add(index)
                sd = _Lun(lun, _sd_name(index), 16 * index, size_bytes)
                session.luns[lun] = sd
                self._write_session(session)
            local_device = local_device or f"/dev/vg0/{label}"
            dm = self._dm_by_device.get(local_device)
            if dm is None:
                dm = self._dm_by_device[local_device] = f"dm-{len(self._dm_by_device)}"
            self._write_dm(dm, local_device, size_bytes)
            minor = self._alloc_md_minor()
            domid = domain_id if domain_id is not None else len(self._arrays) + 1
            devid = 51712 + 16 * (ord(vbd[-1]) - ord("a")) if vbd.startswith("xvd") else 51712
            attachment_id = f"vbd-{domid}-{devid}"
            array = _Array(label, f"md{minor}", minor, size_bytes, attachment_id, target, lun)
            array.members = [
                _Member(dm, "local", 2, 0, ["spare"], recovery_start=0),
                _Member(sd.device, "iscsi", 1, 1, ["in_sync", "write_mostly"]),
            ]
            array.sync_action = "recover"
            array.last_sync_action = "recovery"
            array.speed_kib = 100_000
            self._arrays[label] = array
            self._write_array(array)
            if label not in self._tab_labels:  # the tab is configuration: one line per LABEL, kept
                self._tab_labels.add(label)
                with open(self.paths.tab, "a") as tab:
                    tab.write(f"{label} {local_device}\n")
            self.registry.put(
                Attachment(
                    id=attachment_id,
                    spec=f"lun{lun}@{target}+{label}",
                    lun=lun,
                    target=target,
                    label=label,
                    state=STATE_ATTACHED,
                    portal=session.portal,
                    iscsi_device=sd.device,
                    local_device=local_device,
                    local_kernel_name=dm,
                    md_device=array.md,
                    md_path=f"/dev/md/{label}",
                    write_mostly_leg=LEG_ISCSI,
                    source_leg=LEG_ISCSI,
                    domain_id=domid,
                    domain_name=domain,
                    vbd=vbd,
                    xenbus_path=f"backend/vbd/{domid}/{devid}",
                    we_logged_in=True,
                )
            )
        self._changed(f"attached {label} for {domain}: local leg recovering from iSCSI")

    def advance_resync(self, label: str, ratio: float, speed_kib: int = 100_000) -> None:
        """Move the running recovery of `label` to `ratio` (0..1) at `speed_kib` KiB/s."""
        with self._lock:
            array = self._arrays[label]
            if array.sync_action == "idle":
                raise ValueError(f"{label} has no recovery running")
            array.done_sectors = max(0, min(array.sectors, int(array.sectors * ratio)))
            array.speed_kib = speed_kib
            for m in array.members:
                if m.recovery_start is not None and "spare" in m.flags:
                    m.recovery_start = array.done_sectors
            self._write_array(array)
        self._changed(f"{label} recovery at {ratio:.0%}")

    def finish_resync(self, label: str) -> None:
        with self._lock:
            array = self._arrays[label]
            for m in array.members:
                if "spare" in m.flags and m.slot is not None:
                    m.flags = ["in_sync", *[f for f in m.flags if f not in ("spare", "in_sync")]]
                    m.recovery_start = None
            array.sync_action = "idle"
            array.done_sectors = 0
            array.speed_kib = 0
            self._write_array(array)
        self._changed(f"{label} in sync")

    def fail_session(self, target: str) -> None:
        """The target stops answering: session FAILED, its LUNs blocked (md has not noticed yet)."""
        with self._lock:
            self._set_session_state(target, "FAILED", "blocked")
        self._changed(f"session to {target} FAILED")

    def expire_session(self, target: str) -> None:
        """replacement_timeout expired: session FREE, LUNs transport-offline, and md failed the
        iSCSI legs on the next I/O (faulty,write_mostly,write_error; degraded 1)."""
        with self._lock:
            self._set_session_state(target, "FREE", "transport-offline")
            for array in self._arrays_of(target):
                self._fail_iscsi_leg(array)
        self._changed(f"session to {target} expired, iSCSI legs faulty")

    def restore_session(self, target: str) -> None:
        """The target is back and iscsid logged in again; md keeps the legs faulty."""
        with self._lock:
            self._set_session_state(target, "LOGGED_IN", "running")
        self._changed(f"session to {target} LOGGED_IN again")

    def _set_session_state(self, target: str, state: str, lun_state: str) -> None:
        """The session's state and its LUNs' SCSI state move together, as the kernel moves them."""
        session = self._sessions[target]
        session.state = state
        for lun in session.luns.values():
            lun.state = lun_state
        self._write_session(session)

    def heal(self, label: str) -> None:
        """What a heal runs: `mdadm --remove` of the faulty iSCSI leg, then `--add --write-mostly`:
        the iSCSI copy recovers from the local leg."""
        with self._lock:
            array = self._arrays[label]
            old = array.member("iscsi")
            if old is None or "faulty" not in old.flags:
                raise ValueError(f"{label}: the iSCSI leg is not faulty, nothing to heal")
            md = f"/dev/md/{label}"
            self.mdadm(["mdadm", md, "--remove", old.name], timeout=30)
            self.mdadm(["mdadm", md, "--add", "--write-mostly", f"/dev/{old.name}"], timeout=30)

    def mdadm(self, argv, *, timeout: float | None = None, deadline=None, **_ignored) -> Result:
        """`mdadm /dev/md/LABEL --fail NAME | --remove NAME | --add [--write-mostly] /dev/NAME` on this
        simulated kernel, as md does them; anything else fails like mdadm would."""
        argv = [str(a) for a in argv]
        if timeout is None and deadline is None:
            raise ValueError(f"unbounded command: {argv}")  # the project's rule for every command
        with self._lock:
            label = argv[1].removeprefix("/dev/md/") if len(argv) > 3 else ""
            array = self._arrays.get(label)
            if array is None or argv[0] != "mdadm":
                raise CommandError(
                    argv, 1, f"mdadm: cannot open {argv[1] if len(argv) > 1 else ''}: No such file\n"
                )
            op, name = argv[2], os.path.basename(argv[-1])  # a kernel name, or a node under devfs
            member = next((m for m in array.members if m.name == name), None)
            if op == "--fail" and member is not None:
                if "faulty" not in member.flags:
                    member.flags = ["faulty", *[f for f in member.flags if f not in ("in_sync", "spare")]]
                    member.slot = None
                what = f"{name} set faulty"
            elif op == "--remove" and member is not None:
                if "faulty" not in member.flags and member.slot is not None:
                    raise CommandError(
                        argv, 1, f"mdadm: hot remove failed for {name}: Device or resource busy\n"
                    )
                array.members.remove(member)
                what = f"{name} removed"
            elif op == "--add" and member is None and self._lun_of(array, name) is not None:
                desc_nr = max((m.desc_nr for m in array.members), default=0) + 1
                flags = ["write_mostly", "spare"] if "--write-mostly" in argv else ["spare"]
                new = _Member(name, "iscsi", desc_nr, 1, flags, recovery_start=0)
                array.members.insert(0, new)
                array.sync_action = "recover"
                array.last_sync_action = "recovery"
                array.done_sectors = 0
                array.speed_kib = 100_000
                what = f"{name} added, recovering from the local leg"
            else:
                raise CommandError(argv, 1, f"mdadm: {op} {name} is not possible on {array.md} now\n")
            self._write_array(array)
        self._changed(f"{label}: mdadm {what}")
        return Result(tuple(argv), 0, "", "", 0.0)

    def _lun_of(self, array: _Array, name: str) -> _Lun | None:
        session = self._sessions.get(array.target)
        lun = session.luns.get(array.lun) if session else None
        return lun if lun is not None and lun.device == name else None

    def detach(self, label: str) -> None:
        """`block-iscsimple remove`: stop the array, drop the registry entry, log out when
        no other array uses the target."""
        with self._lock:
            array = self._arrays.pop(label)
            self._remove_array(array)
            self.registry.remove(array.attachment_id)
            session = self._sessions.get(array.target)
            if session is not None:
                gone = session.luns.pop(array.lun, None)
                if gone is not None:
                    self._sd_used.discard(gone.minor // 16)
                if not self._arrays_of(array.target):
                    self._remove_session(session)
                    del self._sessions[array.target]
                else:
                    self._write_session(session)
        self._changed(f"detached {label}")

    def record_hotplug(self, operation: str, result: str, duration_seconds: float) -> None:
        self.registry.record_operation(operation, result, duration_seconds)
        self._changed(f"hotplug {operation} {result}")

    # -- helpers for tests and the benchmark -----------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Defer rewriting /proc/mdstat until the end (building thousands of arrays)."""
        with self._lock:
            self._batch += 1
            try:
                with self.tree.batch():
                    yield
            finally:
                self._batch -= 1
                if self._batch == 0 and self._mdstat_dirty:
                    self._write_mdstat()

    def labels(self) -> list[str]:
        with self._lock:
            return list(self._arrays)

    def md_device(self, label: str) -> str:
        return self._arrays[label].md

    def iscsi_device(self, label: str) -> str:
        array = self._arrays[label]
        return self._sessions[array.target].luns[array.lun].device

    def iscsi_leg_recovering(self, label: str) -> bool:
        """The iSCSI leg is back in the array and being rewritten from the local leg (a heal ran)."""
        with self._lock:
            member = self._arrays[label].member("iscsi")
            return member is not None and "faulty" not in member.flags and "in_sync" not in member.flags

    def set_leg_errors(self, label: str, leg: str, errors: int) -> None:
        with self._lock:
            array = self._arrays[label]
            member = array.member(leg)
            if member is None:
                raise ValueError(f"{label} has no {leg} leg")
            member.errors = errors
            self._write_array(array)
        self._changed(f"{label} {leg} errors {errors}")

    # -- writing the tree --------------------------------------------------------

    def _changed(self, what: str) -> None:
        if self.on_change is not None:
            self.on_change(what)

    def _arrays_of(self, target: str) -> list[_Array]:
        return [a for a in self._arrays.values() if a.target == target]

    def _alloc_md_minor(self) -> int:
        # mdadm hands out md127 downwards for arrays without a fixed number (then 128 up here).
        minor = (
            next(m for m in range(127, -1, -1) if m not in self._md_minors)
            if len(self._md_minors) < 128
            else None
        )
        if minor is None:
            minor = max(self._md_minors) + 1 if max(self._md_minors) >= 128 else 128
            while minor in self._md_minors:
                minor += 1
        self._md_minors.add(minor)
        return minor

    def _write_dm(self, dm: str, local_device: str, size_bytes: int) -> None:
        minor = int(dm.split("-")[1])
        vg_lv = local_device.removeprefix("/dev/").replace("-", "--").replace("/", "-")
        base = f"devices/virtual/block/{dm}"
        self.tree.block_device(
            base,
            dm,
            {
                "dev": f"253:{minor}",
                "size": str(size_bytes // SECTOR),
                "uevent": f"MAJOR=253\nMINOR={minor}\nDEVNAME={dm}\nDEVTYPE=disk",
            },
        )
        self.tree.put(f"{base}/dm/name", f"{vg_lv}\n")
        self.devtree.link(local_device.removeprefix("/dev/"), dm)

    def _write_session(self, s: _Session) -> None:
        address, _, port = s.portal.rpartition(":")
        up = s.state == "LOGGED_IN"
        luns = [
            LunFiles(
                lun.lun,
                {
                    "state": lun.state,
                    "vendor": "IET     ",
                    "model": "VIRTUAL-DISK    ",
                    "type": "0",
                    "wwid": f"naa.6000000000000000{s.sid:08x}{lun.lun:08x}",
                    "uevent": "DEVTYPE=scsi_device\nDRIVER=sd\nMODALIAS=scsi:t-0x00",
                },
                lun.device,
                {
                    "dev": f"8:{lun.minor}",
                    "size": str(lun.size_bytes // SECTOR),
                    "uevent": f"MAJOR=8\nMINOR={lun.minor}\nDEVNAME={lun.device}\nDEVTYPE=disk",
                },
            )
            for lun in s.luns.values()
        ]
        present = {lun.device for lun in s.luns.values()}
        gone = [name for name in self._session_disks.get(s.sid, set()) if name not in present]
        session = self.tree.iscsi_session(
            s.host,
            s.sid,
            {
                "targetname": s.target,
                "state": s.state,
                "target_state": "SCANNED",
                "initiatorname": INITIATOR,
                "tpgt": "1",
                "recovery_tmo": "20",
                "ifacename": "default",
                "creator": "201",
            },
            {
                "persistent_address": address,
                "persistent_port": port,
                # The kernel empties address/port while the connection is down (see the captures).
                "address": address if up else "",
                "port": port if up else "",
                "state": "up" if up else "failed",
            },
            luns,
            host_attrs={
                "iscsi_host": {"initiatorname": "(null)"},
                "scsi_host": {"proc_name": "iscsi_tcp", "state": "running"},
            },
            lun_links=True,
        )
        self.tree.put(f"{session}/iscsi_session/session{s.sid}/uevent", "")
        self.tree.link(f"{session}/iscsi_session/session{s.sid}/subsystem", "class/iscsi_session")
        for name in gone:
            self.devtree.unlink(name)
        for name in present:
            self._device_node(name)
        self._session_disks[s.sid] = present

    def _device_node(self, name: str) -> None:
        node = self.paths.devfs / name
        if not node.exists():
            node.touch()

    def _remove_session(self, s: _Session) -> None:
        for lun in s.luns.values():
            self._sd_used.discard(lun.minor // 16)
            self.devtree.unlink(lun.device)
        self.tree.remove_iscsi_session(s.host, s.sid, [lun.device for lun in s.luns.values()])
        self._session_disks.pop(s.sid, None)

    def _fail_iscsi_leg(self, array: _Array) -> None:
        member = array.member("iscsi")
        local = array.member("local")
        if member is None or "faulty" in member.flags:
            return
        if local is None or "in_sync" not in local.flags:
            # raid1 never fails its last in-sync leg: the VM gets I/O errors instead and the
            # local leg's recovery stops (raid1_error with MD_BROKEN).
            array.sync_action = "idle"
            array.done_sectors = 0
            array.speed_kib = 0
        else:
            member.flags = ["faulty", "write_mostly", "write_error"]
            member.slot = None
        self._write_array(array)

    def _write_array(self, a: _Array) -> None:
        running = a.sync_action != "idle"
        self.tree.md_array(
            a.md,
            {
                "dev": f"9:{a.minor}",
                "size": str(a.sectors),
                "ro": "0",
                "uevent": f"MAJOR=9\nMINOR={a.minor}\nDEVNAME={a.md}\nDEVTYPE=disk",
            },
            {
                "level": "raid1",
                "raid_disks": "2",
                "metadata_version": "none",
                "component_size": str(a.size_bytes // 1024),
                "chunk_size": "0",
                "layout": "0",
                "array_state": "clean",
                "array_size": "default",
                "consistency_policy": "resync",
                "resync_start": "none",
                "mismatch_cnt": "0",
                "degraded": str(a.degraded),
                "sync_action": a.sync_action,
                "last_sync_action": a.last_sync_action,
                "sync_completed": f"{a.done_sectors} / {a.sectors}" if running else "none",
                "sync_speed": str(a.speed_kib) if running else "none",
                "sync_speed_min": "1000 (system)",
                "sync_speed_max": "200000 (system)",
            },
            [
                MemberFiles(
                    m.name,
                    ",".join(m.flags),
                    m.slot,
                    m.errors,
                    m.recovery_start,
                    device=self.tree.real(f"block/{m.name}"),
                    extra={"size": str(a.size_bytes // 1024), "offset": "0"},
                )
                for m in a.members
            ],
        )
        self.devtree.link(f"md/{a.label}", a.md)
        self._mdstat_changed()

    def _remove_array(self, a: _Array) -> None:
        self.tree.remove_md_array(a.md)
        self.devtree.unlink(f"md/{a.label}")
        self._md_minors.discard(a.minor)
        self._mdstat_changed()

    def _mdstat_changed(self) -> None:
        if self._batch:
            self._mdstat_dirty = True
        else:
            self._write_mdstat()

    def _write_mdstat(self) -> None:
        lines = ["Personalities : [raid1] "]
        for a in sorted(self._arrays.values(), key=lambda a: -a.minor if a.minor <= 127 else a.minor):
            lines.extend(_mdstat_array(a))
        lines.append("unused devices: <none>")
        path = self.paths.procfs / "mdstat"
        tmp = path.with_name(".mdstat.new")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
        self._mdstat_dirty = False


def _mdstat_array(a: _Array) -> list[str]:
    """The lines md_seq_show prints for one raid1 array built without metadata."""
    members = []
    for m in a.members:
        text = f"{m.name}[{m.desc_nr}]"
        if "write_mostly" in m.flags:
            text += "(W)"
        if "faulty" in m.flags:
            text += "(F)"
        elif m.slot is None:
            text += "(S)"
        members.append(text)
    in_sync = {m.slot for m in a.members if "in_sync" in m.flags and m.slot is not None}
    status = "".join("U" if slot in in_sync else "_" for slot in range(2))
    kib = a.size_bytes // 1024
    lines = [
        f"{a.md} : active raid1 {' '.join(members)}",
        f"      {kib} blocks super non-persistent [2/{len(in_sync)}] [{status}]",
    ]
    if a.sync_action != "idle":
        # md_seq_show's integer arithmetic (scale 10, +1 against division by zero): the
        # capture shows 11.6% for 7936/65536 KiB, not 12.1%.
        per_mille = ((a.done_sectors >> 10) * 1000) // ((a.sectors >> 10) + 1)
        bar = "=" * (per_mille // 50) + ">" + "." * (20 - per_mille // 50)
        done_kib = a.done_sectors // 2
        speed = max(1, a.speed_kib)
        finish = (kib - done_kib) / speed / 60
        word = "recovery" if a.sync_action == "recover" else a.sync_action
        lines.append(
            f"      [{bar}]  {word} ={per_mille // 10:3d}.{per_mille % 10}% ({done_kib}/{kib}) "
            f"finish={finish:.1f}min speed={a.speed_kib}K/sec"
        )
    lines.append("      ")
    return lines
