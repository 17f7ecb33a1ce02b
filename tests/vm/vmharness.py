"""Host side of the real-kernel test bed: a Debian kernel (and Xen 4.17) under qemu TCG.

The kernel and the hypervisor come from Debian packages (`apt-get download`, `dpkg -x`, never installed);
the guest's userspace is the host's root filesystem shared read-only over 9p with a tmpfs overlay, so
the project's venv and console scripts run in the guest unchanged. A tiny busybox initramfs mounts all
that and starts `guest_agent.py` as PID 1; the tests drive it over a virtio-serial port (see there).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GUEST_INIT = HERE / "guest" / "init"
GUEST_AGENT = HERE / "guest_agent.py"
RESULTS_MOUNT = "/mnt/iscsimple-results"
# The guest gets empty /run and /tmp (the host's hold the host's state); what it needs from there stays visible.
HIDDEN_IN_GUEST = (Path("/tmp"), Path("/run"))


def paths_to_keep(*paths: Path) -> list[str]:
    """Those of `paths` (the checkout, its venv, the kernel cache) that lie under a directory the guest hides."""
    keep = []
    for path in paths:
        path = Path(os.path.abspath(path))
        if any(path.is_relative_to(hidden) for hidden in HIDDEN_IN_GUEST) and str(path) not in keep:
            # Kernel arguments split at white space, qemu's multiboot module list (Xen) at commas.
            if any(c in str(path) for c in " ,:\t\n"):
                raise VmUnavailable(
                    f"{path}: a path with spaces, commas or colons cannot be passed to the guest"
                )
            keep.append(str(path))
    return keep


# Modules the initramfs loads before it can mount its root (their dependencies are added by modprobe).
INITRAMFS_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay")
TOOLS = ("qemu-system-x86_64", "busybox", "cpio", "depmod", "modprobe", "apt-get", "dpkg", "dpkg-deb")
# The guest runs the host's own userspace: what the storage bed and Xen need must be installed here.
GUEST_TOOLS = ("mdadm", "iscsiadm", "iscsid", "tgtd", "tgtadm", "losetup", "dmsetup", "udevadm", "ip")
XEN_TOOLS = ("xl", "xenstore-read", "xenstore-ls", "/usr/lib/xen-4.17/bin/oxenstored")


class VmUnavailable(RuntimeError):
    """The host cannot boot the test guest; the message says what to install or change."""


class GuestError(RuntimeError):
    """A request to the guest failed; the message ends with the guest console's tail."""


