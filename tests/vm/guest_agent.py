"""The test guest's PID 1: serves the host's requests over a virtio-serial port.

It runs with the host's own Python (the guest shares the host's root filesystem), so the tests drive the
guest step by step from pytest: run a command, read sysfs, wait for a sysfs condition, capture a state.
Reading files and polling happen here, in-process, because process creation is slow under TCG.

Protocol: one JSON object per line each way. A request has "op" and its arguments; the answer has "ok"
and either the result fields or "error".
"""

from __future__ import annotations

import contextlib
import glob
import json
import mmap
import os
import re
import signal
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path

# Modules only some requests need (ctypes, hashlib, random, shutil, tarfile, urllib.request) are
# imported where they are used: this process starts while the guest boots, and under TCG every
# module imported at start-up costs boot time (so does `site`: init starts it with `python -S`).

PORT_NAME = "iscsimple.ctl"
RESULTS = Path("/mnt/iscsimple-results")
BLOCK = 1 << 20


def pattern(seed: str, length: int) -> bytes:
    """Deterministic content for a disk, different for every seed (randbytes: fast even under TCG)."""
    import random

    return random.Random(seed).randbytes(length)


class Agent:
    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    # -- processes -----------------------------------------------------------------------------------
    def op_run(self, argv, env=None, timeout=60.0, input=None, cwd=None):
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input.encode() if input is not None else None, timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        return {
            "rc": proc.returncode,
            "stdout": out.decode(errors="replace"),
            "stderr": err.decode(errors="replace"),
            "seconds": time.monotonic() - start,
            "timed_out": timed_out,
        }

    def op_spawn(self, name, argv, log, env=None):
        """A background process (daemon, writer) in its own session, output to a log file."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.procs[name] = proc
        return {"pid": proc.pid, "started": time.monotonic()}

    def op_signal(self, name, sig="KILL", group=True):
        proc = self.procs[name]
        signum = getattr(signal, "SIG" + sig)
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
        return {"at": time.monotonic()}

    def op_wait(self, name, timeout=60.0):
        proc = self.procs[name]
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return {"rc": None, "running": True}
        del self.procs[name]
        return {"rc": rc, "running": False, "at": time.monotonic()}

    def op_stop_all(self, keep=()):
        """Kill what a test left running (writers, agents), but not the bed's daemons."""
        stopped = []
        for name in [n for n in self.procs if n not in keep]:
            proc = self.procs.pop(name)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                stopped.append(name)
            proc.wait()
        return {"stopped": stopped}

    def op_running(self, name):
        proc = self.procs.get(name)
        return {"running": proc is not None and proc.poll() is None}

    # -- files ---------------------------------------------------------------------------------------
    def op_read(self, paths):
        out = {}
        for path in paths:
            try:
                out[path] = Path(path).read_text(errors="replace")
            except OSError:
                out[path] = None
        return {"files": out}

    def op_write(self, path, text):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return {}

    def op_glob(self, pattern):
        return {"paths": sorted(glob.glob(pattern))}

    def op_readlink(self, path):
        """A link's target and where the path leads (itself for a non-link); None for both if absent."""
        if not os.path.lexists(path):
            return {"target": None, "real": None}
        target = os.readlink(path) if os.path.islink(path) else None
        real = os.path.realpath(path)
        return {"target": target, "real": real if os.path.exists(real) else None}

    def op_wait_for(self, path, cond, value=None, timeout=30.0, interval=0.02):
        """Poll one file until a condition holds: equals / contains / not_contains / regex / exists / absent."""
        start = time.monotonic()
        while True:
            if cond in ("exists", "absent"):
                text = "" if os.path.lexists(path) else None
            else:
                try:
                    text = Path(path).read_text(errors="replace").strip()
                except OSError:
                    text = None
            if _holds(cond, text, value):
                return {
                    "met": True,
                    "value": text,
                    "seconds": time.monotonic() - start,
                    "at": time.monotonic(),
                }
            if time.monotonic() - start > timeout:
                return {"met": False, "value": text, "seconds": time.monotonic() - start}
            time.sleep(interval)

    def op_wait_glob(self, pattern, timeout=30.0, interval=0.05):
        """Poll until some path matches the glob (met: False after timeout: nothing appeared)."""
        start = time.monotonic()
        while True:
            if found := sorted(glob.glob(pattern)):
                return {
                    "met": True,
                    "paths": found,
                    "at": time.monotonic(),
                    "seconds": time.monotonic() - start,
                }
            if time.monotonic() - start > timeout:
                return {"met": False, "paths": [], "seconds": time.monotonic() - start}
            time.sleep(interval)

    def op_wait_metric(self, url, line_regex, timeout=30.0, interval=0.05):
        """Scrape url until one exposition line matches; returns the matching line and when it first did."""
        start = time.monotonic()
        import urllib.request

        rx = re.compile(line_regex, re.M)
        last = None
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    last = resp.read().decode(errors="replace")
            except OSError as exc:
                last = f"(scrape failed: {exc})"
            if m := rx.search(last):
                return {
                    "met": True,
                    "line": m.group(0),
                    "at": time.monotonic(),
                    "seconds": time.monotonic() - start,
                }
            if time.monotonic() - start > timeout:
                return {"met": False, "text": last[-5000:], "seconds": time.monotonic() - start}
            time.sleep(interval)

    def op_http_get(self, url, timeout=10.0):
        import urllib.request

        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return {"status": resp.status, "text": resp.read().decode(errors="replace")}

    def op_now(self):
        return {"monotonic": time.monotonic()}

    # -- block devices -------------------------------------------------------------------------------
    def op_fill(self, path, seed, length):
        """Write pattern(seed) to a block device, bypassing the page cache, and flush it."""
        import hashlib

        data = pattern(seed, length)
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
        try:
            buf = mmap.mmap(-1, BLOCK)
            for offset in range(0, length, BLOCK):
                chunk = data[offset : offset + BLOCK]
                buf.seek(0)
                buf.write(chunk)
                os.pwrite(fd, memoryview(buf)[: len(chunk)], offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"sha256": hashlib.sha256(data).hexdigest()}

    def op_sha256(self, path, length=None):
        """Checksum of what is on the device now (O_DIRECT: md writes to the legs bypass their page cache)."""
        import hashlib

        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            length = size if length is None else min(length, size)
            digest = hashlib.sha256()
            buf = mmap.mmap(-1, BLOCK)
            for offset in range(0, length, BLOCK):
                n = os.preadv(fd, [buf], offset)
                digest.update(buf[: min(n, length - offset)])
        finally:
            os.close(fd)
        return {"sha256": digest.hexdigest(), "length": length, "size": size}

    def op_verify_writes(self, log, device):
        """Does the device hold, at every offset the writer wrote, its last completed write?"""
        last: dict[int, str] = {}
        times = []
        for line in Path(log).read_text().splitlines():
            t, offset, seed = line.split()
            last[int(offset)] = seed
            times.append(float(t))
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        bad = []
        try:
            for offset, seed in sorted(last.items()):
                os.preadv(fd, [buf], offset)
                if buf[:4096] != pattern(seed, 4096):
                    bad.append(offset)
        finally:
            os.close(fd)
        return {"writes": len(times), "offsets": len(last), "mismatched": bad[:20], "times": times}

    def op_verify_records(self, path, count):
        """Records 0..count-1 (tests/vm/records.py) on a device: which are missing or bad."""
        import records  # beside this file

        return records.verify(path, count)

    # -- captures ------------------------------------------------------------------------------------
    def op_capture(self, dest, commands=()):
        """Save the md and iSCSI sysfs state in the layout of the shared fixtures (NN_state/sys/...)."""
        import shutil
        import tarfile

        # Built on tmpfs and shipped as one tar: thousands of small writes over 9p are slow.
        root = Path("/tmp/captures") / dest
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        (root / "uptime").write_text(Path("/proc/uptime").read_text().split()[0] + "\n")
        (root / "timestamp").write_text(f"{time.time():.9f}\n")
        for src, name in (("/proc/mdstat", "proc_mdstat"), ("/proc/partitions", "proc_partitions")):
            shutil.copyfile(src, root / name)
        links = []
        for md in sorted(glob.glob("/sys/block/md*")):
            _copy_dir(Path(md), root)
            for sub in sorted(glob.glob(md + "/md")) + sorted(glob.glob(md + "/md/dev-*")):
                _copy_dir(Path(sub), root)
        for cls in ("iscsi_session", "iscsi_connection", "iscsi_host"):
            for link in sorted(glob.glob(f"/sys/class/{cls}/*")):
                real = os.path.realpath(link)
                links.append(f"{link} -> {real}")
                _copy_dir(Path(real), root)
        for host in sorted(glob.glob("/sys/class/iscsi_host/*")):
            for scsi_host in glob.glob(host + "/device/scsi_host/*"):
                real = os.path.realpath(scsi_host)
                links.append(f"{scsi_host} -> {real}")
                _copy_dir(Path(real), root)
        for session in sorted(glob.glob("/sys/class/iscsi_session/*")):
            device = Path(os.path.realpath(session)).parent.parent
            for lun in sorted(device.glob("target*/*:*:*:*")):
                _copy_dir(lun, root)
                for blk in sorted(lun.glob("block/*")):
                    links.append(f"/sys/block/{blk.name} -> {blk}")
                    _copy_dir(blk, root)
        (root / "class_links.txt").write_text("".join(line + "\n" for line in links))
        dev_links = [
            f"{d}:\n{_listing(Path(d))}"
            for d in ("/dev/disk/by-id", "/dev/disk/by-path", "/dev/md")
            if os.path.isdir(d)
        ]
        (root / "dev_links.txt").write_text("\n".join(dev_links))
        # iscsimple's own state beside the kernel's: the registry (volatile) and the durable records.
        for src, name in (("/run/iscsimple", "run_iscsimple"), ("/var/lib/iscsimple", "var_lib_iscsimple")):
            if os.path.isdir(src):
                shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("*.lock", "locks"))
        for name, argv in commands:
            res = subprocess.run(argv, capture_output=True, timeout=30, check=False)
            (root / name).write_bytes(res.stdout + res.stderr)
        with tarfile.open(RESULTS / f"{dest}.tar", "w") as tar:
            tar.add(root, arcname=dest)
        return {"tar": f"{dest}.tar"}


