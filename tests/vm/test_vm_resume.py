"""An iSCSI outage cuts the local leg's initial recovery (iSCSI -> local), on the real stack with the agent
running. md stops the recovery and leaves the local leg an idle spare, and does not restart it when the
target is back. Meanwhile status, metrics and alerts must say so (not "catching up"); once the session is
back and stable the agent resumes the recovery, from iSCSI (the local leg is incomplete), and counts it.
"""

from __future__ import annotations

import pytest
from conftest import record
from test_vm_outage import sample_line, wait_metric
from xldriver import AGENT, CLI, XENSTORE, Vbd, Xl

pytestmark = pytest.mark.vm

IQN = "iqn.2026-11.test.local:resume"
LABEL = "resume-disk"
MIB = 8
REPLACEMENT_TIMEOUT = 5
SLOW_KIB = 256  # the recovery lasts ~30 s: the outage cuts it


def test_recovery_cut_by_an_outage_is_resumed_from_iscsi(bed):
    g, xl = bed.guest, Xl(bed)
    backing = bed.make_disk("resume-iscsi", MIB)
    local = bed.make_disk("resume-local", MIB)
    want = g.call("fill", path=backing, seed="resume-iscsi", length=MIB << 20)["sha256"]
    bed.export(IQN, {1: backing})
    xl.configure(
        {LABEL: local},
        f"replacement_timeout_mirrored = {REPLACEMENT_TIMEOUT}\n[heal]\nstable_seconds = 2\n",
    )
    agent = [AGENT, "--web.listen-address", "127.0.0.1:9817", "--refresh.interval", "1s"]
    g.spawn("agent", [*agent, "--log.level", "debug"], log="/tmp/agent.log")
    bed.resync_speed(max_kib=SLOW_KIB)
    vbd = Vbd(8, 51712)
    res = xl.add(vbd, f"lun1@{IQN}+{LABEL}")
    assert res.rc == 0, str(res)
    md = bed.md_name(LABEL)
    loop = local[5:]
    g.wait_for(f"/sys/block/{md}/md/sync_action", "equals", "recover", timeout=30)

    # -- the outage cuts the recovery ---------------------------------------------------------------
    killed = bed.kill_target()
    stopped = g.wait_for(f"/sys/block/{md}/md/dev-{loop}/slot", "equals", "none", timeout=90)
    record("resume: kill -> local leg an idle spare (sysfs)", stopped["at"] - killed)
    g.wait_for(f"/sys/block/{md}/md/sync_action", "equals", "idle", timeout=30)
    wait_metric(g, sample_line("iscsimple_array_recovery_stopped", "1.0", label=LABEL), timeout=60)
    wait_metric(g, sample_line("iscsimple_array_unprotected", "1.0", label=LABEL), timeout=10)
    wait_metric(
        g, sample_line("iscsimple_leg_state", "1.0", label=LABEL, leg="local", state="spare"), timeout=10
    )
    [disk] = xl.status()["disks"]
    assert "RECOVERY-STOPPED" in disk["flags"] and disk["local"]["state"] == "spare", disk
    text = g.run([CLI, "status"], env={"ISCSIMPLE_XENSTORE_FILE": XENSTORE}, check=False).stdout
    assert "recovery from iSCSI stopped" in text and "still recovering" not in text, text

    # -- the target is back: nothing but the agent restarts the copy --------------------------------
    back = g.now()
    bed.start_target()
    bed.resync_speed(max_kib=1_000_000)
    session = bed.session(IQN)
    g.wait_for(session + "/state", "equals", "LOGGED_IN", timeout=60)
    resumed = g.wait_for(f"/sys/block/{md}/md/dev-{loop}/slot", "regex", r"^\d+$", timeout=90)
    record("resume: target back -> local leg recovering again (agent)", resumed["at"] - back)
    bed.wait_in_sync(md)
    record("resume: target back -> local leg in sync", g.now() - back)
    wait_metric(g, sample_line("iscsimple_recovery_resumes_total", "1.0", result="success"), timeout=30)
    wait_metric(g, sample_line("iscsimple_array_recovery_stopped", "0.0", label=LABEL), timeout=30)
    wait_metric(g, sample_line("iscsimple_array_unprotected", "0.0", label=LABEL), timeout=30)
    legs = bed.md_legs(md)
    assert legs[loop] == "in_sync" and "write_mostly" in legs[bed.lun_device(IQN, 1)[5:]], legs
    assert g.call("sha256", path=local)["sha256"] == want, "the local leg does not hold the iSCSI copy"
    assert g.read(f"/var/lib/iscsimple/stale/{LABEL}.json") is None, "the iSCSI copy was never stale"

    g.kill("agent", "TERM")
    g.wait_proc("agent", timeout=30)
    res = xl.remove(vbd)
    assert res.rc == 0, str(res)
    assert bed.sessions() == {}
