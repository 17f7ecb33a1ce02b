"""The simulated host writes what the real kernel writes, and the demo scenario plays its story."""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import pytest
from fixturetree import state_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsimple.core.iscsi import read_iscsi_sessions
from iscsimple.core.md import read_md_arrays
from iscsimple.core.mdstat import parse_mdstat, read_mdstat
from iscsimple.core.snapshot import HostSnapshot
from iscsimple.exporter.agent import Agent, AgentOptions
from iscsimple.exporter.demo import DEMO_TARGET_A, DEMO_VMS, DemoScenario, demo_options
from iscsimple.exporter.simhost import SimulatedHost

TARGET = "iqn.2026-11.test.local:disk1"
MB64 = 64 << 20


def captured(state: str, rel: str) -> str:
    return (state_dir(state) / rel).read_text()


def member_attrs(root, md: str, name: str) -> tuple[str, str, str]:
    d = root / "block" / md / "md" / f"dev-{name}"
    return tuple((d / a).read_text().strip() for a in ("state", "slot", "recovery_start"))


@pytest.fixture
def host(tmp_path):
    return SimulatedHost(tmp_path / "host")


def test_files_match_the_real_kernel_through_an_outage(host):
    """Same attribute values as the 6.1 captures at each step (names differ: dm-0 for loop1)."""
    sys = host.paths.sysfs
    host.attach("test", "web1", TARGET, 1, size_bytes=MB64)
    md, sd, local = host.md_device("test"), host.iscsi_device("test"), "dm-0"
    cap = "sys/block/md127/md"

    host.advance_resync("test", 8320 / 131072, speed_kib=2645)  # capture 02
    assert member_attrs(sys, md, local) == ("spare", "0", "8320")
    assert member_attrs(sys, md, sd) == ("in_sync,write_mostly", "1", "none")
    for attr in ("sync_action", "sync_completed", "sync_speed", "degraded", "level", "component_size"):
        assert (sys / "block" / md / "md" / attr).read_text() == captured("02", f"{cap}/{attr}"), attr
    assert (sys / "block" / md / "size").read_text() == captured("02", "sys/block/md127/size")

    host.finish_resync("test")  # capture 04
    assert member_attrs(sys, md, local) == ("in_sync", "0", "none")
    for attr in ("sync_action", "sync_completed", "sync_speed", "degraded"):
        assert (sys / "block" / md / "md" / attr).read_text() == captured("04", f"{cap}/{attr}"), attr

    host.fail_session(TARGET)  # capture 05a
    (session,) = read_iscsi_sessions(sys).sessions
    assert (session.state, session.luns[0].state) == ("FAILED", "blocked")

    host.expire_session(TARGET)  # capture 06
    assert member_attrs(sys, md, sd) == ("faulty,write_mostly,write_error", "none", "none")
    assert captured("06", f"{cap}/dev-sda/state") == "faulty,write_mostly,write_error\n"
    assert (sys / "block" / md / "md" / "degraded").read_text() == captured("06", f"{cap}/degraded")
    (session,) = read_iscsi_sessions(sys).sessions
    assert (session.state, session.luns[0].state) == ("FREE", "transport-offline")
    assert "(W)(F)" in (host.paths.procfs / "mdstat").read_text()

    host.restore_session(TARGET)  # capture 07
    host.heal("test")  # capture 09
    assert member_attrs(sys, md, sd) == ("write_mostly,spare", "1", "0")
    assert captured("09", f"{cap}/dev-sda/state") == "write_mostly,spare\n"
    host.finish_resync("test")  # capture 10
    assert member_attrs(sys, md, sd) == ("in_sync,write_mostly", "1", "none")
    assert captured("10", f"{cap}/dev-sda/state") == "in_sync,write_mostly\n"


def test_mdstat_lines_look_like_the_kernels(host):
    host.attach("test", "web1", TARGET, 1, size_bytes=MB64)
    host.advance_resync("test", 7936 / 65536, speed_kib=3968)
    ours = (host.paths.procfs / "mdstat").read_text().splitlines()
    theirs = captured("02", "proc_mdstat").splitlines()
    assert ours[0] == theirs[0]  # "Personalities : [raid1] "
    assert ours[1] == theirs[1].replace("loop1", "dm-0")  # md127 : active raid1 loop1[2] sda[1](W)
    assert ours[2] == theirs[2]
    # Same progress bar and percentage as md_seq_show; finish/speed follow from our numbers.
    assert ours[3].split(" finish=")[0] == theirs[3].split(" finish=")[0]
    assert ours[4] == theirs[4] and ours[-1] == theirs[-1]
    host.finish_resync("test")
    host.expire_session(TARGET)
    host.restore_session(TARGET)
    host.heal("test")
    text = (host.paths.procfs / "mdstat").read_text()
    assert text.splitlines()[1] == captured("09", "proc_mdstat").splitlines()[1].replace("loop1", "dm-0")
    assert parse_mdstat(text).arrays[host.md_device("test")].members[0].index == 3


