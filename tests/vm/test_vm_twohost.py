"""Two hosts on real kernels (twohostbed.py): live migration at the block level, and the cross-host guard.

Migration as libxl does it (docs/data-safety.md §6): the source VM is suspended, the destination's
`block-iscsimple add` runs, the VM continues there, then the source's `remove`. The VM is a writer of
verifiable records (records.py): SIGSTOP is the suspend (its writes are O_DIRECT|O_DSYNC: a completed
record is on stable storage), the destination's writer continues after the source's last logged record.
Each scenario then checks every record on the destination's array and on the filer's backing file, and
that both legs hold the same bytes.

1. A → B under writes, then B → A.
2. A alone loses the filer: A's copy goes stale, B's add is refused naming host A, the disk and the
   resolve command; A's path returns, A heals; the migration then succeeds with zero records lost.
3. + 4. A's copy is stale and A crashes: B's add still refuses (A's last report); the operator accepts
   the loss (`iscsimple accept-loss`) and B starts; A reboots with its record and its old local leg, and
   `iscsimple resolve --keep local` there refuses to write onto the LUN B uses.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import records
from conftest import record
from storagebed import StorageBed
from twohostbed import Host, TwoHosts, cluster_config
from vmharness import GUEST_AGENT, VmUnavailable, preflight, prepare_kernel
from xldriver import Vbd

pytestmark = [pytest.mark.vm, pytest.mark.twohost]

IQN = "iqn.2026-11.test.local:twohost"
LABEL = "web1"
MIB = 16
LIMIT = (MIB << 20) // records.SIZE - 16
# A VM's pace, 10 writes/s: unpaced, A's writer filled the 16 MiB disk (LIMIT records) during the
# outage and its heal, and B's writer had nothing left to write after the migration.
WRITE_INTERVAL = 0.1
VBD = Vbd(5, 51712)
LOG = "/tmp/records.log"
STOP = "/tmp/records.stop"


def spec(lun: int) -> str:
    return f"lun{lun}@{IQN}+{LABEL}"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    try:
        preflight()
        kernel = prepare_kernel()
    except VmUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    bed = TwoHosts(tmp_path_factory.mktemp("twohost"), kernel)
    try:
        bed.filer.start()
        bed.filer.export(IQN, {lun: bed.filer.lun_file(f"lun{lun}", MIB) for lun in (1, 2, 3)})
        bed.start_prometheus()
        for host in (bed.a, bed.b):
            host.make_disks(MIB)
            seconds = host.boot(cluster_config(host.name), {LABEL: "/dev/vdb"})
            record(f"twohost: boot {host.name} to agent started (wall)", seconds)
        for host in (bed.a, bed.b):
            wait_prometheus(bed, f'up{{instance="{host.agent_address}"}} == 1', "agent scraped", 120)
        yield bed
    finally:
        bed.stop()


@pytest.fixture(autouse=True)
def clean_hosts(hosts):
    """Each scenario starts with nothing attached, even after a failed one."""
    yield
    for host in (hosts.a, hosts.b):
        if host.guest is not None and host.guest.glob("/run/iscsimple/attachments/*"):
            if host.guest.call("running", name="writer")["running"]:
                end_writer(host)
            host.xl.remove(VBD, timeout=120)


def wait_prometheus(bed: TwoHosts, expr: str, what: str, timeout: float = 60) -> list[dict]:
    assert bed.prometheus is not None
    deadline = time.monotonic() + timeout
    while True:
        result = bed.prometheus.query(expr)
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus: no {what} ({expr}) within {timeout} s")
        time.sleep(0.5)


def start_writer(host: Host, start: int) -> None:
    g = host.guest
    g.run(["rm", "-f", LOG, STOP])
    args = [f"/dev/md/{LABEL}", LOG, str(start), STOP, str(LIMIT), str(WRITE_INTERVAL)]
    g.spawn("writer", [sys.executable, str(GUEST_AGENT), "records", *args])


def wait_written(host: Host, records_at_least: int, timeout: float = 120) -> int:
    host.guest.wait_for(LOG, "regex", rf"(?m)^(.*\n){{{records_at_least}}}", timeout=timeout)
    return records.last_logged(host.guest.read(LOG) or "")


def suspend(host: Host) -> int:
    """The VM is paused: no more writes; what it completed is on stable storage. Returns its last record."""
    host.guest.kill("writer", "STOP")
    host.guest.run(["blockdev", "--flushbufs", f"/dev/md/{LABEL}"], check=False)
    return records.last_logged(host.guest.read(LOG) or "")


def end_writer(host: Host) -> int:
    host.guest.kill("writer", "KILL")
    host.guest.wait_proc("writer", timeout=30)
    return records.last_logged(host.guest.read(LOG) or "")


def add(host: Host, lun: int):
    return host.xl.add(VBD, spec(lun), timeout=90)


def hotplug_error(host: Host) -> str:
    return host.xl.keys(VBD).get("hotplug-error", "")


def guard_seconds(host: Host) -> float | None:
    text = host.guest.read("/run/iscsimple/hotplug-stats.json")
    return json.loads(text)["last_seconds"].get("cluster_guard") if text else None


def migrate(src: Host, dst: Host, lun: int) -> tuple[int, float]:
    """libxl's order at the block level. Returns (the source's last record, hand-over seconds)."""
    started = time.monotonic()
    last = suspend(src)
    added = add(dst, lun)
    assert added.rc == 0, str(added)
    start_writer(dst, last + 1)
    handover = time.monotonic() - started
    end_writer(src)
    removed = src.xl.remove(VBD, timeout=120)
    assert removed.rc == 0, str(removed)
    record(f"twohost: lun{lun} {src.name} -> {dst.name}: destination add (guest)", added.seconds)
    if (seconds := guard_seconds(dst)) is not None:
        record(f"twohost: lun{lun} {dst.name}: cluster guard query at add", seconds)
    return last, handover


def verify(bed: TwoHosts, host: Host, lun: int) -> int:
    """Stop the writer; every record it and its predecessors completed is on the array, on the filer's
    backing file, and both legs hold the same bytes. Returns how many records there are."""
    count = end_writer(host) + 1
    storage = StorageBed(host.guest)
    md = storage.md_name(LABEL)
    storage.wait_in_sync(md, timeout=180)
    on_array = host.guest.call("verify_records", path=f"/dev/md/{LABEL}", count=count)
    assert on_array["bad_total"] == 0, on_array
    backing = bed.filer.targets[IQN][lun]
    on_filer = records.verify(str(backing), count, direct=False)
    assert on_filer["bad_total"] == 0, on_filer
    sd = storage.lun_device(IQN, lun)
    iscsi_leg = host.guest.call("sha256", path=sd)["sha256"]
    local_leg = host.guest.call("sha256", path="/dev/vdb", length=MIB << 20)["sha256"]
    assert iscsi_leg == local_leg
    return count


def detach(host: Host) -> None:
    with_writer = host.guest.call("running", name="writer")["running"]
    if with_writer:
        end_writer(host)
    res = host.xl.remove(VBD, timeout=120)
    assert res.rc == 0, str(res)


def vm_started(host: Host, lun: int) -> int:
    """The VM starts on `host`: its add, the mirror in sync, 40 records written. Returns the last."""
    res = add(host, lun)
    assert res.rc == 0, str(res)
    StorageBed(host.guest).wait_in_sync(StorageBed(host.guest).md_name(LABEL), timeout=180)
    start_writer(host, 0)
    return wait_written(host, 40)


def test_migration_under_writes_a_to_b_and_back(hosts):
    a, b = hosts.a, hosts.b
    vm_started(a, 1)
    last_a, handover = migrate(a, b, 1)
    record("twohost: hand-over A -> B (suspend, B's add, writer resumed; wall)", handover)
    wait_written(b, 40)
    last_b, handover = migrate(b, a, 1)
    record("twohost: hand-over B -> A (wall)", handover)
    assert last_b > last_a
    wait_written(a, 40)
    count = verify(hosts, a, 1)
    assert count > last_b + 40
    detach(a)


def test_partial_outage_refused_then_healed_then_migrated(hosts):
    a, b = hosts.a, hosts.b
    vm_started(a, 2)
    cut = time.monotonic()
    a.cut_storage()  # A alone: B still reaches the filer
    a.guest.wait_for(f"/var/lib/iscsimple/stale/{LABEL}.json", "exists", timeout=120)
    record("twohost: A's path cut -> A's stale record", time.monotonic() - cut)
    wait_prometheus(hosts, 'iscsimple_lun_stale_since_seconds{host="hosta",lun="2"}', "A's stale report", 30)
    record("twohost: A's path cut -> stale report in Prometheus", time.monotonic() - cut)

    refused = add(b, 2)
    assert refused.rc != 0
    error = hotplug_error(b)
    assert "host hosta" in error and f"lun2@{IQN}" in error and LABEL in error, error
    assert f"iscsimple resolve {LABEL} --keep local" in error and "accept-loss" in error
    assert b.guest.glob("/sys/block/md*") == []  # nothing built from the stale copy
    record("twohost: B's add refused (guard query + refusal, guest)", refused.seconds)

    back = time.monotonic()
    a.restore_storage()
    a.guest.wait_for(f"/var/lib/iscsimple/stale/{LABEL}.json", "absent", timeout=240)
    record("twohost: A's path back -> A healed, record cleared", time.monotonic() - back)
    wait_prometheus(
        hosts, 'absent(iscsimple_lun_stale_since_seconds{host="hosta",lun="2"})', "A's report gone", 30
    )
    outage_writes = records.last_logged(a.guest.read(LOG) or "")
    last, _ = migrate(a, b, 2)
    assert last >= outage_writes
    wait_written(b, 20)
    count = verify(hosts, b, 2)  # zero records lost: those A wrote during its outage too
    assert count > last
    detach(b)


def test_crash_while_stale_override_and_no_heal_onto_the_lun_in_use(hosts):
    a, b = hosts.a, hosts.b
    before_cut = vm_started(a, 3)
    a.cut_storage()
    a.guest.wait_for(f"/var/lib/iscsimple/stale/{LABEL}.json", "exists", timeout=120)
    wait_prometheus(hosts, 'iscsimple_lun_stale_since_seconds{host="hosta",lun="3"}', "A's stale report", 30)
    a.crash()
    wait_prometheus(hosts, f'up{{instance="{a.agent_address}"}} == 0', "A down", 30)
    # Prometheus marks A's series stale: from then on only A's last report is left.
    wait_prometheus(hosts, 'absent(iscsimple_lun_stale_since_seconds{host="hosta",lun="3"})', "A stale", 30)

    refused = add(b, 3)
    assert refused.rc != 0
    error = hotplug_error(b)
    assert "host hosta" in error and "down now" in error and "accept-loss" in error, error

    cmd = ["accept-loss", f"lun3@{IQN}", "--host", "hosta"]
    unconfirmed = b.cli(*cmd)
    assert unconfirmed.rc == 2 and "since" in unconfirmed.stdout, str(unconfirmed)
    accepted = b.cli(*cmd, "--yes-discard-writes-on-that-host")
    assert accepted.rc == 0, str(accepted)
    started = add(b, 3)
    assert started.rc == 0, str(started)
    # B goes on from what the LUN holds: A's writes after the cut are the loss accepted above.
    start_writer(b, before_cut + 1)
    wait_written(b, 40)

    a.boot(cluster_config(a.name), {LABEL: "/dev/vdb"})  # the reboot: records and local leg survived
    assert a.guest.read(f"/var/lib/iscsimple/stale/{LABEL}.json") is not None
    wait_prometheus(hosts, 'iscsimple_lun_attached{host="hostb",lun="3"} == 1', "B's attachment", 30)
    resolved = a.cli("resolve", LABEL, "--keep", "local")
    assert resolved.rc == 1, str(resolved)
    assert "in use elsewhere" in resolved.stderr and "hostb" in resolved.stderr, str(resolved)
    assert a.guest.glob("/sys/block/md*") == []  # A's old local leg was not put onto the LUN
    time.sleep(3)  # A's agent ran a few passes: nothing heals an array that does not run

    count = verify(hosts, b, 3)
    assert count > before_cut + 40
    discarded = a.cli("resolve", LABEL, "--keep", "iscsi", "--yes-discard-local-writes")
    assert discarded.rc == 0, str(discarded)
    detach(b)
