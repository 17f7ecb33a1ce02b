"""Two hosts on real kernels, one filer, one Prometheus — all on this machine, loopback only.

- The filer: `tgtd` here, its portal on 127.0.0.1:PORT, LUNs backed by files, so it can be killed
  or restarted apart from both hosts and the backing file read directly.
- Host A and host B: two qemu TCG guests (vmharness.Guest), each with a user-mode network that allows
  nothing but explicit forwards (`restrict=on`): the guest's 10.0.2.100:3260 reaches the filer and
  10.0.2.101:9090 reaches Prometheus (`guestfwd` → tcpbridge.py → 127.0.0.1), and 127.0.0.1:PORT here
  reaches the guest's agent (`hostfwd`). Each host's durable records (/var/lib/iscsimple) and its local
  leg live on virtio disk images in the test's directory, so they survive a crash (qemu killed) and a
  reboot (a fresh guest on the same images).
- A host's storage path is cut alone by a blackhole route to the filer's address inside that guest;
  its agent stays reachable, as on a real host that lost only its storage network.
- Prometheus (the Debian package) on 127.0.0.1 scrapes both agents every second.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from storagebed import KERNEL_MODULES
from vmharness import Guest, GuestError, Kernel
from xldriver import AGENT, CLI, Xl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from alertchain import Prometheus, free_port

HERE = Path(__file__).resolve().parent
BRIDGE = HERE / "tcpbridge.py"
FILER_IP = "10.0.2.100"
PROMETHEUS_IP = "10.0.2.101"
GUEST_IP = "10.0.2.15"
PORTAL = f"{FILER_IP}:3260"
AGENT_PORT = 9977
GUEST_MODULES = (*KERNEL_MODULES, "virtio_net", "virtio_blk", "ext4")
RECORDS_MIB = 16
REPLACEMENT_TIMEOUT = 5


class Filer:
    """tgtd on this machine, on 127.0.0.1 only, with its own management socket (-C)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.control = str(1000 + self.port % 30000)
        self.targets: dict[str, dict[int, Path]] = {}
        self.proc: subprocess.Popen | None = None

    def tgtadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(
            ["tgtadm", "-C", self.control, "--lld", "iscsi", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check and res.returncode != 0:
            raise GuestError(f"tgtadm {' '.join(args)}: {res.stderr.strip()}")
        return res

    def start(self) -> None:
        log = open(self.workdir / "tgtd.log", "ab")  # noqa: SIM115 - lives as long as tgtd
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", self.control, "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while self.tgtadm("--op", "show", "--mode", "target", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise GuestError("tgtd did not start: " + (self.workdir / "tgtd.log").read_text()[-2000:])
            time.sleep(0.1)
        for tid, (iqn, luns) in enumerate(self.targets.items(), start=1):
            self._define(tid, iqn, luns)

    def lun_file(self, name: str, mib: int) -> Path:
        path = self.workdir / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(mib << 20)
        return path

    def export(self, iqn: str, luns: dict[int, Path]) -> None:
        self.targets[iqn] = dict(luns)
        self._define(len(self.targets), iqn, luns)

    def _define(self, tid: int, iqn: str, luns: dict[int, Path]) -> None:
        self.tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
        for lun, path in sorted(luns.items()):
            self.tgtadm(
                "--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun), "-b", str(path)
            )
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@dataclass
class Host:
    """One dom0 stand-in: a guest with its network forwards, disks that survive it, and its agent."""

    name: str
    workdir: Path
    kernel: Kernel
    filer: Filer
    prometheus_port: int
    agent_port: int = field(default_factory=free_port)
    guest: Guest | None = None
    cut: bool = False

    @property
    def records_image(self) -> Path:
        return self.workdir / "records.img"

    @property
    def local_image(self) -> Path:
        return self.workdir / "local.img"

    @property
    def agent_address(self) -> str:
        return f"127.0.0.1:{self.agent_port}"

    @property
    def xl(self) -> Xl:
        return Xl(self)

    def make_disks(self, local_mib: int) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.records_image, "wb") as f:
            f.truncate(RECORDS_MIB << 20)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", str(self.records_image)], check=True, timeout=60, capture_output=True
        )
        with open(self.local_image, "wb") as f:
            f.truncate(local_mib << 20)

    def qemu_network_and_disks(self) -> tuple[str, ...]:
        bridge = f"{sys.executable} {BRIDGE} 127.0.0.1"
        netdev = ",".join(
            [
                "user,id=n0,restrict=on,net=10.0.2.0/24",
                f"guestfwd=tcp:{PORTAL}-cmd:{bridge} {self.filer.port}",
                f"guestfwd=tcp:{PROMETHEUS_IP}:9090-cmd:{bridge} {self.prometheus_port}",
                f"hostfwd=tcp:127.0.0.1:{self.agent_port}-{GUEST_IP}:{AGENT_PORT}",
            ]
        )
        return (
            "-smp",
            "1",  # two guests on a 2-core machine: one vCPU thread each (overrides the harness's 2)
            "-netdev",
            netdev,
            "-device",
            "virtio-net-pci,netdev=n0",
            "-drive",
            f"file={self.records_image},format=raw,if=virtio,cache=writeback",
            "-drive",
            f"file={self.local_image},format=raw,if=virtio,cache=writeback",
        )

    def boot(self, config: str, tab: dict[str, str]) -> float:
        """A fresh guest on the host's disks: network, storage daemons, records mounted, agent up."""
        start = time.monotonic()
        self.guest = Guest.boot(
            self.workdir / f"boot-{int(time.time() * 1000)}",
            self.kernel,
            memory_mib=768,
            extra_argv=self.qemu_network_and_disks(),
        )
        g = self.guest
        g.run(["modprobe", "-a", *GUEST_MODULES])
        nic = next(p.rsplit("/", 1)[1] for p in g.glob("/sys/class/net/*") if not p.endswith("/lo"))
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "set", nic, "up"],
            ["ip", "addr", "add", f"{GUEST_IP}/24", "dev", nic],
            ["ip", "route", "add", "default", "via", "10.0.2.2"],
            ["hostname", self.name],
            ["mkdir", "-p", "/var/lib/iscsimple", "/var/lib/iscsi", "/run/lock/iscsi"],
            ["mount", "/dev/vda", "/var/lib/iscsimple"],
        ):
            g.run(argv)
        g.run(["/lib/systemd/systemd-udevd", "--daemon"], timeout=30)
        g.run(["udevadm", "trigger", "--action=add", "--subsystem-match=block"], timeout=30)
        # Fast copies, but throttled: an unthrottled recovery thread starves the single vCPU's processes.
        g.call("write", path="/proc/sys/dev/raid/speed_limit_max", text="100000\n")
        g.call("write", path="/proc/sys/dev/raid/speed_limit_min", text="1000\n")
        g.spawn("iscsid", ["iscsid", "-f"], log="/tmp/iscsid.log")
        g.wait_for("/proc/net/unix", "contains", "@ISCSIADM_ABSTRACT_NAMESPACE", timeout=30)
        # tgtd's SendTargets answer names its own portal (127.0.0.1:PORT on this machine), which is the
        # guest's loopback in the guest: the node records name the forwarded address instead, as an
        # operator's would for a filer behind NAT. A known target is never rediscovered by the hotplug.
        for iqn in self.filer.targets:
            g.run(["iscsiadm", "-m", "node", "-o", "new", "-T", iqn, "-p", PORTAL], timeout=30)
        self.xl.configure(tab, config, portals=(PORTAL,))
        g.spawn(
            "agent",
            [AGENT, "--web.listen-address", f"{GUEST_IP}:{AGENT_PORT}", "--refresh.interval", "1s"],
            log="/tmp/agent.log",
        )
        self.cut = False
        return time.monotonic() - start

    def cut_storage(self) -> None:
        """This host alone loses the filer: its packets to the portal are dropped from now on."""
        assert self.guest is not None
        self.guest.run(["ip", "route", "add", "blackhole", f"{FILER_IP}/32"])
        self.cut = True

    def restore_storage(self) -> None:
        assert self.guest is not None
        self.guest.run(["ip", "route", "del", "blackhole", f"{FILER_IP}/32"])
        self.cut = False

    def crash(self) -> None:
        """Power cut: qemu killed, nothing flushed but what the guest already wrote to its disk images."""
        assert self.guest is not None
        self.guest.proc.kill()
        self.guest.proc.wait(30)
        with contextlib.suppress(OSError):
            self.guest.conn.close()
        self.guest = None

    def cli(self, *args: str, timeout: float = 90):
        assert self.guest is not None
        return self.guest.run([CLI, *args], check=False, timeout=timeout)

    def shutdown(self) -> None:
        if self.guest is not None:
            self.guest.shutdown()
            self.guest = None


