"""The agent's collectors: exact metric values from real kernel captures and generated trees."""

from __future__ import annotations

import math
import shutil

import pytest
from fixturetree import register_capture_array
from prometheus_client.parser import text_string_to_metric_families

from iscsimple.core.paths import HostPaths
from iscsimple.core.snapshot import LEG_STATES
from iscsimple.exporter.agent import Agent, AgentOptions
from iscsimple.exporter.health import HealthChecker
from iscsimple.exporter.simhost import SimulatedHost

TARGET = "iqn.2026-11.test.local:disk1"
PORTAL = "127.0.0.1:3260"
TB = "iqn.2003-01.org.example:b"


def scrape(paths: HostPaths, agent: Agent | None = None) -> dict[tuple[str, frozenset], float]:
    agent = agent or Agent(AgentOptions(paths=paths, udev=False, mdstat_events=False))
    rendered = agent.refresher.refresh_now()
    return parse(rendered.text.decode())


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples, name: str) -> list[dict]:
    return [dict(k[1]) for k in samples if k[0] == name]


register_capture = register_capture_array


# state → iscsi leg, local leg, degraded, sync action, ratio, speed KiB/s, session, lun, local_only, unprotected
CAPTURED = {
    "01": ("in_sync", "missing", 1, "idle", 0.0, 0, "LOGGED_IN", "running", 0, 1),
    "02": ("in_sync", "recovering", 1, "recover", 8320 / 131072, 2645, "LOGGED_IN", "running", 0, 1),
    "03": ("in_sync", "recovering", 1, "recover", 49920 / 131072, 2261, "LOGGED_IN", "running", 0, 1),
    "04": ("in_sync", "in_sync", 0, "idle", 1.0, 0, "LOGGED_IN", "running", 0, 0),
    "05a": ("in_sync", "in_sync", 0, "idle", 1.0, 0, "FAILED", "blocked", 1, 0),
    "05b": ("in_sync", "in_sync", 0, "idle", 1.0, 0, "FAILED", "blocked", 1, 0),
    "06": ("faulty", "in_sync", 1, "idle", 0.0, 0, "FREE", "transport-offline", 1, 0),
    "07": ("faulty", "in_sync", 1, "idle", 0.0, 0, "LOGGED_IN", "running", 1, 0),
    "08": ("missing", "in_sync", 1, "idle", 0.0, 0, "LOGGED_IN", "running", 1, 0),
    "09": ("recovering", "in_sync", 1, "recover", 8320 / 131072, 3968, "LOGGED_IN", "running", 1, 0),
    "10": ("in_sync", "in_sync", 0, "idle", 1.0, 0, "LOGGED_IN", "running", 0, 0),
}


@pytest.mark.parametrize("state", sorted(CAPTURED))
def test_captured_kernel_states(kernel_state, state):
    iscsi, local, degraded, action, ratio, speed, session, lun, local_only, unprotected = CAPTURED[state]
    s = scrape(register_capture(kernel_state(state)))
    assert value(s, "iscsimple_up") == 1
    assert (
        value(
            s,
            "iscsimple_array_info",
            label="test",
            device="md127",
            domain="web1",
            vbd="xvda",
            target=TARGET,
            lun="1",
            iscsi_device="sda",
            local_device="/dev/loop1",
        )
        == 1
    )
    for leg, expected in (("iscsi", iscsi), ("local", local)):
        for st in LEG_STATES:
            assert value(s, "iscsimple_leg_state", label="test", leg=leg, state=st) == (st == expected), (
                leg,
                st,
            )
    assert value(s, "iscsimple_array_degraded", label="test") == degraded
    for a in ("idle", "resync", "recover", "check", "repair", "frozen", "reshape"):
        assert value(s, "iscsimple_array_sync_action", label="test", action=a) == (a == action)
    assert value(s, "iscsimple_array_sync_completed_ratio", label="test") == pytest.approx(ratio)
    assert value(s, "iscsimple_array_sync_speed_bytes_per_second", label="test") == speed * 1024
    remaining = value(s, "iscsimple_array_sync_remaining_seconds", label="test")
    if action == "idle":
        assert remaining == 0
    else:
        done = round(ratio * 131072)
        assert remaining == pytest.approx((131072 - done) * 512 / (speed * 1024))
    assert value(s, "iscsimple_array_size_bytes", label="test") == 64 * 1024 * 1024
    assert value(s, "iscsimple_array_local_only", label="test", domain="web1") == local_only
    assert value(s, "iscsimple_array_unprotected", label="test", domain="web1") == unprotected
    for st in ("LOGGED_IN", "FAILED", "FREE"):
        assert value(s, "iscsimple_iscsi_session_state", target=TARGET, portal=PORTAL, state=st) == (
            st == session
        )
    assert value(s, "iscsimple_iscsi_session_up", target=TARGET, portal=PORTAL) == (session == "LOGGED_IN")
    assert value(s, "iscsimple_iscsi_lun_state", target=TARGET, lun="1", device="sda", state=lun) == 1
    assert sum(v for (n, _), v in s.items() if n == "iscsimple_iscsi_lun_state") == 1
    # write-mostly comes from sysfs dev-*/state: present on the iSCSI leg whenever md has it.
    if iscsi == "missing":
        assert ("iscsimple_leg_write_mostly", frozenset({("label", "test"), ("leg", "iscsi")})) not in s
    else:
        assert value(s, "iscsimple_leg_write_mostly", label="test", leg="iscsi") == 1
    if local != "missing":
        assert value(s, "iscsimple_leg_write_mostly", label="test", leg="local") == 0
        assert value(s, "iscsimple_leg_errors", label="test", leg="local") == 0


