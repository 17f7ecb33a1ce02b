"""The storage around the code under test, inside the guest: loop disks, tgt as the iSCSI target on the
guest's loopback, open-iscsi's iscsid, udev, md. Plain tools only; the project's own commands are run
by the tests themselves."""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from vmharness import Guest, GuestError

PORTAL = "127.0.0.1:3260"
KERNEL_MODULES = ("md_mod", "raid1", "iscsi_tcp", "loop", "sd_mod", "dm_mod")
XEN_MODULES = ("xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xen-blkback", "xen-blkfront")
XEN_BIN = "/usr/lib/xen-4.17/bin"
DAEMONS = ("iscsid", "tgtd", "xenstored")


@dataclass
class Target:
    tid: int
    iqn: str
    luns: dict[int, str]  # LUN -> backing device in the guest


@dataclass
class StorageBed:
    guest: Guest
    targets: dict[str, Target] = field(default_factory=dict)
    disks: dict[str, str] = field(default_factory=dict)  # name -> /dev/loopN
    target_up: bool = False

    # -- once per boot -------------------------------------------------------------------------------
    def setup(self) -> None:
        g = self.guest
        g.run(["modprobe", "-a", *KERNEL_MODULES])
        g.run(["ip", "link", "set", "lo", "up"])
        g.run(["hostname", "iscsimple-vm"])
        g.run(["/lib/systemd/systemd-udevd", "--daemon"], timeout=30)
        # Block only: triggering every subsystem makes `udevadm settle` time out under TCG.
        g.run(["udevadm", "trigger", "--action=add", "--subsystem-match=block"], timeout=30)
        self.resync_speed(max_kib=1_000_000)
        g.run(["mkdir", "-p", "/tmp/disks", "/var/lib/iscsi", "/run/lock/iscsi"])
        self.start_iscsid()
        self.start_target()

    def setup_xen(self) -> None:
        """dom0 under Xen: the backend drivers, xenfs, oxenstored and xen-init-dom0, as xencommons does."""
        g = self.guest
        g.run(["modprobe", "-a", *XEN_MODULES])
        g.run(["mount", "-t", "xenfs", "xenfs", "/proc/xen"])
        g.run(["mkdir", "-p", "/run/xen", "/run/xen-hotplug", "/var/lib/xenstored", "/var/log/xen"])
        pidfile = "/run/xen/xenstored.pid"
        g.spawn(
            "xenstored",
            [f"{XEN_BIN}/oxenstored", "--no-fork", "--pid-file", pidfile],
            log="/tmp/xenstored.log",
        )
        g.wait_for(pidfile, "exists", timeout=30)
        g.run([f"{XEN_BIN}/xen-init-dom0"], timeout=60)

    def start_iscsid(self) -> None:
        self.guest.spawn("iscsid", ["iscsid", "-f"], log="/tmp/iscsid.log")
        # iscsiadm reaches iscsid over an abstract unix socket: wait until it listens.
        self.guest.wait_for("/proc/net/unix", "contains", "@ISCSIADM_ABSTRACT_NAMESPACE", timeout=30)

    # -- disks ---------------------------------------------------------------------------------------
    def make_disk(self, name: str, mib: int) -> str:
        image = f"/tmp/disks/{name}.img"
        self.guest.run(["truncate", "-s", f"{mib}M", image])
        dev = self.guest.run(["losetup", "--find", "--show", image]).stdout.strip()
        self.disks[name] = dev
        return dev

    # -- target --------------------------------------------------------------------------------------
    def start_target(self) -> None:
        """tgtd on the guest's loopback, with every target exported so far (tgtd keeps no config)."""
        self.guest.spawn("tgtd", ["tgtd", "-f", "--iscsi", f"portal={PORTAL}"], log="/tmp/tgtd.log")
        self._tgtadm_ready()
        self.target_up = True
        for target in self.targets.values():
            self._define(target)

    def _tgtadm_ready(self) -> None:
        # tgtd answers tgtadm once its management socket listens.
        self.guest.wait_for("/proc/net/unix", "contains", "/tgtd/socket.0", timeout=30)
        for _ in range(50):
            res = self.guest.run(
                ["tgtadm", "--lld", "iscsi", "--op", "show", "--mode", "target"], check=False
            )
            if res.rc == 0:
                return
        raise GuestError(f"tgtd did not answer tgtadm: {res}\n" + self.guest.console_tail())

    def kill_target(self) -> float:
        """SIGKILL tgtd: the target vanishes without a goodbye, like a crashed filer. Returns guest time."""
        at = self.guest.kill("tgtd")
        self.guest.wait_proc("tgtd", timeout=30)
        self.target_up = False
        return at

    def export(self, iqn: str, luns: dict[int, str]) -> Target:
        target = Target(len(self.targets) + 1, iqn, dict(luns))
        self.targets[iqn] = target
        self._define(target)
        return target

    def _define(self, target: Target) -> None:
        tgtadm = ["tgtadm", "--lld", "iscsi", "--op"]
        tid = str(target.tid)
        self.guest.run([*tgtadm, "new", "--mode", "target", "--tid", tid, "-T", target.iqn])
        for lun, dev in sorted(target.luns.items()):
            self.guest.run(
                [*tgtadm, "new", "--mode", "logicalunit", "--tid", tid, "--lun", str(lun), "-b", dev]
            )
        self.guest.run([*tgtadm, "bind", "--mode", "target", "--tid", tid, "-I", "ALL"])

    # -- initiator (plain open-iscsi, for tests of the stack itself) ---------------------------------
    def discover_and_login(self, iqn: str, replacement_timeout: int) -> None:
        g = self.guest
        g.run(["iscsiadm", "-m", "discovery", "-t", "st", "-p", PORTAL], timeout=30)
        node = ["iscsiadm", "-m", "node", "-T", iqn, "-p", PORTAL]
        g.run(
            [
                *node,
                "-o",
                "update",
                "-n",
                "node.session.timeo.replacement_timeout",
                "-v",
                str(replacement_timeout),
            ]
        )
        g.run([*node, "--login"], timeout=60)

    # -- reading real state --------------------------------------------------------------------------
    def session(self, iqn: str) -> str | None:
        """/sys/class/iscsi_session/sessionN of the target, or None."""
        for path in self.guest.glob("/sys/class/iscsi_session/session*"):
            if (self.guest.read(path + "/targetname") or "").strip() == iqn:
                return path
        return None

    def sessions(self) -> dict[str, str]:
        out = {}
        for path in self.guest.glob("/sys/class/iscsi_session/session*"):
            out[(self.guest.read(path + "/targetname") or "").strip()] = path
        return out

    def lun_device(self, iqn: str, lun: int) -> str | None:
        """/dev/sdX of LUN `lun` of the target's session, from sysfs (session -> target -> H:C:T:L -> block)."""
        session = self.session(iqn)
        if session is None:
            return None
        real = self.guest.call("readlink", path=session)["real"]
        device = real.rsplit("/iscsi_session/", 1)[0]
        found = self.guest.glob(f"{device}/target*/*:*:*:{lun}/block/*")
        return "/dev/" + found[0].rsplit("/", 1)[1] if found else None

    def md_name(self, label: str) -> str | None:
        """md127 etc. behind /dev/md/LABEL."""
        real = self.guest.call("readlink", path=f"/dev/md/{label}")["real"]
        return real.rsplit("/", 1)[1] if real else None

    def md_legs(self, md: str) -> dict[str, str]:
        """Member name (sda, loop1) -> its state flags, from /sys/block/mdN/md/dev-*/state."""
        legs = {}
        for path in self.guest.glob(f"/sys/block/{md}/md/dev-*"):
            legs[path.rsplit("dev-", 1)[1]] = (self.guest.read(path + "/state") or "").strip()
        return legs

    def mdstat(self) -> str:
        return self.guest.read("/proc/mdstat") or ""

    def resync_speed(self, max_kib: int) -> None:
        """md's resync/recovery speed, host-wide: fast (the disks are small) or slow enough to watch."""
        self.guest.call("write", path="/proc/sys/dev/raid/speed_limit_max", text=f"{max_kib}\n")
        self.guest.call("write", path="/proc/sys/dev/raid/speed_limit_min", text=f"{max_kib}\n")

    def wait_in_sync(self, md: str, timeout: float = 180) -> None:
        g = self.guest
        g.wait_for(f"/sys/block/{md}/md/degraded", "equals", "0", timeout=timeout)
        g.wait_for(f"/sys/block/{md}/md/sync_action", "equals", "idle", timeout=timeout)

    def capture(self, name: str) -> Path:
        """Save the kernel state in the shared fixtures' layout; returns the host directory."""
        commands = [
            ("iscsiadm_session.txt", ["iscsiadm", "-m", "session"]),
            ("iscsiadm_session_P3.txt", ["iscsiadm", "-m", "session", "-P", "3"]),
        ]
        for md in self.guest.glob("/sys/block/md*"):
            md = md.rsplit("/", 1)[1]
            commands.append((f"mdadm_detail_{md}.txt", ["mdadm", "--detail", f"/dev/{md}"]))
            commands.append(
                (f"mdadm_detail_export_{md}.txt", ["mdadm", "--detail", "--export", f"/dev/{md}"])
            )
        tar = self.guest.results / self.guest.call("capture", dest=name, commands=commands)["tar"]
        dest = self.guest.results / name
        shutil.rmtree(dest, ignore_errors=True)
        with tarfile.open(tar) as archive:
            archive.extractall(self.guest.results, filter="tar")
        tar.unlink()
        return dest

    def core_reading(self) -> dict:
        """core's readers run on the guest's real /sys (tests/vm/corejson.py), as plain data."""
        script = str(Path(__file__).resolve().parent / "corejson.py")
        return json.loads(self.guest.run([sys.executable, script, "/sys"]).stdout)

    # -- between tests -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Leave the guest as setup() left it: no arrays, no sessions, no node records, no targets."""
        g = self.guest
        g.call("stop_all", keep=DAEMONS)
        g.run(["dmsetup", "remove_all"], check=False)
        for md in g.glob("/sys/block/md*"):
            g.run(["mdadm", "--stop", "/dev/" + md.rsplit("/", 1)[1]], check=False, timeout=60)
        g.run(["iscsiadm", "-m", "node", "--logoutall=all"], check=False, timeout=60)
        # iscsid keeps retrying a login whose iscsiadm was killed (and logs in once the target is back):
        # a fresh iscsid forgets such pending logins.
        g.kill("iscsid")
        g.wait_proc("iscsid", timeout=30)
        g.run(["iscsiadm", "-m", "node", "-o", "delete"], check=False, timeout=30)
        g.run(["iscsiadm", "-m", "discoverydb", "-t", "st", "-p", PORTAL, "-o", "delete"], check=False)
        if self.target_up:
            for target in self.targets.values():
                tid = str(target.tid)
                tgtadm = [
                    "tgtadm",
                    "--lld",
                    "iscsi",
                    "--op",
                    "delete",
                    "--mode",
                    "target",
                    "--force",
                    "--tid",
                    tid,
                ]
                g.run(tgtadm, check=False)
        else:
            self.targets.clear()
            self.start_target()
        self.start_iscsid()
        left = self.sessions()
        assert not left, f"sessions survived the reset: {left}"
        self.targets.clear()
        for dev in self.disks.values():
            g.run(["losetup", "-d", dev], check=False)
        self.disks.clear()
        g.run(
            ["rm", "-rf", "/tmp/disks", "/run/iscsimple", "/var/lib/iscsimple", "/etc/iscsimple"], check=False
        )
        g.run(["mkdir", "-p", "/tmp/disks"])
