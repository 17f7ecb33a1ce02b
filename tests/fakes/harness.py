"""Runs the real `block-iscsimple` as libxl does, against a FakeHost.

host, hp = fake host, Hotplug driver (pytest fixture `hotplug`)
vbd = hp.vbd("lun1@iqn...+vm1")           # xenstore as libxl leaves it before `add`
result = hp.run("add", vbd)               # a real process: env XENBUS_PATH, fakes on PATH
hp.xs(vbd, "hotplug-status")
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from iscsimple.core.config import load_config
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import Registry

from .fakehost import FakeHost

IQN = "iqn.2001-04.com.example:storage"
PORTAL = "192.0.2.10:3260"

DEFAULT_CONFIG = f"""\
[iscsi]
portals = ["{PORTAL}"]
login_timeout = 5
[attach]
device_wait = 3
"""


@dataclass(frozen=True)
class Vbd:
    xenbus_path: str  # backend/vbd/<domid>/<devid>
    domid: int
    devid: int

    @property
    def attachment_id(self) -> str:
        return f"vbd-{self.domid}-{self.devid}"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def block_script() -> list[str]:
    """The installed console script next to this interpreter, as xl would run it."""
    script = Path(sys.executable).parent / "block-iscsimple"
    return [str(script)] if script.exists() else [sys.executable, "-m", "iscsimple.hotplug.main"]


class Hotplug:
    def __init__(self, host: FakeHost):
        self.host = host
        self.env = {**os.environ, **host.env()}
        self.paths = HostPaths.from_env(self.env)
        self.set_config(DEFAULT_CONFIG)
        self.set_tab({})
        self._devids = iter(range(51712, 51712 + 100000, 16))

    # -- setup ---------------------------------------------------------------------------

    def set_config(self, text: str) -> None:
        self.paths.config.write_text(text)

    def set_tab(self, entries: dict[str, str]) -> None:
        self.paths.tab.write_text("".join(f"{label} {device}\n" for label, device in entries.items()))

    def add_tab(self, label: str, device: str) -> None:
        with open(self.paths.tab, "a") as f:
            f.write(f"{label} {device}\n")

    def mirror(self, label: str, size: int = 64 << 20) -> str:
        """A local LV for LABEL, entered in the tab; returns its path."""
        device = self.host.add_local_device(f"vg0/{label}", size)
        self.add_tab(label, device)
        return device

    def vbd(self, spec: str, domid: int = 1, name: str | None = None) -> Vbd:
        """What libxl writes before running the script: params, dev, the domain's name."""
        devid = next(self._devids)
        path = f"backend/vbd/{domid}/{devid}"
        self.host.xenstore_write(f"{path}/params", spec)
        self.host.xenstore_write(f"{path}/dev", f"xvd{chr(ord('a') + (devid // 16) % 26)}")
        self.host.xenstore_write(f"/local/domain/{domid}/name", name or f"vm{domid}")
        return Vbd(path, domid, devid)

    # -- running -----------------------------------------------------------------------------

    def start(self, command: str, vbd: Vbd) -> subprocess.Popen:
        return subprocess.Popen(
            [*block_script(), command],
            env={**self.env, "XENBUS_PATH": vbd.xenbus_path},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, command: str, vbd: Vbd, timeout: float = 120) -> Run:
        started = time.monotonic()
        proc = self.start(command, vbd)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"block-iscsimple {command} still ran after {timeout} s:\n{err}")
        return Run(proc.returncode, out, err, time.monotonic() - started)

    def add(self, vbd: Vbd) -> Run:
        result = self.run("add", vbd)
        assert result.returncode == 0, f"add failed: {self.xs(vbd, 'hotplug-error')}\n{result.stderr}"
        return result

    # -- inspection ---------------------------------------------------------------------------

    def xs(self, vbd: Vbd, key: str) -> str | None:
        return self.host.xenstore().get(f"/local/domain/0/{vbd.xenbus_path}/{key}")

    def registry(self) -> Registry:
        return Registry(self.paths)

    def config(self):
        return load_config(self.paths.config)

    def command_lines(self) -> list[str]:
        """iscsiadm/mdadm calls as text, the fake root replaced by nothing (/dev/md/vm1, not /tmp/.../dev/md/vm1)."""
        root = str(self.host.root)
        return [" ".join(argv).replace(root, "") for argv in self.host.commands()]


def make_hotplug(tmp_path: Path) -> Hotplug:
    """A fresh fake host under tmp_path and the driver for it (each test file wraps this in a fixture)."""
    return Hotplug(FakeHost.create(tmp_path / "host"))


def make_mirror_host(tmp_path: Path, label: str = "vm1") -> Hotplug:
    """make_hotplug with LUN 1 of IQN (64 MiB) and a local device for LABEL in the tab."""
    hp = make_hotplug(tmp_path)
    hp.host.add_target(IQN, luns={1: 64 << 20})
    hp.mirror(label)
    return hp