def test_stopped_array_and_logged_out_session_stay_visible(kernel_state):
    """Registry says attached, the kernel has neither array nor session: legs missing, session up 0."""
    s = scrape(register_capture(kernel_state("12")))
    assert value(s, "iscsimple_leg_state", label="test", leg="iscsi", state="missing") == 1
    assert value(s, "iscsimple_leg_state", label="test", leg="local", state="missing") == 1
    assert value(s, "iscsimple_iscsi_session_up", target=TARGET, portal=PORTAL) == 0
    for st in ("LOGGED_IN", "FAILED", "FREE"):
        assert value(s, "iscsimple_iscsi_session_state", target=TARGET, portal=PORTAL, state=st) == 0
    assert names(s, "iscsimple_array_degraded") == []  # no array: no md facts invented
    assert value(s, "iscsimple_array_local_only", label="test", domain="web1") == 0


def test_arrays_and_sessions_not_in_the_registry_are_ignored(kernel_state):
    root = kernel_state("04")
    paths = HostPaths(procfs=root / "proc", sysfs=root / "sys", devfs=root / "dev", state=root / "run")
    s = scrape(paths)
    assert value(s, "iscsimple_up") == 1
    assert not [k for k in s if k[0].startswith(("iscsimple_array", "iscsimple_leg", "iscsimple_iscsi"))]


@pytest.fixture
def host(tmp_path):
    return SimulatedHost(tmp_path / "host")