def _copy_dir(src: Path, root: Path) -> None:
    """Copy the readable regular files of one sysfs directory (and a `ls -la` of it) to root + its path."""
    dst = root / str(src).lstrip("/")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / ".ls-la").write_text(_listing(src))
    for entry in sorted(src.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            continue
        try:
            data = entry.read_bytes()
        except OSError:
            continue  # write-only attributes
        (dst / entry.name).write_bytes(data)


def _listing(src: Path) -> str:
    """`ls -la` of a directory, in ls's format (tests/fixturetree.py parses the links back out of it),
    without a process per directory."""
    entries = [(".", src), ("..", src.parent), *((e.name, e) for e in sorted(src.iterdir()))]
    rows = []
    for name, path in entries:
        st = os.lstat(path)
        shown = f"{name} -> {os.readlink(path)}" if stat.S_ISLNK(st.st_mode) else name
        when = time.strftime("%b %e %H:%M", time.localtime(st.st_mtime))
        rows.append(
            (stat.filemode(st.st_mode), str(st.st_nlink), "root", "root", str(st.st_size), when, shown)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["total 0"]
    for row in rows:
        cells = [row[0], row[1].rjust(widths[1]), row[2], row[3], row[4].rjust(widths[4]), row[5], row[6]]
        lines.append(" ".join(cells))
    return "\n".join(lines) + "\n"


def _holds(cond: str, text: str | None, value) -> bool:
    if cond == "exists":
        return text is not None
    if cond == "absent":
        return text is None
    if text is None:
        return False
    if cond == "equals":
        return text == value
    if cond == "in":
        return text in value
    if cond == "contains":
        return value in text
    if cond == "not_contains":
        return value not in text
    if cond == "regex":
        return re.search(value, text) is not None
    raise ValueError(f"unknown condition {cond!r}")


def find_port(name: str) -> str:
    for entry in glob.glob("/sys/class/virtio-ports/*"):
        with contextlib.suppress(OSError):
            if Path(entry, "name").read_text().strip() == name:
                return "/dev/" + os.path.basename(entry)
    raise SystemExit(f"guest agent: no virtio port named {name}")


def serve() -> None:
    port = find_port(PORT_NAME)
    fd = os.open(port, os.O_RDWR)
    reader = os.fdopen(os.dup(fd), "rb")
    agent = Agent()

    def send(obj) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(fd, data) :]

    send({"ok": True, "hello": True, "uptime": float(Path("/proc/uptime").read_text().split()[0])})
    for line in reader:
        try:
            request = json.loads(line)
            op = request.pop("op")
            if op == "poweroff":
                send({"ok": True})
                return
            answer = {"ok": True, **getattr(agent, "op_" + op)(**request)}
        except Exception as exc:  # the host sees the error and the traceback
            answer = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        send(answer)


def power_off() -> None:
    import ctypes

    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)  # RB_POWER_OFF