def cache_dir() -> Path:
    """Downloads and unpacked trees; outside the work tree by default so fresh clones reuse them."""
    if env := os.environ.get("ISCSIMPLE_VM_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iscsimple" / "vm"


def preflight(xen: bool = False) -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (the guest's tools need a root-owned host filesystem view)")
    wanted = TOOLS + GUEST_TOOLS + (XEN_TOOLS if xen else ())
    search = (
        os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    )  # root's tools, whatever PATH says
    missing = [tool for tool in wanted if shutil.which(tool, path=search) is None]
    if missing:
        problems.append("missing host tools: " + ", ".join(missing))
    if not Path("/bin/busybox").exists():
        problems.append("busybox-static is not installed")
    if problems:
        raise VmUnavailable(
            "cannot boot the real-kernel test guest: "
            + "; ".join(problems)
            + ". Run scripts/test once (it installs scripts/debian-packages.txt) as root."
        )


def _run(argv: list[str], timeout: float = 300, check: bool = True, cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
    except FileNotFoundError:
        return ""
    if check and res.returncode != 0:
        raise VmUnavailable(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _download(package: str, dest: Path) -> Path:
    """The .deb of one Debian package, fetched once into the cache (apt-get update once if it is unknown)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    for attempt in range(2):
        res = subprocess.run(
            ["apt-get", "download", package],
            cwd=dest,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        found = sorted(dest.glob(f"{package}_*.deb"))
        if res.returncode == 0 and found:
            return found[-1]
        if attempt == 0:
            _run(["apt-get", "update", "-qq"], timeout=600)
    raise VmUnavailable(f"apt-get download {package} failed: {res.stderr.strip()[-2000:]}")


@dataclass(frozen=True)
class Kernel:
    version: str  # e.g. 6.1.0-56-amd64
    root: Path  # dpkg -x of the linux-image package
    vmlinuz: Path
    modules: Path  # root/lib/modules/VERSION, depmod'ed


def kernel_package() -> str:
    """The versioned kernel package that linux-image-amd64 depends on (e.g. linux-image-6.1.0-56-amd64)."""
    for attempt in range(2):
        out = _run(["apt-cache", "depends", "linux-image-amd64"], check=False)
        for line in out.splitlines():
            name = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
                return name
        if attempt == 0:
            _run(["apt-get", "update", "-qq"], timeout=600)
    raise VmUnavailable(
        "apt-cache depends linux-image-amd64 names no linux-image-* package (apt-get update?)"
    )


def prepare_kernel() -> Kernel:
    cache = cache_dir()
    with _locked(cache / ".lock"):
        package = kernel_package()
        version = package.removeprefix("linux-image-")
        root = cache / package
        done = root / ".unpacked"
        if not done.exists():
            deb = _download(package, cache / "debs")
            shutil.rmtree(root, ignore_errors=True)
            _run(["dpkg-deb", "-x", str(deb), str(root)], timeout=600)
            _run(["depmod", "-b", str(root), version])
            done.write_text(deb.name + "\n")
    modules = root / "lib" / "modules" / version
    if not modules.is_dir():
        modules = root / "usr" / "lib" / "modules" / version
    return Kernel(version, root, root / "boot" / f"vmlinuz-{version}", modules)


def prepare_xen() -> Path:
    """The Xen 4.17 hypervisor, gunzipped (qemu boots it as a multiboot kernel)."""
    cache = cache_dir()
    package = "xen-hypervisor-4.17-amd64"
    with _locked(cache / ".lock"):
        image = cache / package / "xen-4.17-amd64"
        if not image.exists():
            deb = _download(package, cache / "debs")
            root = cache / package / "root"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            _run(["dpkg-deb", "-x", str(deb), str(root)])
            gz = root / "boot" / "xen-4.17-amd64.gz"
            tmp = image.with_suffix(".tmp")
            tmp.write_bytes(gzip.decompress(gz.read_bytes()))
            tmp.rename(image)
    return image


def build_initramfs(kernel: Kernel) -> Path:
    """busybox-static + the modules that mount the 9p root; cached per kernel and init script."""
    modules = []
    for name in INITRAMFS_MODULES:
        out = _run(["modprobe", "-d", str(kernel.root), "-S", kernel.version, "--show-depends", name])
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod" and parts[1] not in modules:
                modules.append(parts[1])
    key = hashlib.sha256(
        "\n".join([kernel.version, GUEST_INIT.read_text(), *modules]).encode()
        + Path("/bin/busybox").read_bytes()[:4096]
    ).hexdigest()[:16]
    image = cache_dir() / f"initramfs-{kernel.version}-{key}.cpio"
    with _locked(cache_dir() / ".lock"):
        if image.exists():
            return image
        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp)
            for d in ("bin", "proc", "sys", "dev", "modules"):
                (stage / d).mkdir()
            shutil.copy2("/bin/busybox", stage / "bin" / "busybox")
            shutil.copy2(GUEST_INIT, stage / "init")
            names = []
            for path in modules:
                shutil.copy2(path, stage / "modules" / Path(path).name)
                names.append(Path(path).name)
            (stage / "modules.order").write_text("\n".join(names) + "\n")
            files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
            with open(image.with_suffix(".tmp"), "wb") as out:
                subprocess.run(
                    ["cpio", "-o", "-H", "newc", "--quiet"],
                    input="\n".join(files).encode(),
                    stdout=out,
                    cwd=stage,
                    timeout=120,
                    check=True,
                )
            image.with_suffix(".tmp").rename(image)
    return image


class Guest:
    """One booted guest; requests go over the control port, one at a time."""

    def __init__(self, workdir: Path, proc: subprocess.Popen, conn: socket.socket, boot_seconds: float):
        self.workdir = workdir
        self.results = workdir / "results"
        self.console = workdir / "console.log"
        self.proc = proc
        self.conn = conn
        self.boot_seconds = boot_seconds
        self._buf = b""

    # -- boot ----------------------------------------------------------------------------------------
    @classmethod
    def boot(
        cls,
        workdir: Path,
        kernel: Kernel,
        xen: Path | None = None,
        memory_mib: int = 1024,
        timeout: float = 300,
        extra_argv: tuple[str, ...] = (),
    ) -> Guest:
        """`extra_argv`: more qemu options (a network restricted to explicit forwards, disks)."""
        preflight(xen=xen is not None)
        initramfs = build_initramfs(kernel)
        workdir.mkdir(parents=True, exist_ok=True)
        results = workdir / "results"
        results.mkdir(exist_ok=True)
        sock_path = workdir / "ctl.sock"
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock_path))
        listener.listen(1)
        cmdline = [
            f"ism.python={sys.executable}",
            f"ism.agent={GUEST_AGENT}",
            f"ism.modules={kernel.modules}",
            f"ism.kver={kernel.version}",
            f"ism.results={RESULTS_MOUNT}",
            "panic=-1",
        ]
        keep = paths_to_keep(REPO, Path(sys.executable).parent, cache_dir())
        if keep:
            cmdline.append("ism.keep=" + ":".join(keep))
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg,thread=multi",
            "-smp",
            "2",
            "-m",
            str(memory_mib),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{workdir / 'console.log'}",
            "-virtfs",
            "local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={results},mount_tag=results,security_model=none,multidevs=remap",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"socket,id=ctl,path={sock_path}",
            "-device",
            "virtserialport,chardev=ctl,name=iscsimple.ctl",
        ]
        if xen is None:
            cmdline = ["console=ttyS0", "random.trust_cpu=on", *cmdline]
            argv += ["-cpu", "max", "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs)]
            argv += ["-append", " ".join(cmdline)]
        else:
            # Xen takes COM1; dom0's console is hvc0. qemu's multiboot modules are "file args,file".
            # -cpu max crashes dom0 early and EPYC faults in mwait_idle (vm-recipe): qemu64 + svm/npt.
            dom0 = ["console=hvc0", "earlyprintk=xen", *cmdline]
            argv += ["-cpu", "qemu64,+svm,+npt", "-kernel", str(xen)]
            argv += ["-append", f"console=com1 dom0_mem={memory_mib // 2}M,max:{memory_mib // 2}M"]
            argv += ["-initrd", f"{kernel.vmlinuz} {' '.join(dom0)},{initramfs}"]
        argv += list(extra_argv)
        (workdir / "qemu-argv.json").write_text(json.dumps(argv, indent=1))
        start = time.monotonic()
        with open(workdir / "qemu.log", "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        listener.settimeout(30)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            proc.kill()
            raise GuestError(
                "qemu did not connect its control port: " + _tail(workdir / "qemu.log")
            ) from None
        finally:
            listener.close()
        guest = cls(workdir, proc, conn, 0.0)
        hello = guest._receive(timeout, "boot")
        guest.boot_seconds = time.monotonic() - start
        guest.guest_boot_uptime = hello.get("uptime")
        return guest

    # -- transport -----------------------------------------------------------------------------------
    def _receive(self, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                state = "qemu exited" if self.proc.poll() is not None else f"no answer in {timeout:.0f} s"
                raise GuestError(f"guest {what}: {state}\n{self.console_tail()}")
            self.conn.settimeout(min(remaining, 1.0))
            try:
                chunk = self.conn.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                raise GuestError(f"guest {what}: control port closed\n{self.console_tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, op: str, wait: float = 120, **args) -> dict:
        """One request; `wait` bounds the answer's arrival, guest operations take their own `timeout`."""
        start = time.monotonic()
        self.conn.sendall((json.dumps({"op": op, **args}) + "\n").encode())
        answer = self._receive(wait, op)
        with open(self.workdir / "calls.log", "a") as log:  # where the time goes, for slow runs
            log.write(f"{time.monotonic() - start:7.3f} {op} {json.dumps(args)[:160]}\n")
        if not answer.pop("ok"):
            raise GuestError(
                f"guest {op} {args}: {answer['error']}\n{answer.get('traceback', '')}\n{self.console_tail()}"
            )
        return answer

    def console_tail(self, lines: int = 60) -> str:
        return "--- guest console (tail) ---\n" + _tail(self.console, lines)

    # -- conveniences --------------------------------------------------------------------------------
    def run(
        self,
        argv: list[str],
        *,
        check: bool = True,
        timeout: float = 60,
        env: dict | None = None,
        input: str | None = None,
    ) -> Result:
        answer = self.call("run", wait=timeout + 30, argv=argv, env=env, timeout=timeout, input=input)
        res = Result(
            argv, answer["rc"], answer["stdout"], answer["stderr"], answer["seconds"], answer["timed_out"]
        )
        if check and (res.rc != 0 or res.timed_out):
            raise GuestError(f"guest command failed: {res}\n{self.console_tail(30)}")
        return res

    def read(self, path: str) -> str | None:
        return self.call("read", paths=[path])["files"][path]

    def read_many(self, paths: list[str]) -> dict[str, str | None]:
        return self.call("read", paths=paths)["files"]

    def glob(self, pattern: str) -> list[str]:
        return self.call("glob", pattern=pattern)["paths"]

    def wait_for(self, path: str, cond: str, value=None, timeout: float = 30) -> dict:
        answer = self.call("wait_for", wait=timeout + 30, path=path, cond=cond, value=value, timeout=timeout)
        if not answer["met"]:
            raise GuestError(
                f"guest: {path} did not become {cond} {value!r} within {timeout} s (last: {answer['value']!r})\n"
                + self.console_tail(30)
            )
        return answer

    def spawn(self, name: str, argv: list[str], log: str | None = None, env: dict | None = None) -> dict:
        return self.call("spawn", name=name, argv=argv, log=log or f"/tmp/{name}.log", env=env)

    def kill(self, name: str, sig: str = "KILL") -> float:
        return self.call("signal", name=name, sig=sig)["at"]

    def wait_proc(self, name: str, timeout: float = 60) -> dict:
        return self.call("wait", wait=timeout + 30, name=name, timeout=timeout)

    def now(self) -> float:
        return self.call("now")["monotonic"]

    def shutdown(self, timeout: float = 30) -> None:
        with contextlib.suppress(OSError, GuestError):
            self.conn.sendall(b'{"op": "poweroff"}\n')
            self._receive(5, "poweroff")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.conn.close()


@dataclass
class Result:
    argv: list[str]
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    def __str__(self) -> str:
        return (
            f"{' '.join(self.argv)} -> rc={self.rc}{' (timed out)' if self.timed_out else ''} "
            f"in {self.seconds:.2f} s\nstdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}"
        )


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_bytes()[-200_000:].decode(errors="replace")
    except OSError:
        return f"({path} missing)"
    return "\n".join(text.splitlines()[-lines:])