def test_many_arrays_every_state(host):
    targets = [f"iqn.2003-01.org.example:t{i}" for i in range(5)]
    with host.batch():
        for i in range(50):
            host.attach(f"vm{i}-disk", f"vm{i}", targets[i % 5], i // 5 + 1, size_bytes=(i + 1) << 20)
        for i in range(10, 50):
            host.finish_resync(f"vm{i}-disk")
        for i in range(5):
            host.advance_resync(f"vm{i}-disk", 0.25, speed_kib=2000)
    host.expire_session(targets[2])  # vm2, vm7 still recovering; vm12, vm17... in sync → local-only
    host.fail_session(targets[3])
    s = scrape(host.paths)
    assert value(s, "iscsimple_up") == 1
    assert len(names(s, "iscsimple_array_info")) == 50
    assert len(names(s, "iscsimple_leg_state")) == 50 * 2 * len(LEG_STATES)
    local_only = {
        d["label"]
        for d in names(s, "iscsimple_array_local_only")
        if value(s, "iscsimple_array_local_only", **d)
    }
    expected = {f"vm{i}-disk" for i in range(10, 50) if i % 5 in (2, 3)}
    assert local_only == expected
    unprotected = {
        d["label"]
        for d in names(s, "iscsimple_array_unprotected")
        if value(s, "iscsimple_array_unprotected", **d)
    }
    assert unprotected == {f"vm{i}-disk" for i in range(10)}
    assert value(s, "iscsimple_array_sync_completed_ratio", label="vm1-disk") == pytest.approx(0.25, abs=1e-3)
    assert value(s, "iscsimple_array_sync_speed_bytes_per_second", label="vm1-disk") == 2000 * 1024
    assert value(s, "iscsimple_array_size_bytes", label="vm9-disk") == 10 << 20
    # vm2 was recovering when its target expired: raid1 keeps its only in-sync leg, recovery stops.
    assert value(s, "iscsimple_leg_state", label="vm2-disk", leg="iscsi", state="in_sync") == 1
    assert value(s, "iscsimple_array_sync_action", label="vm2-disk", action="idle") == 1
    assert value(s, "iscsimple_leg_state", label="vm12-disk", leg="iscsi", state="faulty") == 1
    assert value(s, "iscsimple_leg_state", label="vm13-disk", leg="iscsi", state="in_sync") == 1
    ups = {
        d["target"]: value(s, "iscsimple_iscsi_session_up", **d)
        for d in names(s, "iscsimple_iscsi_session_up")
    }
    assert ups == {t: (0.0 if i in (2, 3) else 1.0) for i, t in enumerate(targets)}
    assert (
        value(
            s,
            "iscsimple_iscsi_lun_state",
            target=targets[3],
            lun="2",
            device=host.iscsi_device("vm8-disk"),
            state="blocked",
        )
        == 1
    )


def test_collectors_render_no_sample_for_the_views_they_do_not_declare(host):
    """The renderer asks a collector for a Part of each view only of the kinds in its `views`:
    one that has samples for another kind would lose them."""
    from iscsimple.exporter.collectors import Part

    targets = [f"iqn.2003-01.org.example:t{i}" for i in range(3)]
    for i in range(6):
        host.attach(f"vm{i}-disk", f"vm{i}", targets[i % 3], i // 3 + 1)
    host.finish_resync("vm1-disk")
    host.expire_session(targets[1])  # local-only, a stale record
    host.fail_session(targets[2])
    host.record_hotplug("add", "failure", 3.0)
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False))
    agent.refresher.refresh_now()
    snapshot = agent.refresher.snapshot()
    assert snapshot.stale and snapshot.arrays and snapshot.sessions
    undeclared = 0
    for collector in agent.refresher.collectors:
        for kind, part in (
            ("arrays", Part(arrays=snapshot.arrays)),
            ("sessions", Part(sessions=snapshot.sessions)),
        ):
            if kind not in collector.views:
                undeclared += 1
                assert [f.samples for f in collector.families(snapshot, part) if f.samples] == [], (
                    collector.name,
                    kind,
                )
    assert undeclared >= 5  # arrays, safety: no sessions; iscsi: no arrays; hotplug: neither


def test_a_block_rendered_in_one_call_gives_each_view_the_lines_it_renders_alone(host):
    """A full render asks each collector once per block of views and splits the samples by the
    view whose turn of the iteration added them (exposition._block_lines): for every collector,
    each view gets exactly the lines a Part of that view alone renders."""
    from iscsimple.exporter import exposition

    targets = [f"iqn.2003-01.org.example:t{i}" for i in range(3)]
    for i in range(7):
        host.attach(f"vm{i}-disk", f"vm{i}", targets[i % 3], i // 3 + 1)
    for i in (1, 4, 5, 6):
        host.finish_resync(f"vm{i}-disk")
    host.advance_resync("vm0-disk", 0.5, speed_kib=1000)
    host.set_leg_errors("vm5-disk", "local", 2)
    host.expire_session(targets[1])  # local-only, stale records
    host.fail_session(targets[2])
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False))
    agent.refresher.refresh_now()
    snapshot = agent.refresher.snapshot()
    assert snapshot.stale
    checked = set()
    for collector in agent.refresher.collectors:
        for arrays, views in ((True, snapshot.arrays), (False, snapshot.sessions)):
            if ("arrays" if arrays else "sessions") not in collector.views:
                continue
            together = exposition._block_lines(collector, snapshot, arrays, list(views))
            assert together is not None, collector.name
            assert all(len(lines) == len(views) for lines in together.values())
            for index, view in enumerate(views):
                found = {name: lines[index] for name, lines in together.items() if lines[index]}
                alone = collector.families(snapshot, exposition._part(arrays, view))
                lines = {f.name: exposition._sample_lines(f) for f in alone}
                assert found == {name: text for name, text in lines.items() if text}, collector.name
                checked.update(found)
    assert {
        "iscsimple_array_info",
        "iscsimple_lun_stale_since_seconds",
        "iscsimple_iscsi_lun_state",
    } <= checked


