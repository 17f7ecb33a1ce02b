"""A fake host for hotplug tests: fake `iscsiadm`, `mdadm` and `xenstore-*` that keep state.

The fake executables are tiny launchers into `tool_main`, written into the host's
bin/ (first on PATH in `env()`). They share one state directory (env ISCSIMPLE_FAKE_HOST):

    bin/              iscsiadm, mdadm, xenstore-read, xenstore-write, xenstore-rm
    state.json        targets, node DB, sessions, faults to inject (flock'd: state.lock)
    calls.jsonl       every call: tool, argv, pid, time, fault fired
    xenstore.json     the xenstore (same layout as core.xenstore.FileXenStore)
    root/             a fake / : sys/, dev/, proc/, etc/mdadm/

and they maintain root/sys and root/dev the way the kernel and udev do (laid out
like the real captures in ../shared/fixtures/kernel-6.1-raid1-iscsi/), so the code
under test reads them through HostPaths exactly as on a real host: a login creates
/sys/class/iscsi_session/sessionN with its LUNs' sdX, /dev/sdX and the by-path link;
`mdadm --build` creates /sys/block/mdN/md/dev-*/state, /dev/mdN and /dev/md/NAME.

Device nodes are real block special files (mknod, so `stat` says "block device") with
major numbers from the experimental range (240-242) so that nothing can reach a real
disk through them; md arrays get md's real major 9, but nothing ever opens them.

Only the standard library: the fakes start once per call and must be quick.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ISCSI_MAJOR = 240
LOCAL_MAJOR = 241
MD_MAJOR = 9
DEFAULT_PORT = 3260
COMMAND_TOOLS = ("iscsiadm", "mdadm")


# ---------------------------------------------------------------------------------
# the host


class FakeHost:
    def __init__(self, base: Path | str):
        self.base = Path(base)
        self.root = self.base / "root"
        self.sys = self.root / "sys"
        self.dev = self.root / "dev"
        self.proc = self.root / "proc"
        self.etc = self.root / "etc"

    # -- setup, from tests -----------------------------------------------------------

    @classmethod
    def create(cls, base: Path | str) -> FakeHost:
        host = cls(base)
        for d in (host.sys / "block", host.sys / "class" / "block", host.sys / "dev" / "block", host.dev):
            d.mkdir(parents=True, exist_ok=True)
        (host.sys / "class" / "iscsi_session").mkdir(parents=True, exist_ok=True)
        (host.proc / "self").mkdir(parents=True, exist_ok=True)
        (host.proc / "self" / "mountinfo").write_text(
            "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
        )
        (host.etc / "mdadm").mkdir(parents=True, exist_ok=True)
        (host.etc / "mdadm" / "mdadm.conf").write_text("HOMEHOST <system>\n")
        host._save(
            {
                "targets": {},
                "nodes": {},
                "sessions": {},
                "next": {"sid": 1, "host": 0, "sd": 0, "dm": 0, "md_named": 512},
                "faults": [],
            }
        )
        (host.base / "xenstore.json").write_text("{}")
        host._write_launchers()
        return host

    def enable_bitmaps(
        self, records: Path, mdadm_version: str = "mdadm - v4.2 - 2021-12-30 - Debian 4.2-5"
    ) -> None:
        """What a host with write-intent bitmaps shows: kernel 6.1, `records` on ext4, mdadm 4.2."""
        (self.proc / "sys" / "kernel" / "random").mkdir(parents=True, exist_ok=True)
        (self.proc / "sys" / "kernel" / "osrelease").write_text("6.1.0-28-amd64\n")
        (self.proc / "sys" / "kernel" / "random" / "boot_id").write_text("boot-1\n")
        with open(self.proc / "self" / "mountinfo", "a") as f:
            f.write(f"30 22 254:1 / {records} rw,relatime shared:9 - ext4 /dev/vg0/var rw\n")
        with self.locked() as state:
            state["mdadm_version"] = mdadm_version

    def enable_zram(self) -> None:
        """A kernel that has the zram module (the fake modprobe loads it)."""
        with self.locked() as state:
            state["zram"] = True

    def mounts(self) -> list[list[str]]:
        """(source, mount point, type) of each line of /proc/self/mountinfo."""
        lines = (self.proc / "self" / "mountinfo").read_text().splitlines()
        return [[f[f.index("-") + 2], f[4], f[f.index("-") + 1]] for f in map(str.split, lines)]

    def refuse_bitmaps(self) -> None:
        """The kernel refuses SET_BITMAP_FILE (e.g. built without CONFIG_MD_BITMAP_FILE)."""
        with self.locked() as state:
            state["bitmap_refused"] = True

    def _write_launchers(self) -> None:
        """bin/TOOL for each fake: this interpreter, without site (-S), so each call starts fast."""
        here = Path(__file__).resolve().parent
        bin_dir = self.base / "bin"
        bin_dir.mkdir(exist_ok=True)
        for tool in TOOLS:
            launcher = bin_dir / tool
            launcher.write_text(
                f"#!{sys.executable} -S\n"
                "import sys\n"
                f"sys.path.insert(0, {str(here)!r})\n"
                "from fakehost import tool_main\n"
                f"sys.exit(tool_main({tool!r}, sys.argv[1:]))\n"
            )
            launcher.chmod(0o755)

    def add_target(
        self,
        iqn: str,
        luns: dict[int, int] | None = None,
        portal: str = "192.0.2.10:3260",
        in_node_db: bool = True,
        replacement_timeout: int = 120,
        reachable: bool = True,
        lun_delay: float = 0.0,
        login_seconds: float = 0.0,
        settings: dict[str, str] | None = None,
    ) -> None:
        """A target offered at `portal` with LUN → size in bytes; optionally known to the node DB already."""
        luns = {1: 64 << 20} if luns is None else luns
        with self.locked() as state:
            state["targets"][iqn] = {
                "portal": _portal(portal),
                "luns": {str(k): v for k, v in luns.items()},
                "reachable": reachable,
                "lun_delay": lun_delay,
                "login_seconds": login_seconds,
            }
            if in_node_db:
                state["nodes"][iqn] = _node_record(iqn, _portal(portal), replacement_timeout, settings)

    def add_lun(self, iqn: str, lun: int, size: int) -> None:
        """A LUN mapped on the filer after login: visible after a rescan."""
        with self.locked() as state:
            state["targets"][iqn]["luns"][str(lun)] = size

    def set_target(self, iqn: str, **changes) -> None:
        with self.locked() as state:
            state["targets"][iqn].update(changes)

    def kill_target(self, iqn: str) -> None:
        """The filer dies: its session goes FAILED and its disks blocked, as on the real kernel."""
        with self.locked() as state:
            state["targets"][iqn]["reachable"] = False
            session = state["sessions"].get(iqn)
            if session:
                self._session_state(session, "FAILED", "blocked")

    def revive_target(self, iqn: str) -> None:
        with self.locked() as state:
            state["targets"][iqn]["reachable"] = True
            session = state["sessions"].get(iqn)
            if session:
                self._session_state(session, "LOGGED_IN", "running")

    def add_local_device(self, name: str, size: int = 64 << 20) -> str:
        """An LVM volume: /dev/NAME -> ../dm-N (or ../../dm-N) with its sysfs. Returns the path for the tab."""
        with self.locked() as state:
            number = state["next"]["dm"]
            state["next"]["dm"] += 1
        kname = f"dm-{number}"
        device_dir = self.sys / "devices" / "virtual" / "block" / kname
        self._mk_block(kname, LOCAL_MAJOR, number, size, device_dir)
        link = self.dev / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(self.dev / kname, link.parent), link)
        return str(link)

    def mount(self, device_path: str, mountpoint: str) -> None:
        st = os.stat(device_path)
        with open(self.proc / "self" / "mountinfo", "a") as f:
            f.write(
                f"99 22 {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} / {mountpoint} rw - ext4 {device_path} rw\n"
            )

    def enable_md_names(self) -> None:
        """What README's install step does: CREATE names=yes in mdadm's drop-in directory."""
        conf_d = self.etc / "mdadm" / "mdadm.conf.d"
        conf_d.mkdir(parents=True, exist_ok=True)
        (conf_d / "iscsimple.conf").write_text("CREATE names=yes\n")

    def add_fault(
        self,
        tool: str,
        match: tuple[str, ...] = (),
        skip: int = 0,
        times: int = 1,
        action: str = "fail",
        rc: int = 1,
        stderr: str = "",
        seconds: float = 3600,
    ) -> None:
        """Make the (skip+1)th call of `tool` whose argv contains every `match` string misbehave.

        tool "*" counts iscsiadm and mdadm calls together (step N of an add). Actions:
        fail (print stderr, exit rc), hang (sleep `seconds`, then exit rc),
        effect_then_hang (do the real thing, then hang: a command that timed out late).
        """
        with self.locked() as state:
            state["faults"].append(
                {
                    "tool": tool,
                    "match": list(match),
                    "skip": skip,
                    "times": times,
                    "action": action,
                    "rc": rc,
                    "stderr": stderr or f"{tool}: injected failure",
                    "seconds": seconds,
                    "seen": 0,
                    "fired": 0,
                }
            )

    def clear_faults(self) -> None:
        with self.locked() as state:
            state["faults"] = []

    # -- inspection, from tests ---------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for code under test: fakes first on PATH, HostPaths pointed at the fake root."""
        return {
            "PATH": f"{self.base / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "ISCSIMPLE_FAKE_HOST": str(self.base),
            "ISCSIMPLE_SYSFS": str(self.sys),
            "ISCSIMPLE_DEVFS": str(self.dev),
            "ISCSIMPLE_PROCFS": str(self.proc),
            "ISCSIMPLE_STATE": str(self.base / "run-iscsimple"),
            "ISCSIMPLE_RECORDS": str(self.base / "var-lib-iscsimple"),
            "ISCSIMPLE_LOCKS": str(self.base / "run-xen-hotplug"),
            "ISCSIMPLE_CONFIG": str(self.base / "iscsimple.toml"),
            "ISCSIMPLE_TAB": str(self.base / "block-iscsimple-tab.conf"),
            "ISCSIMPLE_NO_SYSLOG": "1",
        }

    def calls(self, tools: tuple[str, ...] | None = None) -> list[list[str]]:
        """argv of every call so far (argv[0] = tool name), in order."""
        return [[c["tool"], *c["argv"]] for c in self.call_records() if tools is None or c["tool"] in tools]

    def call_records(self) -> list[dict]:
        try:
            lines = (self.base / "calls.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def commands(self) -> list[list[str]]:
        """iscsiadm and mdadm calls only."""
        return self.calls(COMMAND_TOOLS)

    def state(self) -> dict:
        return json.loads((self.base / "state.json").read_text())

    def xenstore(self) -> dict[str, str]:
        return json.loads((self.base / "xenstore.json").read_text() or "{}")

    def xenstore_write(self, key: str, value: str) -> None:
        with _flock(self.base / "xenstore.json.lock"):
            data = self.xenstore()
            data[_xs_key(key)] = value
            _write_json(self.base / "xenstore.json", data)

    def md_arrays(self) -> dict[str, dict]:
        """Running md arrays: kernel name → {state, members: {name: state}}."""
        arrays = {}
        for entry in sorted(os.listdir(self.sys / "block")):
            md = self.sys / "block" / entry / "md"
            if entry.startswith("md") and md.is_dir():
                members = {
                    m[4:]: (md / m / "state").read_text().strip()
                    for m in os.listdir(md)
                    if m.startswith("dev-")
                }
                arrays[entry] = {"state": (md / "array_state").read_text().strip(), "members": members}
        return arrays

    def session_targets(self) -> list[str]:
        return sorted(self.state()["sessions"])

    # -- state ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        with _flock(self.base / "state.lock"):
            state = json.loads((self.base / "state.json").read_text())
            try:
                yield state
            finally:
                self._save(state)  # the tree may have changed already: keep state.json in step

    def _save(self, state: dict) -> None:
        _write_json(self.base / "state.json", state)

    def log_call(self, tool: str, argv: list[str], fault: str | None) -> None:
        record = {"tool": tool, "argv": argv, "pid": os.getpid(), "t": time.time(), "fault": fault}
        with _flock(self.base / "calls.lock"), open(self.base / "calls.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def take_fault(self, tool: str, argv: list[str]) -> dict | None:
        """The fault this call triggers, if any (counts the call against every matching rule)."""
        text = " ".join(argv)
        with self.locked() as state:
            for rule in state["faults"]:
                applies = rule["tool"] == tool or (rule["tool"] == "*" and tool in COMMAND_TOOLS)
                if not applies or not all(m in text for m in rule["match"]):
                    continue
                rule["seen"] += 1
                if rule["seen"] > rule["skip"] and rule["fired"] < rule["times"]:
                    rule["fired"] += 1
                    return dict(rule)
        return None

    # -- kernel: block devices -------------------------------------------------------------

    def _mk_block(self, kname: str, major: int, minor: int, size: int, device_dir: Path) -> None:
        device_dir.mkdir(parents=True, exist_ok=True)
        (device_dir / "dev").write_text(f"{major}:{minor}\n")
        (device_dir / "size").write_text(f"{size // 512}\n")
        (device_dir / "holders").mkdir(exist_ok=True)
        for link in (
            self.sys / "block" / kname,
            self.sys / "class" / "block" / kname,
            self.sys / "dev" / "block" / f"{major}:{minor}",
        ):
            _relink(link, device_dir)
        node = self.dev / kname
        with contextlib.suppress(FileNotFoundError):
            node.unlink()
        os.mknod(node, 0o600 | 0o060000, os.makedev(major, minor))

    def _rm_block(self, kname: str) -> None:
        block_link = self.sys / "block" / kname
        if not os.path.lexists(block_link):
            return
        device_dir = Path(os.path.realpath(block_link))
        dev = (device_dir / "dev").read_text().strip()
        for link in (block_link, self.sys / "class" / "block" / kname, self.sys / "dev" / "block" / dev):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
        shutil.rmtree(device_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.dev / kname).unlink()

    def block_dir(self, kname: str) -> Path:
        return Path(os.path.realpath(self.sys / "class" / "block" / kname))

    def kname_of(self, path: str) -> str | None:
        """Kernel name of the block device at `path`, through its major:minor as the kernel would."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        link = self.sys / "dev" / "block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return os.path.basename(os.path.realpath(link)) if os.path.lexists(link) else None

    # -- kernel: iSCSI sessions --------------------------------------------------------------

    def _session_dir(self, session: dict) -> Path:
        return self.sys / "devices" / "platform" / f"host{session['host']}" / f"session{session['sid']}"

    def _create_session(self, state: dict, iqn: str, portal: str, replacement_timeout: int) -> dict:
        sid, host = state["next"]["sid"], state["next"]["host"]
        state["next"]["sid"] += 1
        state["next"]["host"] += 1
        session = {"sid": sid, "host": host, "portal": portal, "target": iqn, "luns": {}}
        sdir = self._session_dir(session)
        attrs = sdir / "iscsi_session" / f"session{sid}"
        attrs.mkdir(parents=True)
        for name, value in (
            ("targetname", iqn),
            ("tpgt", "1"),
            ("state", "LOGGED_IN"),
            ("recovery_tmo", str(replacement_timeout)),
        ):
            (attrs / name).write_text(value + "\n")
        conn = sdir / f"connection{sid}:0" / "iscsi_connection" / f"connection{sid}:0"
        conn.mkdir(parents=True)
        address, _, port = portal.rpartition(":")
        (conn / "persistent_address").write_text(address.strip("[]") + "\n")
        (conn / "persistent_port").write_text(port + "\n")
        (conn / "state").write_text("up\n")
        _relink(self.sys / "class" / "iscsi_session" / f"session{sid}", attrs)
        state["sessions"][iqn] = session
        return session

    def _add_session_luns(self, state: dict, session: dict) -> None:
        target = state["targets"][session["target"]]
        for lun, size in sorted(target["luns"].items(), key=lambda kv: int(kv[0])):
            if lun in session["luns"]:
                continue
            number = state["next"]["sd"]
            state["next"]["sd"] += 1
            kname = "sd" + _disk_letters(number)
            host = session["host"]
            lun_dir = self._session_dir(session) / f"target{host}:0:0" / f"{host}:0:0:{lun}"
            lun_dir.mkdir(parents=True)
            (lun_dir / "state").write_text("running\n")
            self._mk_block(kname, ISCSI_MAJOR, number, size, lun_dir / "block" / kname)
            by_path = self.dev / "disk" / "by-path"
            by_path.mkdir(parents=True, exist_ok=True)
            _relink(by_path / f"ip-{session['portal']}-iscsi-{session['target']}-lun-{lun}", self.dev / kname)
            session["luns"][lun] = kname

    def _remove_session(self, state: dict, iqn: str) -> dict:
        session = state["sessions"].pop(iqn)
        for lun, kname in session["luns"].items():
            self._rm_block(kname)
            with contextlib.suppress(FileNotFoundError):
                (self.dev / "disk" / "by-path" / f"ip-{session['portal']}-iscsi-{iqn}-lun-{lun}").unlink()
        (self.sys / "class" / "iscsi_session" / f"session{session['sid']}").unlink()
        shutil.rmtree(self._session_dir(session))
        return session

    def _session_state(self, session: dict, state: str, scsi_state: str) -> None:
        sdir = self._session_dir(session)
        (sdir / "iscsi_session" / f"session{session['sid']}" / "state").write_text(state + "\n")
        host = session["host"]
        for lun in session["luns"]:
            (sdir / f"target{host}:0:0" / f"{host}:0:0:{lun}" / "state").write_text(scsi_state + "\n")

    # -- kernel: md ---------------------------------------------------------------------------

    def md_names_enabled(self) -> bool:
        """mdadm's CREATE names=yes, from mdadm.conf and mdadm.conf.d/*.conf as mdadm reads them."""
        files = [self.etc / "mdadm" / "mdadm.conf"]
        conf_d = self.etc / "mdadm" / "mdadm.conf.d"
        if conf_d.is_dir():
            files += sorted(
                p for p in conf_d.iterdir() if p.name.endswith(".conf") and not p.name.startswith(".")
            )
        for path in files:
            with contextlib.suppress(OSError):
                for line in path.read_text().splitlines():
                    words = line.split("#", 1)[0].split()
                    if words and words[0] == "CREATE" and "names=yes" in words[1:]:
                        return True
        return False

    def build_array(self, name: str, devices: list[str | None]) -> str:
        """An array /dev/md/NAME as `mdadm --build` makes it (for setting up a host); its kernel name."""
        return self.build_arrays([name], devices)[0]

    def build_arrays(self, names: list[str], devices: list[str | None]) -> list[str]:
        """Several arrays at once (one lock): the other arrays of a busy host."""
        built = []
        with self.locked() as state:
            members = [(self.kname_of(d) if d else None, False) for d in devices]
            for name in names:
                mdname = self._build_md(state, name, members)
                if mdname is None:
                    raise RuntimeError("no free md number")
                built.append(mdname)
        return built

    def _build_md(self, state: dict, name: str, members: list[tuple[str | None, bool]]) -> str | None:
        """mdadm 4.2's naming (mdopen.c create_mddev): md_NAME with names=yes, else a free number."""
        mdname = None
        if self.md_names_enabled() and not os.path.lexists(self.sys / "block" / f"md_{name}"):
            mdname = f"md_{name}"
            minor = state["next"]["md_named"]
            state["next"]["md_named"] += 1
        if mdname is None:
            number = self._free_md_number()
            if number is None:
                return None
            mdname, minor = f"md{number}", number
        self._create_md(state, mdname, minor, members)
        _relink(self.dev / "md" / name, self.dev / mdname)
        return mdname

    def _md_dir(self, mdname: str) -> Path:
        return self.sys / "devices" / "virtual" / "block" / mdname

    def _create_md(
        self, state: dict, mdname: str, minor: int, members: list[tuple[str | None, bool]]
    ) -> None:
        sizes = [int((self.block_dir(k) / "size").read_text()) for k, _ in members if k]
        sectors = min(sizes) if sizes else 131072
        device_dir = self._md_dir(mdname)
        self._mk_block(mdname, MD_MAJOR, minor, sectors * 512, device_dir)
        md = device_dir / "md"
        md.mkdir()
        missing = sum(1 for k, _ in members if k is None)
        for name, value in (
            ("array_state", "read-auto"),  # a new array, until its first write
            ("level", "raid1"),
            ("metadata_version", "none"),
            ("raid_disks", str(len(members))),
            ("degraded", str(missing)),
            ("sync_action", "idle"),
            ("last_sync_action", "idle"),
            ("sync_completed", "none"),
            ("sync_speed", "none"),
            ("component_size", str(sectors // 2)),
            ("chunk_size", "0"),
        ):
            (md / name).write_text(value + "\n")
        for slot, (kname, write_mostly) in enumerate(members):
            if kname is not None:
                flags = "in_sync,write_mostly" if write_mostly else "in_sync"
                self._add_member(mdname, kname, slot, flags, recovery_start="none")

    def _add_member(self, mdname: str, kname: str, slot: int | None, flags: str, recovery_start: str) -> None:
        md = self._md_dir(mdname) / "md"
        member = md / f"dev-{kname}"
        member.mkdir()
        (member / "slot").write_text(("none" if slot is None else str(slot)) + "\n")
        (member / "state").write_text(flags + "\n")
        (member / "errors").write_text("0\n")
        (member / "recovery_start").write_text(recovery_start + "\n")
        _relink(member / "block", self.block_dir(kname))
        if slot is not None:
            _relink(md / f"rd{slot}", member)
        _relink(self.block_dir(kname) / "holders" / mdname, self._md_dir(mdname))

    def _remove_md(self, mdname: str) -> None:
        md = self._md_dir(mdname) / "md"
        for member in md.glob("dev-*"):
            with contextlib.suppress(FileNotFoundError):
                (self.block_dir(member.name[4:]) / "holders" / mdname).unlink()
        self._rm_block(mdname)
        links = self.dev / "md"
        if links.is_dir():
            for link in links.iterdir():
                if os.path.basename(os.readlink(link)) == mdname:
                    link.unlink()

    def _free_md_number(self) -> int | None:
        # mdadm 4.2 find_free_devnm(): 127 down to 0, then 511 down to 128.
        for number in [*range(127, -1, -1), *range(511, 127, -1)]:
            if not os.path.lexists(self.sys / "block" / f"md{number}"):
                return number
        return None

    def resolve_md(self, path: str) -> str | None:
        """md kernel name behind a /dev/md/NAME or /dev/mdN path."""
        kname = self.kname_of(path)
        if kname and (self.sys / "block" / kname / "md").is_dir():
            return kname
        return None


# ---------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _relink(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.symlink(os.path.relpath(target, link.parent), link)


def _portal(portal: str) -> str:
    host, sep, port = portal.rpartition(":")
    if sep and port.isdigit() and (not host.count(":") or host.endswith("]")):
        return portal
    return f"{portal}:{DEFAULT_PORT}"


def _disk_letters(number: int) -> str:
    letters = ""
    number += 1
    while number:
        number, rest = divmod(number - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def _node_record(iqn: str, portal: str, replacement_timeout: int, settings: dict | None = None) -> dict:
    """A node record with open-iscsi's defaults (iscsid.conf) where it matters to us."""
    return {
        "portal": portal,
        "settings": {
            "node.session.timeo.replacement_timeout": str(replacement_timeout),
            "node.conn[0].timeo.login_timeout": "15",
            "node.session.initial_login_retry_max": "8",
            **(settings or {}),
        },
    }


def _xs_key(key: str) -> str:
    # Relative xenstore paths are relative to the caller's domain: dom0.
    return key if key.startswith("/") else f"/local/domain/0/{key}"


# ---------------------------------------------------------------------------------
# the tools


class _Exit(Exception):
    def __init__(self, rc: int, stderr: str = "", stdout: str = ""):
        self.rc, self.stderr, self.stdout = rc, stderr, stdout


def tool_main(tool: str, argv: list[str]) -> int:
    host = FakeHost(os.environ["ISCSIMPLE_FAKE_HOST"])
    fault = host.take_fault(tool, argv)
    host.log_call(tool, argv, fault["action"] if fault else None)
    if fault and fault["action"] in ("fail", "hang"):
        if fault["action"] == "hang":
            time.sleep(fault["seconds"])
        sys.stderr.write(fault["stderr"].rstrip("\n") + "\n")
        return fault["rc"]
    try:
        rc = TOOLS[tool](host, argv)
        out = err = ""
    except _Exit as e:
        rc, out, err = e.rc, e.stdout, e.stderr
    if out:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
    if err:
        sys.stderr.write(err if err.endswith("\n") else err + "\n")
    if fault and fault["action"] == "effect_then_hang":
        sys.stdout.flush()
        time.sleep(fault["seconds"])
        return fault["rc"]
    return rc


# -- iscsiadm ---------------------------------------------------------------------------

_ISCSIADM_OPTS = {
    "-m": "mode", "--mode": "mode", "-T": "target", "--targetname": "target", "-p": "portal",
    "--portal": "portal", "-t": "type", "--type": "type", "-o": "op", "--op": "op", "-n": "name",
    "--name": "name", "-v": "value", "--value": "value", "-r": "sid", "--sid": "sid",
    "-I": "iface", "--interface": "iface",
}  # fmt: skip
_ISCSIADM_FLAGS = {
    "-l": "login",
    "--login": "login",
    "-u": "logout",
    "--logout": "logout",
    "-R": "rescan",
    "--rescan": "rescan",
}


def iscsiadm(host: FakeHost, argv: list[str]) -> int:
    opts: dict[str, str] = {}
    flags: set[str] = set()
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in _ISCSIADM_OPTS:
            if not args:
                raise _Exit(7, f"iscsiadm: option '{a}' requires an argument")
            opts[_ISCSIADM_OPTS[a]] = args.pop(0)
        elif a in _ISCSIADM_FLAGS:
            flags.add(_ISCSIADM_FLAGS[a])
        else:
            raise _Exit(7, f"iscsiadm: unrecognized option '{a}'")
    mode = opts.get("mode")
    if mode == "node":
        return _iscsiadm_node(host, opts, flags)
    if mode in ("discovery", "discoverydb"):
        return _iscsiadm_discovery(host, opts)
    if mode == "session":
        return _iscsiadm_session(host, opts, flags)
    raise _Exit(7, f"iscsiadm: mode {mode!r} is not supported by the fake")


def _iscsiadm_node(host: FakeHost, opts: dict[str, str], flags: set[str]) -> int:
    iqn = opts.get("target")
    portal = _portal(opts["portal"]) if "portal" in opts else None
    if "login" in flags:
        return _iscsiadm_login(host, iqn, portal)
    if "logout" in flags:
        return _iscsiadm_logout(host, iqn, portal)
    with host.locked() as state:
        nodes = {
            t: n for t, n in state["nodes"].items() if iqn in (None, t) and portal in (None, n["portal"])
        }
        if not nodes:
            raise _Exit(21, "iscsiadm: No records found")
        if opts.get("op") == "update":
            for node in nodes.values():
                node["settings"][opts["name"]] = opts["value"]
            return 0
        if opts.get("op"):
            raise _Exit(7, f"iscsiadm: op {opts['op']} is not supported by the fake")
        if iqn is None:
            raise _Exit(0, stdout="\n".join(f"{n['portal']},1 {t}" for t, n in sorted(nodes.items())))
        out = []
        for t, n in nodes.items():
            address, _, port = n["portal"].rpartition(":")
            out += ["# BEGIN RECORD 2.1.8", f"node.name = {t}", "node.tpgt = 1", "node.startup = manual"]
            out += [f"{k} = {v}" for k, v in sorted(n["settings"].items())]
            out += [
                f"node.conn[0].address = {address.strip('[]')}",
                f"node.conn[0].port = {port}",
                "# END RECORD",
            ]
        raise _Exit(0, stdout="\n".join(out))


def _iscsiadm_login(host: FakeHost, iqn: str | None, portal: str | None) -> int:
    with host.locked() as state:
        node = state["nodes"].get(iqn or "")
        if node is None or portal not in (None, node["portal"]):
            raise _Exit(21, "iscsiadm: No records found")
        portal = node["portal"]
        where = f"[iface: default, target: {iqn}, portal: {portal.replace(':', ',')}]"
        if iqn in state["sessions"]:
            raise _Exit(15, "iscsiadm: default: 1 session requested, but 1 already present.")
        target = state["targets"].get(iqn)
        delay = target["login_seconds"] if target else 0
    if delay:
        time.sleep(delay)
    with host.locked() as state:
        target = state["targets"].get(iqn)
        if target is None or not target["reachable"] or target["portal"] != portal:
            raise _Exit(
                8,
                f"iscsiadm: Could not login to {where}.\n"
                "iscsiadm: initiator reported error (8 - connection timed out)\n"
                "iscsiadm: Could not log into all portals",
                f"Logging in to {where}",
            )
        timeout = int(state["nodes"][iqn]["settings"].get("node.session.timeo.replacement_timeout", "120"))
        session = host._create_session(state, iqn, portal, timeout)
        if not target["lun_delay"]:
            host._add_session_luns(state, session)
        else:
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "late-luns",
                    str(host.base),
                    iqn,
                    str(target["lun_delay"]),
                ],
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    raise _Exit(0, stdout=f"Logging in to {where}\nLogin to {where} successful.")


def _iscsiadm_logout(host: FakeHost, iqn: str | None, portal: str | None) -> int:
    with host.locked() as state:
        session = state["sessions"].get(iqn or "")
        if session is None or portal not in (None, session["portal"]):
            raise _Exit(21, "iscsiadm: No matching sessions found")
        host._remove_session(state, iqn)  # type: ignore[arg-type]
    where = f"[sid: {session['sid']}, target: {iqn}, portal: {session['portal'].replace(':', ',')}]"
    raise _Exit(0, stdout=f"Logging out of session {where}\nLogout of {where} successful.")


def _iscsiadm_discovery(host: FakeHost, opts: dict[str, str]) -> int:
    if opts.get("type") not in ("st", "sendtargets"):
        raise _Exit(7, "iscsiadm: the fake knows sendtargets discovery only")
    portal = _portal(opts["portal"])
    with host.locked() as state:
        offered = {t: v for t, v in state["targets"].items() if v["portal"] == portal and v["reachable"]}
        if not offered:
            raise _Exit(
                4,
                f"iscsiadm: cannot make connection to {portal.rpartition(':')[0]}: Connection refused\n"
                "iscsiadm: Could not perform SendTargets discovery: encountered connection failure",
            )
        for iqn in offered:
            if iqn not in state["nodes"] or opts.get("op") != "new":
                state["nodes"][iqn] = _node_record(iqn, portal, 120)
    raise _Exit(0, stdout="\n".join(f"{portal},1 {iqn}" for iqn in sorted(offered)))


def _iscsiadm_session(host: FakeHost, opts: dict[str, str], flags: set[str]) -> int:
    with host.locked() as state:
        sessions = list(state["sessions"].values())
        if "rescan" in flags:
            matching = [s for s in sessions if str(s["sid"]) == opts.get("sid")]
            if not matching:
                raise _Exit(21, "iscsiadm: No session found.")
            host._add_session_luns(state, matching[0])
            raise _Exit(0, stdout=f"Rescanning session [sid: {opts['sid']}]")
        if not sessions:
            raise _Exit(21, "iscsiadm: No active sessions.")
        raise _Exit(
            0,
            stdout="\n".join(
                f"tcp: [{s['sid']}] {s['portal']},1 {s['target']} (non-flash)" for s in sessions
            ),
        )


def _late_luns(base: str, iqn: str, delay: str) -> None:
    time.sleep(float(delay))
    host = FakeHost(base)
    with host.locked() as state:
        if iqn in state["sessions"]:
            host._add_session_luns(state, state["sessions"][iqn])


# -- mdadm -------------------------------------------------------------------------------


def mdadm(host: FakeHost, argv: list[str]) -> int:
    if not argv:
        raise _Exit(2, "mdadm: no arguments")
    if argv == ["--version"]:
        version = host.state().get("mdadm_version")
        if version is None:
            raise _Exit(2, "mdadm: the fake has no version (FakeHost.enable_bitmaps sets one)")
        raise _Exit(0, version)
    if argv[0] == "--build":
        return _mdadm_build(host, argv[1:])
    if argv[0] in ("--stop", "-S"):
        return _mdadm_stop(host, argv[1:])
    if len(argv) >= 3 and argv[1] in ("--add", "-a", "--fail", "-f", "--remove", "-r"):
        return _mdadm_manage(host, argv[0], argv[1:])
    raise _Exit(2, f"mdadm: the fake does not know {' '.join(argv)}")


def _parse_devices(args: list[str]) -> tuple[dict[str, str], list[tuple[str, bool]]]:
    options: dict[str, str] = {}
    devices: list[tuple[str, bool]] = []
    write_mostly = False
    for a in args:
        if a in ("--write-mostly", "-W"):
            write_mostly = True  # applies to the devices that follow, as in mdadm
        elif a in ("--readwrite", "-R"):
            write_mostly = False
        elif a.startswith("--") and "=" in a:
            key, value = a[2:].split("=", 1)
            options[key] = value
        elif a.startswith("-"):
            raise _Exit(2, f"mdadm: the fake does not know option {a}")
        else:
            devices.append((a, write_mostly))
    return options, devices


def _check_member(host: FakeHost, path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise _Exit(1, f"mdadm: Cannot find {path}: {e.strerror}") from None
    if not (st.st_mode & 0o170000) == 0o060000:
        raise _Exit(1, f"mdadm: {path} is not a block device.")
    kname = host.kname_of(path)
    if kname is None:
        raise _Exit(1, f"mdadm: Cannot open {path}: No such device or address")
    if os.listdir(host.block_dir(kname) / "holders"):
        raise _Exit(1, f"mdadm: Cannot open {path}: Device or resource busy")
    return kname


def _mdadm_build(host: FakeHost, args: list[str]) -> int:
    if not args or args[0].startswith("-"):
        raise _Exit(2, "mdadm: an md device must be given in build mode")
    md_path, rest = args[0], args[1:]
    options, devices = _parse_devices(rest)
    if options.get("level") not in ("1", "raid1", "mirror"):
        raise _Exit(2, "mdadm: the fake builds raid1 only")
    if int(options.get("raid-devices", "0")) != len(devices):
        raise _Exit(
            2, f"mdadm: requested {options.get('raid-devices')} devices in array but listed {len(devices)}"
        )
    dev_md = host.dev / "md"
    if not md_path.startswith(str(dev_md) + "/"):
        raise _Exit(1, f"mdadm: the fake expects /dev/md/NAME, got {md_path}")
    name = md_path[len(str(dev_md)) + 1 :]
    members = []
    for path, write_mostly in devices:
        members.append((None if path == "missing" else _check_member(host, path), write_mostly))
    if "bitmap" in options:
        _bitmap_file(host, md_path, options)
    with host.locked() as state:
        if host._build_md(state, name, members) is None:
            raise _Exit(1, "mdadm: No avail md devices - aborting")
    raise _Exit(0, f"mdadm: array {md_path} built and started.")


def _bitmap_file(host: FakeHost, md_path: str, options: dict[str, str]) -> None:
    """mdadm 4.2's CreateBitmap (bitmap.c): a 256-byte header, then every bit set; or the kernel's refusal."""
    if host.state().get("bitmap_refused"):
        raise _Exit(1, f"mdadm: Cannot set bitmap file for {md_path}: Invalid argument")
    chunk = int(options.get("bitmap-chunk", "4K").rstrip("K")) * 1024
    sectors = 64 << 11  # what the fake's arrays report
    header = bytearray(256)
    struct.pack_into("<II", header, 0, 0x6D746962, 4)
    struct.pack_into("<Q", header, 40, sectors)
    struct.pack_into("<IIII", header, 48, 0, chunk, 5, 0)
    bits = b"\xff" * -(-(sectors * 512 // chunk) // 8)
    Path(options["bitmap"]).write_bytes(bytes(header) + bits)


def _mdadm_stop(host: FakeHost, args: list[str]) -> int:
    if len(args) != 1:
        raise _Exit(2, "mdadm: the fake stops one array at a time")
    with host.locked():
        mdname = host.resolve_md(args[0])
        if mdname is None:
            raise _Exit(1, f"mdadm: error opening {args[0]}: No such file or directory")
        host._remove_md(mdname)
    raise _Exit(0, f"mdadm: stopped {args[0]}")


def _mdadm_manage(host: FakeHost, md_path: str, args: list[str]) -> int:
    with host.locked():
        mdname = host.resolve_md(md_path)
        if mdname is None:
            raise _Exit(1, f"mdadm: error opening {md_path}: No such file or directory")
        md = host._md_dir(mdname) / "md"
        action = args[0]
        _, devices = _parse_devices(args[1:])
        messages = []
        for path, write_mostly in devices:
            if action in ("--add", "-a"):
                kname = _check_member(host, path)
                used = {
                    int((m / "slot").read_text())
                    for m in md.glob("dev-*")
                    if (m / "slot").read_text().strip() != "none"
                }
                slot = next(s for s in range(int((md / "raid_disks").read_text())) if s not in used)
                flags = "spare,write_mostly" if write_mostly else "spare"
                host._add_member(mdname, kname, slot, flags, recovery_start="0")
                (md / "sync_action").write_text("recover\n")
                sectors = int((md / "component_size").read_text()) * 2
                (md / "sync_completed").write_text(f"0 / {sectors}\n")
                (md / "array_state").write_text("clean\n")
                messages.append(f"mdadm: added {path}")
            else:
                kname = host.kname_of(path) or ""
                member = md / f"dev-{kname}"
                if not member.is_dir():
                    raise _Exit(1, f"mdadm: {path} is not a member of {md_path}")
                if action in ("--fail", "-f"):
                    (member / "state").write_text("faulty\n")
                    messages.append(f"mdadm: set {path} faulty in {md_path}")
                else:
                    shutil.rmtree(member)
                    with contextlib.suppress(FileNotFoundError):
                        (host.block_dir(kname) / "holders" / mdname).unlink()
                    messages.append(f"mdadm: hot removed {path} from {md_path}")
    raise _Exit(0, "\n".join(messages))


# -- xenstore ------------------------------------------------------------------------------


def xenstore_read(host: FakeHost, argv: list[str]) -> int:
    data = host.xenstore()
    out = []
    for key in argv:
        if _xs_key(key) not in data:
            raise _Exit(1, f"xenstore-read: couldn't read path {key}", "\n".join(out))
        out.append(data[_xs_key(key)])
    raise _Exit(0, stdout="\n".join(out))


def xenstore_write(host: FakeHost, argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        raise _Exit(1, "Usage: xenstore-write [-h] [-s] [-R] [-r] [-t] key value [...]")
    with _flock(host.base / "xenstore.json.lock"):
        data = host.xenstore()
        for key, value in zip(argv[::2], argv[1::2], strict=True):
            data[_xs_key(key)] = value
        _write_json(host.base / "xenstore.json", data)
    return 0


def xenstore_rm(host: FakeHost, argv: list[str]) -> int:
    with _flock(host.base / "xenstore.json.lock"):
        data = host.xenstore()
        for key in argv:
            k = _xs_key(key)
            if k not in data and not any(x.startswith(k + "/") for x in data):
                raise _Exit(1, f"xenstore-rm: could not remove path {key}")
            data = {x: v for x, v in data.items() if x != k and not x.startswith(k + "/")}
        _write_json(host.base / "xenstore.json", data)
    return 0


# -- the RAM store's commands: modprobe zram, mkfs.ext4, mount, umount -------------------------

ZRAM_MAJOR = 242


def modprobe(host: FakeHost, argv: list[str]) -> int:
    """zram when the host has it: zram-control, whose hot_add (a plain file here) names zram0, made
    ready as the kernel's hot_add would."""
    if argv[:1] != ["zram"] or not host.state().get("zram"):
        raise _Exit(
            1,
            f"modprobe: FATAL: Module {argv[0] if argv else '?'} not found in directory /lib/modules/6.1.0-28-amd64",
        )
    control = host.sys / "class" / "zram-control"
    control.mkdir(parents=True, exist_ok=True)
    (control / "hot_add").write_text("0\n")
    (control / "hot_remove").write_text("")
    device_dir = host.sys / "devices" / "virtual" / "block" / "zram0"
    host._mk_block("zram0", ZRAM_MAJOR, 0, 0, device_dir)
    for attr in ("disksize", "reset"):
        (device_dir / attr).write_text("0\n")
    return 0


def mkfs_ext4(host: FakeHost, argv: list[str]) -> int:
    if not argv or host.kname_of(argv[-1]) is None:
        raise _Exit(1, "mkfs.ext4: No such file or directory while trying to determine filesystem size")
    return 0


def mount(host: FakeHost, argv: list[str]) -> int:
    device, target = argv[-2], argv[-1]
    fstype = argv[argv.index("-t") + 1] if "-t" in argv else "ext4"
    if not Path(target).is_dir():
        raise _Exit(32, f"mount: {target}: mount point does not exist.")
    dev = os.stat(device).st_rdev
    with open(host.proc / "self" / "mountinfo", "a") as f:
        f.write(
            f"40 22 {os.major(dev)}:{os.minor(dev)} / {target} rw,nosuid,nodev,noexec,noatime - {fstype} {device} rw\n"
        )
    return 0


def umount(host: FakeHost, argv: list[str]) -> int:
    mountinfo = host.proc / "self" / "mountinfo"
    lines = mountinfo.read_text().splitlines(keepends=True)
    keep = [line for line in lines if line.split()[4] != argv[-1]]
    if len(keep) == len(lines):
        raise _Exit(32, f"umount: {argv[-1]}: not mounted.")
    mountinfo.write_text("".join(keep))
    return 0


TOOLS = {
    "iscsiadm": iscsiadm,
    "mdadm": mdadm,
    "modprobe": modprobe,
    "mkfs.ext4": mkfs_ext4,
    "mount": mount,
    "umount": umount,
    "xenstore-read": xenstore_read,
    "xenstore-write": xenstore_write,
    "xenstore-rm": xenstore_rm,
}


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "late-luns":
        _late_luns(*sys.argv[2:])
