"""Runs the project's own commands in the guest the way their users do: `block-iscsimple add|remove` as xl
runs it (argv, XENBUS_* in a minimal environment, the disk spec in xenstore's `params`), the operator CLI
`iscsimple`, and `iscsimple-agent`. Outside Xen, xenstore is the project's file-backed double
(ISCSIMPLE_XENSTORE_FILE); config and tab live at their default paths in the guest's writable overlay."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from storagebed import PORTAL, StorageBed
from vmharness import Result

BIN = Path(sys.executable).parent  # the venv's console scripts; the guest sees the same paths
BLOCK_SCRIPT = str(BIN / "block-iscsimple")
CLI = str(BIN / "iscsimple")
AGENT = str(BIN / "iscsimple-agent")
CONFIG = "/etc/iscsimple/iscsimple.toml"
TAB = "/etc/xen/scripts/block-iscsimple-tab.conf"
XENSTORE = "/tmp/xenstore.json"
STATE = "/run/iscsimple"
XL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # what libxl hands its hotplug scripts (see fixtures)


@dataclass(frozen=True)
class Vbd:
    domid: int
    devid: int

    @property
    def path(self) -> str:
        return f"backend/vbd/{self.domid}/{self.devid}"


class Xl:
    """Hotplug calls as libxl makes them, against the xenstore double."""

    def __init__(self, bed: StorageBed):
        self.bed = bed
        self.guest = bed.guest

    def configure(
        self, tab: dict[str, str], extra_toml: str = "", portals: tuple[str, ...] = (PORTAL,)
    ) -> None:
        toml = "[iscsi]\nportals = [" + ", ".join(f'"{p}"' for p in portals) + "]\n" + extra_toml
        self.guest.call("write", path=CONFIG, text=toml)
        self.guest.call("write", path=TAB, text="".join(f"{label} {dev}\n" for label, dev in tab.items()))

    def xenstore(self) -> dict[str, str]:
        text = self.guest.read(XENSTORE)
        return json.loads(text) if text else {}

    def keys(self, vbd: Vbd) -> dict[str, str]:
        prefix = vbd.path + "/"
        return {k[len(prefix) :]: v for k, v in self.xenstore().items() if k.startswith(prefix)}

    def _put(self, values: dict[str, str]) -> None:
        data = self.xenstore()
        data.update(values)
        self.guest.call("write", path=XENSTORE, text=json.dumps(data, indent=1, sort_keys=True))

    def prepare(self, vbd: Vbd, spec: str, vdev: str = "xvda", name: str | None = None) -> None:
        """The backend keys libxl writes before it runs the script (names as in the Xen capture)."""
        p = vbd.path
        self._put(
            {
                f"{p}/params": spec,
                f"{p}/script": BLOCK_SCRIPT,
                f"{p}/type": "phy",
                f"{p}/mode": "w",
                f"{p}/dev": vdev,
                f"{p}/frontend-id": str(vbd.domid),
                f"{p}/frontend": f"/local/domain/{vbd.domid}/device/vbd/{vbd.devid}",
                f"{p}/online": "1",
                f"{p}/state": "2",
                f"/local/domain/{vbd.domid}/name": name or f"vm{vbd.domid}",
            }
        )

    def env(self, vbd: Vbd) -> dict[str, str]:
        return {
            **XL_ENV,
            "XENBUS_PATH": vbd.path,
            "XENBUS_TYPE": "vbd",
            "XENBUS_BASE_PATH": "backend",
            "ISCSIMPLE_XENSTORE_FILE": XENSTORE,
        }

    def add(self, vbd: Vbd, spec: str, vdev: str = "xvda", timeout: float = 60) -> Result:
        self.prepare(vbd, spec, vdev)
        return self.guest.run([BLOCK_SCRIPT, "add"], env=self.env(vbd), check=False, timeout=timeout)

    def spawn_add(self, name: str, vbd: Vbd, spec: str, vdev: str) -> None:
        self.prepare(vbd, spec, vdev)
        self.guest.spawn(name, [BLOCK_SCRIPT, "add"], env=self.env(vbd), log=f"/tmp/{name}.log")

    def remove(self, vbd: Vbd, timeout: float = 60) -> Result:
        # libxl sets online=0 and state=6 (closed) before it runs remove.
        self._put({f"{vbd.path}/online": "0", f"{vbd.path}/state": "6"})
        return self.guest.run([BLOCK_SCRIPT, "remove"], env=self.env(vbd), check=False, timeout=timeout)

    def spawn_remove(self, name: str, vbd: Vbd) -> None:
        self._put({f"{vbd.path}/online": "0", f"{vbd.path}/state": "6"})
        self.guest.spawn(name, [BLOCK_SCRIPT, "remove"], env=self.env(vbd), log=f"/tmp/{name}.log")

    # -- the operator CLI and the agent ------------------------------------------------------------
    def status(self) -> dict:
        res = self.guest.run([CLI, "status", "--json"], env={"ISCSIMPLE_XENSTORE_FILE": XENSTORE}, timeout=60)
        return json.loads(res.stdout)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """One `iscsimple-agent --once` reading: (sample name, sorted labels) -> value."""
        argv = [
            AGENT,
            "--once",
            "--no-udev",
            "--path.sysfs",
            "/sys",
            "--path.procfs",
            "/proc",
            "--path.state",
            STATE,
        ]
        res = self.guest.run(argv, check=False, timeout=60)
        assert res.rc == 0, str(res)
        return parse_exposition(res.stdout)


def parse_exposition(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> list[float]:
    """Values of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