def test_samples_added_after_the_views_were_listed_are_encoded_view_by_view(host):
    """A collector that adds its samples after going through the views (so no view's turn
    tells whose they are) is asked view by view: its lines and their per-view lengths are
    right, and a later change of one view is spliced in its place."""
    from iscsimple.core.snapshot import Changes, HostSnapshot
    from iscsimple.exporter import exposition
    from iscsimple.exporter.collectors.base import SnapshotCollector, gauge

    class Listing(SnapshotCollector):
        name = "listing"
        views = frozenset({"arrays"})

        def families(self, snapshot, part):
            sizes = gauge("test_size", "Size.", ["label"])
            views = [(v.label, v.md.size_bytes if v.md else 0) for v in part.arrays]
            for label, size in views:
                sizes.add_metric([label], float(size or 0))
            return [sizes]

    for i in range(5):
        host.attach(f"vm{i}-disk", f"vm{i}", TB, i + 1, size_bytes=(i + 1) << 20)
    snapshot = HostSnapshot.read(host.paths)
    assert exposition._block_lines(Listing(lambda: snapshot), snapshot, True, list(snapshot.arrays)) is None
    renderer = exposition.Renderer([Listing(lambda: snapshot)])
    first = renderer.render(snapshot)
    assert parse(first.text.decode())[("test_size", frozenset({("label", "vm3-disk")}))] == 4 << 20
    lengths = renderer._pieces[("listing", True)].lengths["test_size"]
    assert list(lengths) == [
        len(f'test_size{{label="vm{i}-disk"}} {float((i + 1) << 20)}\n') for i in range(5)
    ]
    (host.paths.sysfs / "block" / host.md_device("vm2-disk") / "size").write_text("4096\n")
    updated = snapshot.update(host.paths, Changes(md=frozenset({host.md_device("vm2-disk")})))
    second = renderer.render(updated)
    fresh = exposition.Renderer([Listing(lambda: updated)]).render(updated)
    # Everything but the agent's own families (their durations differ).
    assert [p.plain() for p in second.text_pieces[:-1]] == [p.plain() for p in fresh.text_pieces[:-1]]
    assert parse(second.text.decode())[("test_size", frozenset({("label", "vm2-disk")}))] == 4096 * 512


def _member_dir(host, label, leg):
    md = host.paths.sysfs / "block" / host.md_device(label) / "md"
    name = host.iscsi_device(label) if leg == "iscsi" else f"dm-{int(label[2:].split('-')[0])}"
    return md / f"dev-{name}"


def test_blocked_spare_and_removed_legs(host):
    for i in range(4):
        host.attach(f"vm{i}-disk", f"vm{i}", TB, i + 1)
        host.finish_resync(f"vm{i}-disk")
    host.set_leg_errors("vm3-disk", "iscsi", 7)
    # md blocks a member after a write error until the bad block is acknowledged.
    (_member_dir(host, "vm0-disk", "iscsi") / "state").write_text("blocked,write_mostly,write_error\n")
    # A local leg that is present but has no slot: a spare.
    local = _member_dir(host, "vm1-disk", "local")
    (local / "state").write_text("spare\n")
    (local / "slot").write_text("none\n")
    # The local leg removed from the array (mdadm --remove).
    shutil.rmtree(_member_dir(host, "vm2-disk", "local"))
    # write-mostly on the wrong leg.
    (_member_dir(host, "vm3-disk", "local") / "state").write_text("in_sync,write_mostly\n")
    s = scrape(host.paths)
    assert value(s, "iscsimple_leg_state", label="vm0-disk", leg="iscsi", state="blocked") == 1
    assert value(s, "iscsimple_array_local_only", label="vm0-disk", domain="vm0") == 1
    assert value(s, "iscsimple_leg_state", label="vm1-disk", leg="local", state="spare") == 1
    assert value(s, "iscsimple_array_unprotected", label="vm1-disk", domain="vm1") == 1
    assert value(s, "iscsimple_leg_state", label="vm2-disk", leg="local", state="missing") == 1
    assert ("iscsimple_leg_write_mostly", frozenset({("label", "vm2-disk"), ("leg", "local")})) not in s
    assert value(s, "iscsimple_leg_write_mostly", label="vm3-disk", leg="local") == 1
    assert value(s, "iscsimple_array_write_mostly_wrong", label="vm3-disk") == 1
    assert value(s, "iscsimple_array_write_mostly_wrong", label="vm2-disk") == 0
    assert value(s, "iscsimple_leg_errors", label="vm3-disk", leg="iscsi") == 7
    assert value(s, "iscsimple_up") == 1


