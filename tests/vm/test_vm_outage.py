"""Scenario 4: an iSCSI outage under I/O, on the real stack, with the agent running as a daemon.

A writer runs on the array; the target is killed. The kernel: session FAILED, then FREE after the
replacement timeout; md fails the iSCSI leg and the writer carries on on the local leg. The agent:
`iscsimple_array_local_only` = 1, the session metrics, and (data safety) `iscsimple_array_iscsi_stale` = 1
with a durable record. The target comes back: the agent heals (faulty iSCSI leg removed, re-added
write-mostly, recovered *from* the local leg), clears the record, and both legs hold every write: zero
bytes lost. Timings (kill -> each metric change) are recorded.
"""

from __future__ import annotations

import itertools
import re
import sys

import pytest
from conftest import record
from vmharness import GUEST_AGENT
from xldriver import AGENT, Vbd, Xl

pytestmark = pytest.mark.vm

IQN = "iqn.2026-11.test.local:outage"
LABEL = "outage-disk"
MIB = 8
LISTEN = "127.0.0.1:9817"
METRICS = f"http://{LISTEN}/metrics"
REPLACEMENT_TIMEOUT = 5


def sample_line(name: str, value: str, **labels: str) -> str:
    """A regex for one exposition line of `name` with these labels (any order, others allowed) = value."""
    looks = "".join(f'(?=[^}}]*{k}="{re.escape(v)}")' for k, v in labels.items())
    return rf"^{name}\{{{looks}[^}}]*\}} {re.escape(value)}$"