def test_links_are_where_the_kernel_puts_them(host):
    host.attach("test", "web1", TARGET, 1)
    sys = host.paths.sysfs
    md, sd = host.md_device("test"), host.iscsi_device("test")
    assert os.readlink(sys / "block" / md) == f"../devices/virtual/block/{md}"
    assert os.readlink(sys / "block" / md / "md" / "rd1") == f"dev-{sd}"
    assert (sys / "block" / md / "md" / f"dev-{sd}" / "block" / "dev").read_text() == "8:0\n"
    assert os.readlink(sys / "class" / "iscsi_session" / "session1") == (
        "../../devices/platform/host0/session1/iscsi_session/session1"
    )
    assert os.readlink(sys / "block" / sd).endswith("/session1/target0:0:0/0:0:0:1/block/sda")
    assert os.readlink(host.paths.devfs / "md" / "test") == f"../{md}"


def test_the_core_readers_read_it_without_errors(host):
    for i, (label, domain, target, lun, vbd) in enumerate(DEMO_VMS):
        host.attach(label, domain, target, lun, vbd=vbd, domain_id=i + 1)
    host.advance_resync("web1-disk", 0.5)
    host.finish_resync("db1-disk")
    host.expire_session(DEMO_TARGET_A)
    md = read_md_arrays(host.paths.sysfs)
    iscsi = read_iscsi_sessions(host.paths.sysfs)
    assert md.errors == [] and iscsi.errors == []
    assert len(md.arrays) == 3 and len(iscsi.sessions) == 2
    assert set(read_mdstat(host.paths.procfs).arrays) == set(md.arrays)
    snap = HostSnapshot.read(host.paths)
    assert snap.ok, snap.sources
    assert snap.array("db1-disk").local_only
    assert snap.array("web1-disk").unprotected and not snap.array("web1-disk").local_only


def test_detach_logs_out_when_the_target_is_unused(host):
    host.attach("a", "vm1", TARGET, 1)
    host.attach("b", "vm2", TARGET, 2)
    host.detach("a")
    (session,) = read_iscsi_sessions(host.paths.sysfs).sessions
    assert [lun.lun for lun in session.luns] == [2]
    host.detach("b")
    assert read_iscsi_sessions(host.paths.sysfs).sessions == []
    assert read_md_arrays(host.paths.sysfs).arrays == {}
    assert host.registry.list() == []
    assert "md" not in (host.paths.procfs / "mdstat").read_text().split("\n", 1)[1].split("unused")[0]


def test_heal_refuses_a_leg_that_is_not_faulty(host):
    host.attach("a", "vm1", TARGET, 1)
    with pytest.raises(ValueError, match="not faulty"):
        host.heal("a")


def test_scenario_plays_outage_and_recovery_with_the_real_agent(host):
    """The agent sees every phase of one round: protected, local-only during the outage, healed."""
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False))
    seen: list[tuple[str, bool, bool]] = []
    lock = threading.Lock()

    def on_change(_what):
        with lock:
            rendered = agent.refresher.refresh_now()
            for a in rendered.snapshot.arrays:
                seen.append((a.label, a.local_only, a.unprotected))

    host.on_change = on_change
    scenario = DemoScenario(host, sleep=lambda _s: None)
    scenario.play_once()
    web1 = [(lo, un) for label, lo, un in seen if label == "web1-disk"]
    assert (False, True) in web1  # attached, local leg recovering
    assert (True, False) in web1  # the outage: running on the local leg alone
    assert web1[-1] == (False, False)  # healed before detach
    first_outage = web1.index((True, False))
    assert (False, False) in web1[:first_outage]  # it was protected before the outage
    mail1 = [lo for label, lo, _ in seen if label == "mail1-disk"]
    assert not any(mail1)  # the other filer never failed
    assert host.labels() == []  # the round ends with every VM detached