def test_missing_and_unreadable_files_fail_the_collector_not_the_agent(host):
    for i in range(3):
        host.attach(f"vm{i}-disk", f"vm{i}", TB, i + 1)
    md0 = host.paths.sysfs / "block" / host.md_device("vm0-disk") / "md"
    (md0 / "degraded").unlink()
    state = _member_dir(host, "vm1-disk", "iscsi") / "state"
    state.unlink()
    state.mkdir()  # reading it fails with EISDIR, like an attribute we may not read
    s = scrape(host.paths)
    assert value(s, "iscsimple_up") == 0
    assert value(s, "iscsimple_collector_success", collector="arrays") == 0
    assert value(s, "iscsimple_collector_success", collector="iscsi") == 1
    assert value(s, "iscsimple_collector_success", collector="hotplug") == 1
    # The healthy array is complete; the broken ones still say what could be read.
    assert value(s, "iscsimple_array_degraded", label="vm2-disk") == 1
    assert ("iscsimple_array_degraded", frozenset({("label", "vm0-disk")})) not in s
    assert value(s, "iscsimple_leg_state", label="vm0-disk", leg="local", state="recovering") == 1
    assert len(names(s, "iscsimple_array_info")) == 3
    assert value(s, "iscsimple_collector_duration_seconds", collector="arrays") > 0


def test_session_expected_by_registry_but_gone_is_zero_not_absent(host):
    host.attach("vm0-disk", "vm0", TB, 1)
    shutil.rmtree(host.paths.sysfs / "devices" / "platform")
    for link in (host.paths.sysfs / "class" / "iscsi_session").iterdir():
        link.unlink()
    s = scrape(host.paths)
    assert value(s, "iscsimple_iscsi_session_up", target=TB, portal="192.0.2.10:3260") == 0
    # md still lists the member until it fails an I/O: the leg's own state is md's word.
    assert value(s, "iscsimple_leg_state", label="vm0-disk", leg="iscsi", state="in_sync") == 1


def test_hotplug_statistics(host):
    host.record_hotplug("add", "success", 1.25)
    host.record_hotplug("add", "success", 2.5)
    host.record_hotplug("add", "failure", 40.0)
    host.record_hotplug("remove", "success", 0.5)
    s = scrape(host.paths)
    assert value(s, "iscsimple_hotplug_operations_total", operation="add", result="success") == 2
    assert value(s, "iscsimple_hotplug_operations_total", operation="add", result="failure") == 1
    assert value(s, "iscsimple_hotplug_operations_total", operation="remove", result="failure") == 0
    assert value(s, "iscsimple_hotplug_last_duration_seconds", operation="add") == 40.0
    assert value(s, "iscsimple_hotplug_last_duration_seconds", operation="remove") == 0.5


def test_stalled_resync_and_flapping_session(host):
    now = [1000.0]
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False))
    agent.health = HealthChecker(stall_after=60, flap_window=600, flap_changes=4, clock=lambda: now[0])
    agent.refresher.watchers = [agent.health]
    agent.refresher.collectors[-1].checker = agent.health
    host.attach("vm0-disk", "vm0", TB, 1)
    host.advance_resync("vm0-disk", 0.5)
    assert value(scrape(host.paths, agent), "iscsimple_array_sync_stalled", label="vm0-disk") == 0
    now[0] += 59
    assert value(scrape(host.paths, agent), "iscsimple_array_sync_stalled", label="vm0-disk") == 0
    now[0] += 2
    assert value(scrape(host.paths, agent), "iscsimple_array_sync_stalled", label="vm0-disk") == 1
    host.advance_resync("vm0-disk", 0.6)
    assert value(scrape(host.paths, agent), "iscsimple_array_sync_stalled", label="vm0-disk") == 0
    host.finish_resync("vm0-disk")
    for _ in range(2):
        host.fail_session(TB)
        now[0] += 10
        scrape(host.paths, agent)
        host.restore_session(TB)
        now[0] += 10
        s = scrape(host.paths, agent)
    assert value(s, "iscsimple_iscsi_session_changes_total", target=TB, portal="192.0.2.10:3260") == 4
    assert value(s, "iscsimple_iscsi_session_flapping", target=TB, portal="192.0.2.10:3260") == 1
    now[0] += 601
    s = scrape(host.paths, agent)
    assert value(s, "iscsimple_iscsi_session_flapping", target=TB, portal="192.0.2.10:3260") == 0
    assert value(s, "iscsimple_iscsi_session_changes_total", target=TB, portal="192.0.2.10:3260") == 4