def cluster_config(host: str, extra: str = "") -> str:
    """The hosts' iscsimple.toml (after [iscsi] portals, which Xl.configure writes)."""
    return (
        f"replacement_timeout_mirrored = {REPLACEMENT_TIMEOUT}\n"
        "[attach]\nbudget = 35\ndevice_wait = 15\n"
        "[heal]\nenabled = true\nstable_seconds = 2\n"
        f'[cluster]\nprometheus_url = "http://{PROMETHEUS_IP}:9090"\nhost_name = "{host}"\ntimeout = 3\n'
        + extra
    )


class TwoHosts:
    def __init__(self, workdir: Path, kernel: Kernel):
        self.filer = Filer(workdir / "filer")
        self.prometheus_port = free_port()
        self.a = Host("hosta", workdir / "hosta", kernel, self.filer, self.prometheus_port)
        self.b = Host("hostb", workdir / "hostb", kernel, self.filer, self.prometheus_port)
        self.workdir = workdir
        self.prometheus: Prometheus | None = None

    def start_prometheus(self) -> None:
        self.prometheus = Prometheus(
            self.workdir / "prometheus",
            [self.a.agent_address, self.b.agent_address],
            f"http://127.0.0.1:{free_port()}",  # no Alertmanager: only the guard's queries matter here
            interval="1s",
            port=self.prometheus_port,
        )

    def stop(self) -> None:
        for host in (self.a, self.b):
            with contextlib.suppress(Exception):
                host.shutdown()
        if self.prometheus is not None:
            self.prometheus.stop()
        self.filer.stop()
