"""Run a command the way systemd would run it under a unit's file-system and capability
sandbox, in the test guest (which has no systemd: its PID 1 is tests/vm/guest_agent.py).

    python3 unit_sandbox.py UNIT [--command ARG...] [-- EXTRA ARGS]

Reads the installed unit and applies what decides where the service may write, with the
same kernel mechanisms systemd uses for them (src/core/namespace.c, execute.c):

- a private mount namespace (`unshare --mount --propagation private`);
- `StateDirectory=`: /var/lib/NAME created with `StateDirectoryMode=` and writable;
- `ProtectSystem=strict`: every mount read-only (`mount -o remount,bind,ro`) except /proc,
  /sys and /dev, and the `ReadWritePaths=` bound writable over it (a missing path without
  `-` fails, as systemd fails the unit with 226/NAMESPACE);
- `PrivateTmp=yes`: fresh /tmp and /var/tmp; `ProtectHome=yes`: /home, /root, /run/user
  inaccessible;
- `CapabilityBoundingSet=` and `NoNewPrivileges=` with setpriv(1), so root keeps only those
  capabilities across exec;
- `EnvironmentFile=` and `ExecStart=` with `$VAR` words expanded as systemd splits them.

Not applied (no effect on what may be written, and they need systemd's seccomp/BPF code):
SystemCallFilter, DeviceAllow (cgroup device policy), RestrictAddressFamilies, ProtectKernel*,
ProtectClock, ProtectHostname, LockPersonality, RestrictNamespaces/Realtime/SUIDSGID, UMask.
`--command` runs something else in the same sandbox (the test probes it with that).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

INSIDE = "ISCSIMPLE_UNIT_SANDBOX_INSIDE"
API_FILESYSTEMS = ("/proc", "/sys", "/dev")


def directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = None
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def environment(d: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in d.get("EnvironmentFile", []):
        optional = entry.startswith("-")
        path = Path(entry.lstrip("-"))
        if not path.exists():
            if optional:
                continue
            sys.exit(f"unit_sandbox: EnvironmentFile {path} missing")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                words = shlex.split(value)
                env[key.strip()] = words[0] if words else ""
    return env


def exec_start(d: dict[str, list[str]], env: dict[str, str]) -> list[str]:
    [command] = d["ExecStart"]
    argv: list[str] = []
    for word in shlex.split(command):
        if word.startswith("$") and not word.startswith("${"):
            argv += env.get(word[1:], "").split()  # $VAR: split at white space
        else:
            argv.append(word)
    return argv


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, timeout=30)


def mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        points.append(point)
    return points


def under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def sandbox(d: dict[str, list[str]]) -> None:
    if d.get("ProtectSystem") != ["strict"]:
        sys.exit(f"unit_sandbox: only ProtectSystem=strict is emulated, not {d.get('ProtectSystem')}")
    writable: list[str] = []
    for name in d.get("StateDirectory", []):
        state = Path("/var/lib") / name
        state.mkdir(parents=True, exist_ok=True)
        state.chmod(int(d.get("StateDirectoryMode", ["0755"])[0], 8))
        writable.append(str(state))
    for entry in d.get("ReadWritePaths", []):
        for path in entry.split():
            optional = path.startswith("-")
            path = path.lstrip("-")
            if not os.path.exists(path):
                if optional:
                    continue
                sys.exit(f"unit_sandbox: ReadWritePaths={path} does not exist (systemd: 226/NAMESPACE)")
            writable.append(os.path.realpath(path))
    for path in writable:
        mount("--bind", path, path)
    for point in mount_points():
        if any(under(point, api) for api in API_FILESYSTEMS) or any(under(point, w) for w in writable):
            continue
        mount("-o", "remount,bind,ro", point)
    if d.get("PrivateTmp") == ["yes"]:
        for tmp in ("/tmp", "/var/tmp"):
            if os.path.isdir(tmp):
                mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", tmp)
    if d.get("ProtectHome") == ["yes"]:
        for home in ("/home", "/root", "/run/user"):
            if os.path.isdir(home):
                mount("-t", "tmpfs", "-o", "mode=000,ro", "tmpfs", home)


def setpriv(d: dict[str, list[str]]) -> list[str]:
    argv = ["setpriv"]
    if "CapabilityBoundingSet" in d:
        caps = " ".join(d["CapabilityBoundingSet"]).split()
        names = ",".join(f"+{c.lower().removeprefix('cap_')}" for c in caps)
        argv += [f"--bounding-set=-all{',' + names if names else ''}", "--inh-caps=-all"]
    if d.get("NoNewPrivileges") == ["yes"]:
        argv.append("--no-new-privs")
    return [*argv, "--"]


def main(argv: list[str]) -> int:
    unit = Path(argv[0])
    rest = argv[1:]
    command: list[str] | None = None
    extra: list[str] = []
    if rest[:1] == ["--command"]:
        command = rest[1:]
    elif rest[:1] == ["--"]:
        extra = rest[1:]
    if os.environ.get(INSIDE) != "1":
        os.environ[INSIDE] = "1"
        unshare = ["unshare", "--mount", "--propagation", "private", sys.executable, __file__]
        os.execvp("unshare", [*unshare, *argv])
    d = directives(unit)
    env = environment(d)
    sandbox(d)
    os.environ.pop(INSIDE)
    os.environ.update(env)
    target = command if command is not None else exec_start(d, env) + extra
    final = setpriv(d) + target
    os.execvp(final[0], final)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