def test_remaining_seconds_is_nan_when_a_sync_does_not_move(host):
    host.attach("vm0-disk", "vm0", TB, 1)
    host.advance_resync("vm0-disk", 0.1, speed_kib=0)
    s = scrape(host.paths)
    assert math.isnan(value(s, "iscsimple_array_sync_remaining_seconds", label="vm0-disk"))


def test_one_scrape_renders_one_snapshot(host):
    """Collectors never read the host: changing it does not change what is served until a refresh."""
    host.attach("vm0-disk", "vm0", TB, 1)
    host.finish_resync("vm0-disk")
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False))
    agent.refresher.refresh_now()
    before, _ = agent.metrics("")
    host.expire_session(TB)
    assert agent.metrics("")[0] == before
    agent.refresher.refresh_now()
    assert (
        value(
            parse(agent.metrics("")[0].decode()), "iscsimple_array_local_only", label="vm0-disk", domain="vm0"
        )
        == 1
    )


def test_fast_text_encoder_matches_prometheus_client(host):
    from prometheus_client.exposition import generate_latest

    from iscsimple.exporter.exposition import encode_text

    # Quotes, a backslash, non-ASCII: what a VM name may hold (a newline never reaches the registry)
    host.attach("vm0-disk", 'we"ird\\dom\u00e9ain', TB, 1)
    host.attach("vm1-disk", "vm1", TB, 2)
    host.advance_resync("vm1-disk", 0.123456789, speed_kib=0)  # NaN remaining
    host.record_hotplug("add", "failure", 12345678.9)
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False))
    rendered = agent.refresher.refresh_now()

    class Registry:
        def collect(self):
            return rendered.families

    ours = encode_text(rendered.families).decode()
    theirs = generate_latest(Registry()).decode()
    a, b = parse(ours), parse(theirs)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key
    # Same lines in the same order, label order included; only float spelling may differ.
    assert [line.rsplit(" ", 1)[0] for line in ours.splitlines()] == [
        line.rsplit(" ", 1)[0] for line in theirs.splitlines()
    ]
    assert value(a, "iscsimple_array_local_only", label="vm0-disk", domain='we"ird\\dom\u00e9ain') == 0

    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

    from iscsimple.exporter.exposition import encode

    ours = encode(rendered.families, openmetrics=True).decode()
    theirs = generate_openmetrics(Registry()).decode()
    assert [line.rsplit(" ", 1)[0] for line in ours.splitlines()] == [
        line.rsplit(" ", 1)[0] for line in theirs.splitlines()
    ]
    assert ours.endswith("# EOF\n")
    om = {(s.name, frozenset(s.labels.items())): s.value for f in parse_openmetrics(ours) for s in f.samples}
    assert om.keys() == a.keys()
    assert rendered.body("application/openmetrics-text;version=1.0.0")[0] == ours.encode()


def test_mismatch_sectors_are_mds_mismatch_cnt(kernel_state):
    """A check's finding (md/mismatch_cnt, 0 in the real capture) is exported; a garbled value is
    no sample, not a made-up 0."""
    root = kernel_state("10")
    paths = register_capture(root)
    assert value(scrape(paths), "iscsimple_array_mismatch_sectors", label="test") == 0
    (root / "sys" / "block" / "md127" / "md" / "mismatch_cnt").write_text("128\n")
    assert value(scrape(paths), "iscsimple_array_mismatch_sectors", label="test") == 128
    (root / "sys" / "block" / "md127" / "md" / "mismatch_cnt").write_text("lots\n")
    assert names(scrape(paths), "iscsimple_array_mismatch_sectors") == []