def test_outage_under_io_local_only_then_heal_with_zero_bytes_lost(bed):
    g, xl = bed.guest, Xl(bed)
    backing = bed.make_disk("outage-iscsi", MIB)
    local = bed.make_disk("outage-local", MIB)
    g.call("fill", path=backing, seed="outage-iscsi", length=MIB << 20)
    bed.export(IQN, {1: backing})
    xl.configure(
        {LABEL: local},
        f"replacement_timeout_mirrored = {REPLACEMENT_TIMEOUT}\n[heal]\nenabled = true\nstable_seconds = 2\n",
    )
    vbd = Vbd(7, 51712)
    res = xl.add(vbd, f"lun1@{IQN}+{LABEL}")
    assert res.rc == 0, str(res)
    md = bed.md_name(LABEL)
    sd = bed.lun_device(IQN, 1)[5:]
    loop = local[5:]
    bed.wait_in_sync(md)
    session = bed.session(IQN)
    assert int(g.read(session + "/recovery_tmo")) == REPLACEMENT_TIMEOUT

    agent = [AGENT, "--web.listen-address", LISTEN, "--refresh.interval", "1s", "--log.level", "debug"]
    g.spawn("agent", agent, log="/tmp/agent.log")
    wait_metric(g, sample_line("iscsimple_array_local_only", "0.0", label=LABEL), timeout=60)
    wait_metric(g, sample_line("iscsimple_array_iscsi_stale", "0.0", label=LABEL), timeout=10)

    g.spawn(
        "writer",
        [sys.executable, str(GUEST_AGENT), "writer", f"/dev/md/{LABEL}", "/tmp/w.log", "/tmp/w.stop"],
    )
    g.wait_for("/tmp/w.log", "regex", r"(?m)^(.*\n){20}", timeout=60)

    # -- the outage ---------------------------------------------------------------------------------
    killed = bed.kill_target()
    failed = g.wait_for(session + "/state", "equals", "FAILED", timeout=30)
    record("outage: kill -> session FAILED (sysfs)", failed["at"] - killed)
    up0 = wait_metric(g, sample_line("iscsimple_iscsi_session_up", "0.0", target=IQN), timeout=60)
    record("outage: kill -> iscsimple_iscsi_session_up 0 (scrape)", up0["at"] - killed)
    local_only = wait_metric(g, sample_line("iscsimple_array_local_only", "1.0", label=LABEL), timeout=60)
    record("outage: kill -> iscsimple_array_local_only 1 (scrape)", local_only["at"] - killed)
    free = g.wait_for(session + "/state", "equals", "FREE", timeout=60)
    record("outage: kill -> session FREE (sysfs)", free["at"] - killed)
    faulty = g.wait_for(f"/sys/block/{md}/md/dev-{sd}/state", "contains", "faulty", timeout=60)
    record("outage: kill -> iSCSI leg faulty (sysfs)", faulty["at"] - killed)
    assert g.read(f"/sys/block/{md}/md/dev-{loop}/state").strip() == "in_sync"
    wait_metric(g, sample_line("iscsimple_iscsi_session_state", "1.0", target=IQN, state="FREE"), timeout=30)
    wait_metric(
        g, sample_line("iscsimple_leg_state", "1.0", label=LABEL, leg="iscsi", state="faulty"), timeout=30
    )
    stale = wait_metric(g, sample_line("iscsimple_array_iscsi_stale", "1.0", label=LABEL), timeout=30)
    record("outage: kill -> iscsimple_array_iscsi_stale 1 (scrape)", stale["at"] - killed)
    assert g.read(f"/var/lib/iscsimple/stale/{LABEL}.json") is not None, "no durable stale record"
    [disk] = xl.status()["disks"]
    assert {"LOCAL-ONLY", "ISCSI-STALE"} <= set(disk["flags"]), disk["flags"]
    assert (disk["iscsi"]["state"], disk["local"]["state"], disk["session"]["state"]) == (
        "faulty",
        "in_sync",
        "FREE",
    )

    # The writer stalled at most about the replacement timeout, then carried on on the local leg.
    g.wait_for("/tmp/w.log", "regex", rf"(?m)^{int(faulty['at']) + 2}\d*\.\d+ ", timeout=60)
    log_times = [float(line.split()[0]) for line in g.read("/tmp/w.log").splitlines()]
    after = [t for t in log_times if t > faulty["at"]]
    assert len(after) >= 10, "the writer did not carry on after md failed the iSCSI leg"
    stall = max(b - a for a, b in itertools.pairwise(log_times) if a >= killed - 1)
    record("outage: longest write stall during the outage", stall)
    assert stall < REPLACEMENT_TIMEOUT + 10

    # -- the target comes back: the agent heals the mirror from the local leg ----------------------
    back = g.now()
    bed.start_target()
    relogged = g.wait_for(session + "/state", "equals", "LOGGED_IN", timeout=60)
    record("outage: target back -> session LOGGED_IN", relogged["at"] - back)
    # A partial heal re-adds the same member, so md keeps its write_error flag from the outage (md
    # records no bad blocks for arrays without a superblock: the flag only says errors were seen).
    healed = g.wait_for(f"/sys/block/{md}/md/dev-{sd}/state", "contains", "in_sync,write_mostly", timeout=180)
    record("outage: target back -> iSCSI leg in sync again (agent heal)", healed["at"] - back)
    wait_metric(g, sample_line("iscsimple_array_local_only", "0.0", label=LABEL), timeout=30)
    wait_metric(g, sample_line("iscsimple_array_iscsi_stale", "0.0", label=LABEL), timeout=30)
    wait_metric(g, sample_line("iscsimple_heal_operations_total", "1.0", result="success"), timeout=30)
    assert g.read(f"/var/lib/iscsimple/stale/{LABEL}.json") is None, "stale record not cleared after the heal"

    # Stop the writer cleanly; every write it completed is on the array and on both legs.
    g.call("write", path="/tmp/w.stop", text="")
    assert g.wait_proc("writer", timeout=60)["rc"] == 0
    bed.wait_in_sync(md)
    verdict = g.call("verify_writes", wait=300, log="/tmp/w.log", device=f"/dev/md/{LABEL}")
    assert verdict["mismatched"] == [], verdict["mismatched"]
    record("outage: writes completed by the writer, all verified (a count)", verdict["writes"])
    sums = {dev: g.call("sha256", path=dev)["sha256"] for dev in (f"/dev/{sd}", local)}
    assert len(set(sums.values())) == 1, f"legs differ after the heal: {sums}"

    g.kill("agent", "TERM")
    g.wait_proc("agent", timeout=30)
    res = xl.remove(vbd)
    assert res.rc == 0, str(res)
    assert g.glob(f"/sys/block/{md}") == []
    assert bed.sessions() == {}


def wait_metric(g, line_regex: str, timeout: float, url: str = METRICS, log: str = "/tmp/agent.log") -> dict:
    answer = g.call("wait_metric", wait=timeout + 30, url=url, line_regex=line_regex, timeout=timeout)
    if not answer["met"]:
        agent_log = g.read(log) or ""
        pytest.fail(
            f"no metric line matching {line_regex} within {timeout} s; last scrape:\n{answer['text']}\n"
            f"agent log (tail):\n{agent_log[-3000:]}"
        )
    return answer