def writer(device: str, log: str, stop: str, span: int = 4 << 20) -> None:
    """A VM's steady writes: 4 KiB O_DIRECT|O_DSYNC blocks round a span until `stop` exists. Each
    completed write is logged as "monotonic-time offset seed" so a test sees stalls, whether writes
    carried on, and what the disk must hold at the end (verify_writes)."""
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
    buf = mmap.mmap(-1, 4096)
    offset, n = 0, 0
    with open(log, "w", buffering=1) as out:
        while not os.path.exists(stop):
            seed = f"writer-{n}"
            buf.seek(0)
            buf.write(pattern(seed, 4096))
            os.pwrite(fd, buf, offset)
            out.write(f"{time.monotonic():.3f} {offset} {seed}\n")
            offset, n = (offset + 4096) % span, n + 1
    os.close(fd)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "writer":
        writer(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "records":
        import records  # beside this file

        interval = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
        records.write_records(
            sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), interval
        )
        return
    if os.getpid() == 1:
        # PID 1 must reap orphans (daemons' children): the parent does that, the child serves.
        child = os.fork()
        if child:
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            while True:
                try:
                    pid, _ = os.wait()
                except ChildProcessError:
                    break
                if pid == child:
                    break
            power_off()
            return
    try:
        serve()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise


if __name__ == "__main__":
    main()