def test_the_demo_heals_with_the_agents_own_healer(host, caplog):
    """As `iscsimple-agent --demo` wires it: heal on, the Healer's mdadm acting on the simulated
    kernel; the scenario only waits, and the agent re-adds both stale legs of filer1."""
    caplog.set_level(logging.INFO)
    speed = 40.0
    agent = Agent(AgentOptions(refresh_interval=0.05, **demo_options(host, speed)))
    host.on_change = lambda _what: agent.refresher.request("demo host changed")
    agent.start()
    try:
        DemoScenario(host, speed=speed).play_once()
    finally:
        agent.stop()
    healer = agent.safety.healer
    assert healer.enabled
    assert healer.results["success"] == 2 and healer.results["failure"] == 0  # web1-disk, db1-disk
    assert "did not heal" not in caplog.text
    assert "the agent re-added the iSCSI legs" in caplog.text
    healed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("heal of ")]
    assert sorted(m.split()[2] for m in healed) == ["db1-disk", "web1-disk"]
    assert host.labels() == []


def test_simulated_mdadm_acts_like_md_and_refuses_the_rest(host):
    from iscsimple.core.run import CommandError

    host.attach("a", "vm1", TARGET, 1)
    host.finish_resync("a")
    sd = host.iscsi_device("a")
    with pytest.raises(ValueError, match="unbounded"):
        host.mdadm(["mdadm", "/dev/md/a", "--fail", sd])
    with pytest.raises(CommandError, match="busy"):
        host.mdadm(["mdadm", "/dev/md/a", "--remove", sd], timeout=5)  # still in sync: md refuses
    host.mdadm(["mdadm", "/dev/md/a", "--fail", sd], timeout=5)
    assert member_attrs(host.paths.sysfs, host.md_device("a"), sd)[:2] == ("faulty,write_mostly", "none")
    host.mdadm(["mdadm", "/dev/md/a", "--remove", sd], timeout=5)
    with pytest.raises(CommandError):
        host.mdadm(["mdadm", "/dev/md/a", "--add", "--write-mostly", "/dev/sdz"], timeout=5)  # not its LUN
    host.mdadm(["mdadm", "/dev/md/a", "--add", "--write-mostly", str(host.paths.devfs / sd)], timeout=5)
    assert host.iscsi_leg_recovering("a")
    assert member_attrs(host.paths.sysfs, host.md_device("a"), sd) == ("write_mostly,spare", "1", "0")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["advance", "finish", "fail", "expire", "restore", "heal"]), st.floats(0, 1)
        ),
        max_size=12,
    ),
    size_mib=st.integers(1, 1 << 20),
)
def test_mdstat_of_any_state_parses_back_to_sysfs(tmp_path_factory, steps, size_mib):
    """Whatever the story, the core mdstat parser reads our /proc/mdstat consistently with sysfs."""
    host = SimulatedHost(tmp_path_factory.mktemp("h"))
    host.attach("a", "vm1", TARGET, 1, size_bytes=size_mib << 20)
    for action, ratio in steps:
        # Some steps are not possible in some states (no recovery running, leg not faulty).
        with contextlib.suppress(ValueError):
            {
                "advance": lambda r=ratio: host.advance_resync("a", r, speed_kib=int(r * 1e6)),
                "finish": lambda: host.finish_resync("a"),
                "fail": lambda: host.fail_session(TARGET),
                "expire": lambda: host.expire_session(TARGET),
                "restore": lambda: host.restore_session(TARGET),
                "heal": lambda: host.heal("a"),
            }[action]()
    parsed = read_mdstat(host.paths.procfs).arrays[host.md_device("a")]
    (array,) = read_md_arrays(host.paths.sysfs).arrays.values()
    assert parsed.blocks == size_mib * 1024
    assert {m.name for m in parsed.members} == {m.name for m in array.members}
    for m in array.members:
        p = parsed.member(m.name)
        assert (p.faulty, p.write_mostly) == (m.faulty, m.write_mostly)
    assert parsed.working_disks == sum(1 for m in array.members if m.in_sync)
    assert (parsed.progress is not None) == (array.sync_action != "idle")
    if parsed.progress is not None:
        done, total = array.sync_completed
        assert parsed.progress.done_blocks == done // 2 and parsed.progress.total_blocks == total // 2
        # md_seq_show works in units of 1024 sectors: coarse for small arrays, as in the kernel.
        assert abs(parsed.progress.ratio - done / total) <= 2 * 1024 / total + 0.002


def test_reattach_reuses_kernel_names_like_the_kernel(host):
    host.attach("a", "vm1", TARGET, 1)
    host.attach("b", "vm2", TARGET, 2)
    first = (host.md_device("a"), host.iscsi_device("a"))
    host.detach("a")
    host.attach("a", "vm1", TARGET, 1)
    assert (host.md_device("a"), host.iscsi_device("a")) == first  # md127 and sda are free again
    assert host.paths.tab.read_text().count("\na ") == 1
    assert read_md_arrays(host.paths.sysfs).errors == []
