"""The Debian package on the real kernel: `dpkg -i` of the built .deb into the guest's overlay, then
an iSCSI outage healed by the installed agent running under the installed unit's sandbox.

The guest has no systemd (its PID 1 is the harness), so tests/vm/unit_sandbox.py applies the unit's
file-system and capability restrictions with the mechanisms systemd uses for them: a private mount
namespace with everything read-only but the unit's ReadWritePaths (ProtectSystem=strict), the
StateDirectory, PrivateTmp, ProtectHome, and the capability bounding set + no_new_privs (setpriv).
Those decide whether a heal can write its lock, registry and record: the failure this guards
against was EROFS on Xen's lock directory. Seccomp and the device cgroup are not applied.

Everything runs from the package's paths: the hook xl would run (/etc/xen/scripts/block-iscsimple,
the packaged launcher of /usr/sbin/block-iscsimple), /usr/bin/iscsimple, /usr/bin/iscsimple-agent
with Debian's python3 and libraries. Then `dpkg -r` leaves the array and the session running, and
`dpkg -P` keeps a standing stale-copy record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import test_vm_outage as outage
from conftest import record
from test_vm_outage import sample_line
from xldriver import XENSTORE, Vbd, Xl

# About 4 minutes: not in the default run (README, Tests): scripts/test -m vmpackage
pytestmark = [pytest.mark.vm, pytest.mark.deb, pytest.mark.vmpackage]

IQN = "iqn.2026-11.test.local:package"
LABEL = "pkg-disk"
MIB = 4
LISTEN = "127.0.0.1:9818"
METRICS = f"http://{LISTEN}/metrics"
HOOK = "/etc/xen/scripts/block-iscsimple"
UNIT = "/lib/systemd/system/iscsimple-agent.service"
SANDBOX = str(Path(__file__).resolve().parent / "unit_sandbox.py")
PYTHON = "/usr/bin/python3"
DPKG_ENV = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def dpkg(g, *args: str, timeout: float = 300):
    # Earlier tests wrote the tab and config at their conffile paths: keep them, ask nothing.
    return g.run(
        ["dpkg", "--force-confdef", "--force-confold", *args], env=DPKG_ENV, check=False, timeout=timeout
    )


def sandboxed(*command: str) -> list[str]:
    return [PYTHON, SANDBOX, UNIT, "--command", *command]


def test_installed_package_heals_an_outage_under_the_units_sandbox(bed, deb):
    g, xl = bed.guest, Xl(bed)
    # man-db's trigger re-indexes every manual page (minutes under TCG); Debian's switch for it is
    # this file. The guest's root is an overlay: the host keeps its own.
    g.run(["rm", "-f", "/var/lib/man-db/auto-update"])
    started = time.monotonic()
    installed = dpkg(g, "-i", str(deb))
    record("package: dpkg -i in the guest (wall)", time.monotonic() - started)
    try:
        assert installed.rc == 0, str(installed)
        run_scenario(bed, g, xl)
    finally:
        dpkg(g, "--purge", "iscsimple")


def run_scenario(bed, g, xl) -> None:
    assert "exec /usr/sbin/block-iscsimple" in g.read(HOOK)
    version = g.run(["/usr/bin/iscsimple", "--version"], env={"PATH": "/usr/bin:/bin"})
    assert version.stdout.startswith("iscsimple ")
    # install-hook finds the package's hook through dpkg's file list and leaves the conffile alone.
    before = g.run(["stat", "-c", "%i %Y", HOOK]).stdout
    hook = g.run(["/usr/bin/iscsimple", "install-hook"], env={"PATH": "/usr/bin:/bin"}, check=False)
    assert hook.rc == 0 and "installed by the Debian package iscsimple, left as it is" in hook.stdout, str(
        hook
    )
    assert g.run(["stat", "-c", "%i %Y", HOOK]).stdout == before
    # postinst made the directories the unit binds (tmpfiles.d); the guest's /run started empty.
    assert g.glob("/run/xen-hotplug") == ["/run/xen-hotplug"]
    assert g.glob("/run/iscsimple") == ["/run/iscsimple"]

    # The sandbox is real: only the unit's paths are writable, and root keeps only the unit's
    # CapabilityBoundingSet (CAP_SYS_ADMIN bit 21, CAP_SYSLOG bit 34).
    probe = g.run(
        sandboxed(
            "/bin/sh",
            "-c",
            "touch /etc/iscsimple/probe 2>&1; touch /run/xen-hotplug/probe /run/iscsimple/probe "
            "/var/lib/iscsimple/probe && echo writable-ok; grep -E '^(CapBnd|CapEff|NoNewPrivs)' "
            "/proc/self/status; rm -f /run/xen-hotplug/probe /run/iscsimple/probe /var/lib/iscsimple/probe",
        )
    )
    assert "Read-only file system" in probe.stdout, probe.stdout
    assert "writable-ok" in probe.stdout, probe.stdout
    assert "CapBnd:\t0000000400200000" in probe.stdout and "NoNewPrivs:\t1" in probe.stdout

    backing = bed.make_disk("pkg-iscsi", MIB)
    local = bed.make_disk("pkg-local", MIB)
    g.call("fill", path=backing, seed="pkg-iscsi", length=MIB << 20)
    bed.export(IQN, {1: backing})
    # Generous login and attach budgets: the target and initiator share a TCG guest on a busy host.
    xl.configure(
        {LABEL: local},
        "replacement_timeout_mirrored = 3\nlogin_timeout = 30\n[attach]\nbudget = 35\n"
        "[heal]\nstable_seconds = 2\n",
    )
    vbd = Vbd(8, 51712)
    xl.prepare(vbd, f"lun1@{IQN}+{LABEL}")
    add = g.run([HOOK, "add"], env=xl.env(vbd), check=False, timeout=60)  # what xl runs
    assert add.rc == 0, str(add)
    md = bed.md_name(LABEL)
    sd = bed.lun_device(IQN, 1)[5:]
    bed.wait_in_sync(md)
    session = bed.session(IQN)

    agent = sandboxed_agent()
    g.spawn("pkg-agent", agent, log="/tmp/pkg-agent.log")
    wait_metric(g, sample_line("iscsimple_array_local_only", "0.0", label=LABEL), timeout=90)

    killed = bed.kill_target()
    # md fails the iSCSI leg only when I/O to it fails: a write, which waits out the replacement
    # timeout and then completes on the local leg.
    g.run(["dd", "if=/dev/zero", f"of=/dev/md/{LABEL}", "bs=4k", "count=8", "oflag=direct"], timeout=120)
    g.wait_for(f"/sys/block/{md}/md/dev-{sd}/state", "contains", "faulty", timeout=60)
    stale = wait_metric(g, sample_line("iscsimple_array_iscsi_stale", "1.0", label=LABEL), timeout=60)
    record("package: kill -> iscsimple_array_iscsi_stale 1 (sandboxed agent)", stale["at"] - killed)
    assert g.read(f"/var/lib/iscsimple/stale/{LABEL}.json") is not None

    back = g.now()
    bed.start_target()
    g.wait_for(session + "/state", "equals", "LOGGED_IN", timeout=60)
    healed = g.wait_for(f"/sys/block/{md}/md/dev-{sd}/state", "equals", "in_sync,write_mostly", timeout=180)
    record("package: target back -> iSCSI leg in sync (heal under the sandbox)", healed["at"] - back)
    wait_metric(g, sample_line("iscsimple_heal_operations_total", "1.0", result="success"), timeout=30)
    wait_metric(g, sample_line("iscsimple_heal_operations_total", "0.0", result="failure"), timeout=10)
    wait_metric(g, sample_line("iscsimple_array_iscsi_stale", "0.0", label=LABEL), timeout=30)
    assert g.read(f"/var/lib/iscsimple/stale/{LABEL}.json") is None
    status = g.run(["/usr/bin/iscsimple", "status", "--json"], env={"ISCSIMPLE_XENSTORE_FILE": XENSTORE})
    [disk] = json.loads(status.stdout)["disks"]
    assert disk["flags"] == [] and disk["iscsi"]["state"] == "in_sync", disk
    # The heal copied the local leg (which took the outage's write) onto the LUN: both legs equal.
    sums = {dev: g.call("sha256", path=dev)["sha256"] for dev in (f"/dev/{sd}", local)}
    assert len(set(sums.values())) == 1, f"legs differ after the heal: {sums}"
    g.kill("pkg-agent", "TERM")
    g.wait_proc("pkg-agent", timeout=30)

    # Remove: the array and the session stay as they are.
    removed = dpkg(g, "-r", "iscsimple")
    assert removed.rc == 0, str(removed)
    assert "1 disk(s) are still attached" in removed.stderr
    assert g.glob(f"/sys/block/{md}") == [f"/sys/block/{md}"]
    assert g.read(session + "/state").strip() == "LOGGED_IN"
    # Purge with a stale-copy record standing: the record stays.
    g.call("write", path=f"/var/lib/iscsimple/stale/{LABEL}.json", text=json.dumps({"label": LABEL}))
    purged = dpkg(g, "--purge", "iscsimple")
    assert purged.rc == 0, str(purged)
    assert "stale-copy records stand" in purged.stderr
    assert g.read(f"/var/lib/iscsimple/stale/{LABEL}.json") is not None
    assert g.read("/etc/iscsimple/iscsimple.toml") is None  # its conffiles went
    assert g.glob(HOOK) == []


def sandboxed_agent() -> list[str]:
    # The unit's ExecStart ($ARGS from /etc/default/iscsimple-agent) plus the test's listen address.
    return [PYTHON, SANDBOX, UNIT, "--", "--web.listen-address", LISTEN, "--refresh.interval", "1s"]


def wait_metric(g, line_regex: str, timeout: float) -> dict:
    return outage.wait_metric(g, line_regex, timeout, url=METRICS, log="/tmp/pkg-agent.log")
