"""A small generated host for the data-safety tests: one mirror, its sessions, and a fake mdadm.

`SafetyBed` keeps a model (md members, iSCSI sessions and LUNs) and rewrites a
kernel-like sysfs tree from it with the `fixturetree` builders, so the real
readers (`HostSnapshot.read`, `find_lun_block`) see it unchanged. `FakeMdadm` is
a recording runner with the argv contract of `iscsimple.core.run.run`: it
checks each mdadm call the way the kernel would (member exists, device free)
and changes the model as md does (`--add` makes a recovering member).
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from fixturetree import FakeLun, FakeMember, write_iscsi_session, write_md_array

from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import Attachment, Registry
from iscsimple.core.run import CommandError, Result
from iscsimple.core.snapshot import HostSnapshot

TARGET = "iqn.2026-11.test.local:disk1"
OTHER_TARGET = "iqn.2026-11.test.local:disk2"
LABEL = "vm1-disk"
MD = "md127"
SIZE_KIB = 65536


@dataclass
class Session:
    sid: int
    target: str
    state: str = "LOGGED_IN"
    luns: list[FakeLun] = field(default_factory=list)


class SafetyBed:
    def __init__(self, root: Path):
        self.root = root
        self.paths = HostPaths(
            procfs=root / "proc",
            sysfs=root / "sys",
            devfs=root / "dev",
            state=root / "run",
            records=root / "lib",
            tab=root / "tab.conf",
            config=root / "iscsimple.toml",
        )
        # As a host has them: the CLI refuses a --state/--records directory that does not exist.
        for directory in (self.paths.state, self.paths.records):
            directory.mkdir(parents=True, exist_ok=True)
        # As a host has it: an attach refuses a local device it cannot tell is unmounted.
        mountinfo = self.paths.procfs / "self" / "mountinfo"
        mountinfo.parent.mkdir(parents=True, exist_ok=True)
        mountinfo.write_text("22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg0-root rw\n")
        self.running = True
        self.members: list[FakeMember] = [
            FakeMember("dm-3", slot=0, state="in_sync", dev="253:3"),
            FakeMember("sda", slot=1, state="in_sync,write_mostly", dev="8:0"),
        ]
        self.sync_action = "idle"
        self.sessions: list[Session] = [Session(1, TARGET, luns=[FakeLun(1, "sda", "8:0")])]
        self.holders: dict[str, list[str]] = {}
        self.paths.tab.parent.mkdir(parents=True, exist_ok=True)
        self.paths.tab.write_text(f"{LABEL} {self.local_path}\n")
        self.sizes: dict[str, int] = {}  # kernel name -> sectors; default: the array's size
        self.attachment = Registry(self.paths).put(
            Attachment(
                id="vbd-7-51712",
                spec=f"lun1@{TARGET}+{LABEL}",
                lun=1,
                target=TARGET,
                label=LABEL,
                state="attached",
                portal="192.0.2.10:3260",
                iscsi_device="sda",
                local_device=str(root / "dev" / "vg0" / "vm1"),
                local_kernel_name="dm-3",
                md_device=MD,
                md_path=f"/dev/md/{LABEL}",
                write_mostly_leg="iscsi",
                source_leg="iscsi",
                domain_id=7,
                domain_name="vm1",
                vbd="xvda",
            )
        )
        self.write()

    @property
    def local_path(self) -> str:
        return str(self.paths.devfs / "vg0" / "vm1")

    # -- model changes --------------------------------------------------------------------------
    def member(self, name: str) -> FakeMember | None:
        return next((m for m in self.members if m.name == name), None)

    def set_member(self, name: str, **changes) -> None:
        self.members = [replace(m, **changes) if m.name == name else m for m in self.members]

    def fail_iscsi(self, name: str = "sda") -> None:
        """What md does when I/O to a dead session fails: the leg becomes faulty, loses its slot."""
        self.set_member(name, state="faulty,write_mostly,write_error", slot=None)
        for s in self.sessions:
            if s.target == TARGET:
                s.state = "FREE"
                s.luns = [replace(lun, state="transport-offline") for lun in s.luns]

    def session_back(self, block: str = "sda", dev: str = "8:0", state: str = "LOGGED_IN") -> None:
        for s in self.sessions:
            if s.target == TARGET:
                s.state = state
                s.luns = [FakeLun(1, block, dev, "running" if state == "LOGGED_IN" else "blocked")]

    def session_down(self) -> None:
        for s in self.sessions:
            if s.target == TARGET:
                s.state = "FAILED"
                s.luns = [replace(lun, state="blocked") for lun in s.luns]

    def finish_recovery(self) -> None:
        self.members = [
            replace(m, state=",".join(f for f in m.state.split(",") if f != "spare") or "in_sync")
            if m.slot is not None
            else m
            for m in self.members
        ]
        self.members = [
            replace(m, state=m.state if "in_sync" in m.state else "in_sync," + m.state) for m in self.members
        ]
        self.sync_action = "idle"

    def cut_local_recovery(self) -> None:
        """What md does when the local leg's recovery from iSCSI cannot read its source: the recovery
        stops and the local leg stays behind as an idle spare (no slot)."""
        self.set_member("dm-3", state="spare", slot=None)
        self.sync_action = "idle"

    def stop(self) -> None:
        self.running = False

    @property
    def degraded(self) -> int:
        return 2 - sum(1 for m in self.members if m.slot is not None and "in_sync" in m.state)

    # -- the tree ----------------------------------------------------------------------------------
    def _model(self) -> str:
        return repr((self.running, self.members, self.sync_action, self.sessions, self.holders, self.sizes))

    def write(self) -> None:
        model = self._model()
        if model == getattr(self, "_written", None):
            return  # file creation is slow on some disks: rewrite only what changed
        self._written = model
        for d in ("sys", "dev"):
            shutil.rmtree(self.root / d, ignore_errors=True)
        sysfs = self.paths.sysfs
        sysfs.mkdir(parents=True)
        if self.running:
            write_md_array(
                sysfs,
                MD,
                self.members,
                degraded=self.degraded,
                sync_action=self.sync_action,
                component_size=SIZE_KIB,
            )
            (self.paths.devfs / "md").mkdir(parents=True)
            (self.paths.devfs / "md" / LABEL).symlink_to(f"../{MD}")
        for s in self.sessions:
            write_iscsi_session(sysfs, s.sid, s.target, s.luns, state=s.state)
            for lun in s.luns:
                if lun.block:
                    self._device(lun.block, lun.dev)
        for m in self.members:
            if m.dev is not None and self.running:
                self._device(m.name, m.dev)
        # The local device exists whether or not the array runs: /dev/vg0/vm1 -> ../dm-3.
        self._device("dm-3", "253:3")
        (self.paths.devfs / "vg0").mkdir(parents=True, exist_ok=True)
        (self.paths.devfs / "vg0" / "vm1").symlink_to("../dm-3")
        if self.running:
            make_node(self.paths.devfs / MD, f"9:{MD[2:]}")

    def _device(self, name: str, dev: str | None) -> None:
        block = self.paths.sysfs / "block" / name
        real = Path(os.path.realpath(block))
        real.mkdir(parents=True, exist_ok=True)
        class_link = self.paths.sysfs / "class" / "block" / name
        if not os.path.lexists(class_link):  # the kernel lists every block device here too
            class_link.parent.mkdir(parents=True, exist_ok=True)
            class_link.symlink_to(real)
        (real / "size").write_text(f"{self.sizes.get(name, SIZE_KIB * 2)}\n")
        holders = real / "holders"
        holders.mkdir(exist_ok=True)
        for h in self.holders.get(name, []):
            if not (holders / h).exists():
                (holders / h).mkdir()
        if self.running and any(m.name == name for m in self.members) and not (holders / MD).exists():
            (holders / MD).mkdir()  # the kernel links the array as holder of each member
        node = self.paths.devfs / name
        node.parent.mkdir(parents=True, exist_ok=True)
        if not node.exists():
            make_node(node, dev)

    def snapshot(self) -> HostSnapshot:
        self.write()
        return HostSnapshot.read(self.paths)

    def view(self):
        return self.snapshot().array(LABEL)


def make_node(path: Path, dev: str | None) -> None:
    """A block device node when we may create one (root), else a plain file standing in for it."""
    if dev and os.geteuid() == 0:
        major, minor = (int(x) for x in dev.split(":"))
        os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
    else:
        path.write_text("")


class FakeMdadm:
    """Runner double for `mdadm MD --fail|--remove NAME` and `mdadm MD --add [--write-mostly] /dev/X`."""

    def __init__(self, bed: SafetyBed, fail_on: str | None = None):
        self.bed = bed
        self.calls: list[list[str]] = []
        self.fail_on = fail_on  # "--add" etc.: that call exits 1 like mdadm would

    def _build(self, argv: list[str]) -> Result:
        """mdadm --build MD --level=1 --raid-devices=2 (missing --write-mostly DEV | DEV missing)."""
        bed = self.bed
        if bed.running:
            raise CommandError(argv, 1, f"mdadm: {argv[2]} is already in use.\n")
        devices = [a for a in argv[5:] if a != "--write-mostly"]
        assert argv[3:5] == ["--level=1", "--raid-devices=2"] and len(devices) == 2, argv
        members = []
        for slot, device in enumerate(devices):
            if device == "missing":
                continue
            name = os.path.basename(os.path.realpath(device))
            dev = (
                "253:3"
                if name == "dm-3"
                else next((lun.dev for s in bed.sessions for lun in s.luns if lun.block == name), None)
            )
            flags = "in_sync,write_mostly" if "--write-mostly" in argv[5:] and slot == 1 else "in_sync"
            members.append(FakeMember(name, slot=slot, state=flags, dev=dev))
        bed.members = members
        bed.running = True
        bed.sync_action = "idle"
        bed.write()
        return Result(tuple(argv), 0, "", "", 0.0)

    def __call__(self, argv, **kwargs) -> Result:
        argv = [str(a) for a in argv]
        self.calls.append(argv)
        assert "timeout" in kwargs or "deadline" in kwargs, f"unbounded command: {argv}"
        assert argv[0] == "mdadm", argv
        if self.fail_on and self.fail_on in argv:
            raise CommandError(argv, 1, f"mdadm: simulated failure of {self.fail_on}\n")
        bed = self.bed
        if argv[1] == "--build":
            return self._build(argv)
        if not bed.running:
            raise CommandError(argv, 1, f"mdadm: cannot open {argv[-1]}: No such file or directory\n")
        if argv[1] == "--stop":
            bed.stop()
            bed.write()
            return Result(tuple(argv), 0, "", "", 0.0)
        op, rest = argv[2], argv[3:]
        if op == "--fail":
            (name,) = rest
            if bed.member(name) is None:
                raise CommandError(argv, 1, f"mdadm: {name} does not appear to be a component of {argv[1]}\n")
            bed.set_member(name, state="faulty,write_mostly", slot=None)
        elif op == "--remove":
            (name,) = rest
            m = bed.member(name)
            if m is None or ("faulty" not in m.state and m.slot is not None):  # active members stay
                raise CommandError(argv, 1, f"mdadm: hot remove failed for {name}: Device or resource busy\n")
            bed.members = [x for x in bed.members if x.name != name]
        elif op == "--add":
            write_mostly = rest[0] == "--write-mostly"
            path = rest[-1]
            name = os.path.basename(path)
            if bed.member(name) is not None:
                raise CommandError(argv, 1, f"mdadm: Cannot open {path}: Device or resource busy\n")
            dev = (
                "253:3"
                if name == "dm-3"
                else next(
                    (lun.dev for s in bed.sessions for lun in s.luns if lun.block == name),
                    None,
                )
            )
            slot = 1 if write_mostly else 0  # the iSCSI leg's slot, or the local leg's
            bed.members.append(
                FakeMember(name, slot=slot, state="write_mostly,spare" if write_mostly else "spare", dev=dev)
            )
            bed.sync_action = "recover"
        else:
            raise AssertionError(f"unexpected mdadm call {argv}")
        bed.write()
        return Result(tuple(argv), 0, "", "", 0.0)


def as_block_script_host(bed: SafetyBed, monkeypatch, xenbus_path: str, spec: str):
    """Point `block-iscsimple` (run in-process, as libxl would) at this bed: its paths in the
    environment and a file-backed xenstore holding `spec` as the backend's params."""
    from iscsimple.core.xenstore import FileXenStore

    store = bed.root / "xenstore.json"
    for var, value in {
        "XENBUS_PATH": xenbus_path,
        "ISCSIMPLE_XENSTORE_FILE": str(store),
        "ISCSIMPLE_RECORDS": str(bed.paths.records),
        "ISCSIMPLE_STATE": str(bed.paths.state),
        "ISCSIMPLE_TAB": str(bed.paths.tab),
        "ISCSIMPLE_CONFIG": str(bed.paths.config),
        "ISCSIMPLE_LOCKS": str(bed.root / "locks"),
        "ISCSIMPLE_SYSFS": str(bed.paths.sysfs),
        "ISCSIMPLE_DEVFS": str(bed.paths.devfs),
        "ISCSIMPLE_PROCFS": str(bed.paths.procfs),
        "ISCSIMPLE_NO_SYSLOG": "1",
    }.items():
        monkeypatch.setenv(var, value)
    xs = FileXenStore(store)
    xs.write(f"{xenbus_path}/params", spec)
    return xs
